"""What every detector core shares: the error for unusable input, deterministic signal ids,
and the trading rules built from the configuration."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from decimal import Decimal
from typing import Protocol

from services.detector.books import FallbackRules
from shared.config import Config
from shared.models import BookSnapshot, BookStatus, FxRate, Instrument, Signal, SignalLeg


class DetectorCore(Protocol):
    """What the service shell (and the backtest) drive: every strategy's core has this shape."""

    def on_book(self, book: BookSnapshot, now_ns: int, *, evaluate: bool = True) -> list[Signal]: ...

    def on_status(self, status: BookStatus, now_ns: int) -> None: ...

    def on_fx(self, rate: FxRate, now_ns: int) -> None: ...

    def set_instrument(self, instrument: Instrument) -> None: ...

    def drop_asset(self, base: str) -> None: ...


class InvalidInput(ValueError):
    """A message a core cannot use (crossed or unsorted book, bad FX rate): ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def signal_id(strategy: str, asset: str, legs: Iterable[SignalLeg], inputs: Iterable[object]) -> str:
    """An id that depends only on what produced the signal, so a backtest over a recording and
    the live pipeline fed the same frames give the same ids (and risk can deduplicate on it).

    ``inputs`` are the book times and FX times behind the legs.
    """
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{strategy}|{asset}".encode())
    for leg in legs:
        h.update(f"|{leg.exchange}|{leg.symbol}|{leg.side}|{leg.price}|{leg.quantity}|{leg.book_seq}".encode())
    for item in inputs:
        h.update(f"|{item}".encode())
    return f"{strategy[:2]}-{h.hexdigest()}"


def fallback_rules(cfg: Config) -> FallbackRules:
    return FallbackRules(
        taker_fees={name: ex.taker_fee for name, ex in cfg.exchanges.items()},
        default_taker_fee=max(ex.taker_fee for _, ex in cfg.exchanges.items()),  # unknown venue: assume the dearest
        tick_size=Decimal(repr(cfg.detector.default_tick_size)),
        lot_size=Decimal(repr(cfg.detector.default_lot_size)),
    )
