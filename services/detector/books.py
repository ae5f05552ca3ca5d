"""What the detector cores know about markets: the latest usable book per (exchange, symbol),
and each market's trading rules.

A book is usable while its collector says it is synced and it is younger than the configured
age; it is dropped on a ``stale`` status or snapshot and comes back with the next synced
snapshot. Books whose levels could not come from a real exchange (crossed, unsorted,
non-positive) are rejected with a reason, never used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from operator import gt, itemgetter, lt
from typing import Any

from shared.models import BookSnapshot, BookStatus, Instrument, Level, split_symbol
from shared.money import to_decimal


def _compiled() -> Callable[[Any, bool], bool | None] | None:
    """The compiled check (shared/_clevels.c): the same answers, a sixth of the time."""
    if os.environ.get("ARB_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from shared._clevels import ordered
    except ImportError:  # not built here (no C compiler at install time)
        return None
    return ordered


_compiled_ordered = _compiled()

MarketKey = tuple[str, str]
"""(exchange, unified symbol)."""

_PRICE = itemgetter(0)
_SIZE = itemgetter(1)
_INF = math.inf


def book_problem(book: BookSnapshot) -> str | None:
    """Why ``book`` cannot be used (a short reason code), or None if it can."""
    try:
        split_symbol(book.symbol)
    except ValueError:
        return "symbol"
    bids, asks = book.bids, book.asks
    if not bids or not asks:
        return "empty"
    if not _ordered(bids, descending=True) or not _ordered(asks, descending=False):
        return "unsorted"
    if bids[0][0] >= asks[0][0]:
        return "crossed"
    return None


def _ordered(levels: list[Level], *, descending: bool) -> bool:
    """Strictly monotonic, positive, finite prices and positive, finite sizes. This runs on every
    update: compiled when built, for the (float, float) tuples books are made of."""
    if _compiled_ordered is not None:
        answer: bool | None = _compiled_ordered(levels, descending)
        if answer is not None:
            return answer
    return ordered_levels(levels, descending=descending)


def ordered_levels(levels: list[Level], *, descending: bool) -> bool:
    """``_ordered``'s reference, for any levels (C-level loops)."""
    prices = list(map(_PRICE, levels))
    sizes = list(map(_SIZE, levels))
    if not (0.0 < sum(sizes) < _INF and min(sizes) > 0.0):  # a NaN or inf size makes the sum fail
        return False
    if descending:
        return prices[0] < _INF and prices[-1] > 0.0 and all(map(gt, prices, prices[1:]))
    return prices[0] > 0.0 and prices[-1] < _INF and all(map(lt, prices, prices[1:]))  # NaN fails every comparison


class BookRegistry:
    """Latest book per market, grouped by base asset."""

    __slots__ = ("_books", "_by_base")

    def __init__(self) -> None:
        self._books: dict[MarketKey, BookSnapshot] = {}
        self._by_base: dict[str, dict[MarketKey, BookSnapshot]] = {}

    def apply(self, book: BookSnapshot) -> bool:
        """Take a snapshot; False if it was ignored as older than the one held.

        The caller has checked it with ``book_problem``. A ``stale`` snapshot drops the book.
        """
        key = (book.exchange, book.symbol)
        held = self._books.get(key)
        if held is not None and book.ts_recv_ns < held.ts_recv_ns:
            return False  # a redelivered or reordered older frame must not overwrite newer data
        if book.status != "synced":
            self._drop(key)
            return True
        self._books[key] = book
        base = book.symbol.partition("/")[0]
        self._by_base.setdefault(base, {})[key] = book
        return True

    def apply_status(self, status: BookStatus) -> None:
        """A stale status drops the book; ``synced`` needs no action, the next synced snapshot restores it."""
        if status.status == "stale":
            held = self._books.get((status.exchange, status.symbol))
            if held is None or status.ts_ns >= held.ts_recv_ns:
                self._drop((status.exchange, status.symbol))

    def _drop(self, key: MarketKey) -> None:
        if self._books.pop(key, None) is not None:
            base = key[1].partition("/")[0]
            books = self._by_base.get(base)
            if books is not None:
                books.pop(key, None)

    def drop_base(self, base: str) -> None:
        for key in list(self._by_base.pop(base, {})):
            self._books.pop(key, None)

    def get(self, exchange: str, symbol: str) -> BookSnapshot | None:
        return self._books.get((exchange, symbol))

    def of_base(self, base: str) -> Mapping[MarketKey, BookSnapshot]:
        return self._by_base.get(base, {})

    def __iter__(self) -> Iterator[BookSnapshot]:
        return iter(self._books.values())

    def __len__(self) -> int:
        return len(self._books)


@dataclass(frozen=True, slots=True)
class FallbackRules:
    """Trading rules for markets with no published metadata."""

    taker_fees: Mapping[str, float]
    """Per exchange (``cfg.exchanges.<name>.taker_fee``)."""
    default_taker_fee: float = 0.001
    tick_size: Decimal = Decimal("1e-8")
    lot_size: Decimal = Decimal("1e-8")


class InstrumentTable:
    """Instrument metadata per market, falling back to configured fees and default tick/lot."""

    __slots__ = ("_defaults", "_fallback", "_fees", "_instruments")

    def __init__(self, fallback: FallbackRules, instruments: Iterable[Instrument] = ()) -> None:
        self._fallback = fallback
        self._instruments: dict[MarketKey, Instrument] = {}
        self._defaults: dict[MarketKey, Instrument] = {}
        self._fees: dict[MarketKey, float] = {}
        for inst in instruments:
            self.set(inst)

    def set(self, instrument: Instrument) -> None:
        key = (instrument.exchange, instrument.symbol)
        self._instruments[key] = instrument
        self._fees[key] = float(instrument.taker_fee)

    def published(self, exchange: str, symbol: str) -> bool:
        return (exchange, symbol) in self._instruments

    def get(self, exchange: str, symbol: str) -> Instrument:
        key = (exchange, symbol)
        inst = self._instruments.get(key) or self._defaults.get(key)
        if inst is None:
            inst = self._defaults[key] = self._default(exchange, symbol)
        return inst

    def taker_fee(self, exchange: str, symbol: str) -> float:
        fee = self._fees.get((exchange, symbol))
        if fee is None:
            fee = self._fees[(exchange, symbol)] = float(self.get(exchange, symbol).taker_fee)
        return fee

    def _default(self, exchange: str, symbol: str) -> Instrument:
        base, quote = split_symbol(symbol)
        fee = self._fallback.taker_fees.get(exchange, self._fallback.default_taker_fee)
        return Instrument(
            exchange=exchange,
            symbol=symbol,
            native=symbol,
            base=base,
            quote=quote,
            tick_size=self._fallback.tick_size,
            lot_size=self._fallback.lot_size,
            taker_fee=to_decimal(fee),
            maker_fee=to_decimal(fee),
        )
