"""The L2 order book every exchange module maintains: plain, synchronous, float prices.

Each side is a dict ``price -> size`` (every level) plus a sorted window of the best prices
(``keys``; bids negated so both sides run best first). Only levels inside the window cost a
``bisect`` insert or delete; the many changes far from the touch that diff feeds carry
(Binance sends levels thousands of ticks away) are a dict write and nothing else. The
window is cut back when it grows past ``WINDOW_MAX`` and rebuilt from the dict on the rare
occasion it runs shorter than a reader asks for, so ``top(n)`` is always the true best n.

Exchanges whose checksum covers the original strings (OKX, later Bitget) keep those
strings per level as well (``keep_strings``).

The book knows nothing about sequences, exchanges or time: the sync rules live in the
exchange modules, which call ``apply``/``replace`` only when their rules allow it.

This module is the reference. ``new_book`` hands out the compiled book of ``_cbook.c`` (the
same interface, ``L2Book``, for books that keep no strings; the same results, checked on
random update sequences by ``tests/test_collector_book.py``) when the extension is built, as
``pip install`` does wherever a C compiler is found, and this one otherwise or when
``ARB_PURE_PYTHON=1``.
"""

from __future__ import annotations

import os
from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from shared.models import Level

RawLevel = Sequence[str]
"""A level as the exchange sent it: ``[price, size, ...]`` strings."""
ParsedLevel = tuple[float, float, str, str]
"""``(price, size, price string, size string)``: a raw level read once, checked, ready to apply."""

WINDOW = 128
"""Levels kept sorted after a rebuild or a cut."""
WINDOW_MAX = 1024
"""The sorted window is cut back to ``WINDOW`` levels when it grows past this."""
INF = float("inf")


def parse_raw(levels: Iterable[RawLevel]) -> list[ParsedLevel]:
    """Read the exchange's strings once, before anything is applied: ``ValueError`` on a level
    that is not a positive finite price with a finite, non-negative size (``float`` alone would
    take "nan", "inf" and "-1")."""
    out: list[ParsedLevel] = []
    append = out.append
    for level in levels:
        price_s, size_s = level[0], level[1]
        price, size = float(price_s), float(size_s)
        if not (0.0 < price < INF and 0.0 <= size < INF):
            raise ValueError(f"{price_s}:{size_s}")
        append((price, size, price_s, size_s))
    return out


class BookSide:
    """One side of a book. ``sign`` is -1 for bids so that ``keys`` ascend best first.

    Invariant: ``keys`` == sorted(sign * p for p in levels if sign * p <= edge).
    """

    __slots__ = ("edge", "keys", "levels", "raw", "sign")

    def __init__(self, sign: int, keep_strings: bool = False) -> None:
        self.sign = sign
        self.levels: dict[float, float] = {}
        self.keys: list[float] = []
        self.edge = INF
        self.raw: dict[float, tuple[str, str]] | None = {} if keep_strings else None

    def __len__(self) -> int:
        return len(self.levels)

    def clear(self) -> None:
        self.levels.clear()
        self.keys.clear()
        self.edge = INF
        if self.raw is not None:
            self.raw.clear()

    # ------------------------------------------------------------------ changes

    def set(self, price: float, size: float) -> None:
        """Absolute size at ``price``; 0 removes the level (removing a missing level is normal)."""
        self.update(((price, size),))

    def update(self, levels: Iterable[tuple[float, float]]) -> None:
        """``set`` for many levels: the hot path of every diff, free of per-level calls."""
        book = self.levels
        keys = self.keys
        sign = self.sign
        edge = self.edge
        for price, size in levels:
            if size == 0.0:
                if book.pop(price, None) is not None:
                    k = sign * price
                    if k <= edge:
                        del keys[bisect_left(keys, k)]
            else:
                if price not in book:
                    k = sign * price
                    if k <= edge:
                        insort(keys, k)
                book[price] = size
        if len(keys) > WINDOW_MAX:
            self._cut()

    def update_raw(self, levels: Iterable[RawLevel]) -> None:
        """``update`` from the exchange's strings, keeping them for checksums."""
        raw = self.raw
        if raw is None:
            raise ValueError("this book does not keep the original strings")
        parsed = []
        for level in levels:
            price_s, size_s = level[0], level[1]
            price, size = float(price_s), float(size_s)
            parsed.append((price, size))
            if size == 0.0:
                raw.pop(price, None)
            else:
                raw[price] = (price_s, size_s)
        self.update(parsed)

    def update_parsed(self, levels: Iterable[ParsedLevel]) -> None:
        """``update_raw`` for levels already read by ``parse_raw`` (checksummed books' hot path)."""
        raw = self.raw
        if raw is None:
            raise ValueError("this book does not keep the original strings")
        book = self.levels
        keys = self.keys
        sign = self.sign
        edge = self.edge
        for price, size, price_s, size_s in levels:
            if size == 0.0:
                raw.pop(price, None)
                if book.pop(price, None) is not None:
                    k = sign * price
                    if k <= edge:
                        del keys[bisect_left(keys, k)]
            else:
                raw[price] = (price_s, size_s)
                if price not in book:
                    k = sign * price
                    if k <= edge:
                        insort(keys, k)
                book[price] = size
        if len(keys) > WINDOW_MAX:
            self._cut()

    def load_parsed(self, levels: Iterable[ParsedLevel]) -> None:
        self.clear()
        book = self.levels
        raw = self.raw
        if raw is None:
            raise ValueError("this book does not keep the original strings")
        for price, size, price_s, size_s in levels:
            if size != 0.0:
                book[price] = size
                raw[price] = (price_s, size_s)
        self._rebuild(WINDOW)

    def load(self, levels: Iterable[tuple[float, float]]) -> None:
        """Replace the side wholesale (snapshots): one sort instead of many inserts."""
        self.clear()
        book = self.levels
        for price, size in levels:
            if size != 0.0:
                book[price] = size
        self._rebuild(WINDOW)

    def load_raw(self, levels: Iterable[RawLevel]) -> None:
        self.clear()
        book = self.levels
        raw = self.raw
        if raw is None:
            raise ValueError("this book does not keep the original strings")
        for level in levels:
            price_s, size_s = level[0], level[1]
            size = float(size_s)
            if size != 0.0:
                price = float(price_s)
                book[price] = size
                raw[price] = (price_s, size_s)
        self._rebuild(WINDOW)

    # ------------------------------------------------------------------ the sorted window

    def _rebuild(self, size: int) -> None:
        sign = self.sign
        every = sorted(sign * p for p in self.levels)
        if len(every) > size:
            self.keys = every[:size]
            self.edge = self.keys[-1]
        else:
            self.keys = every
            self.edge = INF

    def _cut(self) -> None:
        keys = self.keys
        self.edge = keys[WINDOW - 1]
        del keys[WINDOW:]

    def _ensure(self, n: int) -> None:
        """Make sure the window holds the best ``n`` levels (or all there are)."""
        if len(self.keys) < n and len(self.levels) > len(self.keys):
            self._rebuild(max(n, WINDOW))

    # ------------------------------------------------------------------ reading

    def best(self) -> float | None:
        self._ensure(1)
        return self.sign * self.keys[0] if self.keys else None

    def top(self, n: int) -> list[Level]:
        self._ensure(n)
        levels = self.levels
        if self.sign < 0:
            return [(-k, levels[-k]) for k in self.keys[:n]]
        return [(k, levels[k]) for k in self.keys[:n]]

    def top_raw(self, n: int) -> list[tuple[str, str]]:
        if self.raw is None:
            raise ValueError("this book does not keep the original strings")
        self._ensure(n)
        raw = self.raw
        sign = self.sign
        return [raw[sign * k] for k in self.keys[:n]]

    def trim(self, max_levels: int) -> None:
        """Forget the levels furthest from the touch beyond ``max_levels`` (bounds memory)."""
        if len(self.levels) <= max_levels:
            return
        sign = self.sign
        every = sorted(sign * p for p in self.levels)
        for k in every[max_levels:]:
            self.levels.pop(sign * k, None)
            if self.raw is not None:
                self.raw.pop(sign * k, None)
        self._rebuild(max(len(self.keys), WINDOW))


class OrderBook:
    __slots__ = ("asks", "bids", "max_levels")

    def __init__(self, *, keep_strings: bool = False, max_levels: int = 20_000) -> None:
        self.bids = BookSide(-1, keep_strings)
        self.asks = BookSide(1, keep_strings)
        self.max_levels = max_levels

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()

    def __bool__(self) -> bool:
        return bool(self.bids.levels or self.asks.levels)

    def apply(self, bids: Iterable[tuple[float, float]], asks: Iterable[tuple[float, float]]) -> None:
        """Absolute-size updates (0 deletes)."""
        self.bids.update(bids)
        self.asks.update(asks)
        if len(self.bids.levels) > self.max_levels or len(self.asks.levels) > self.max_levels:
            self._bound()

    def apply_raw(self, bids: Iterable[RawLevel], asks: Iterable[RawLevel]) -> None:
        self.bids.update_raw(bids)
        self.asks.update_raw(asks)
        self._bound()

    def apply_parsed(self, bids: Iterable[ParsedLevel], asks: Iterable[ParsedLevel]) -> None:
        self.bids.update_parsed(bids)
        self.asks.update_parsed(asks)
        if len(self.bids.levels) > self.max_levels or len(self.asks.levels) > self.max_levels:
            self._bound()

    def replace_parsed(self, bids: Iterable[ParsedLevel], asks: Iterable[ParsedLevel]) -> None:
        self.bids.load_parsed(bids)
        self.asks.load_parsed(asks)
        self._bound()

    def replace(self, bids: Iterable[tuple[float, float]], asks: Iterable[tuple[float, float]]) -> None:
        self.bids.load(bids)
        self.asks.load(asks)
        self._bound()

    def replace_raw(self, bids: Iterable[RawLevel], asks: Iterable[RawLevel]) -> None:
        self.bids.load_raw(bids)
        self.asks.load_raw(asks)
        self._bound()

    def _bound(self) -> None:
        # Diff feeds add far-away levels forever; the touch is all anyone reads.
        self.bids.trim(self.max_levels)
        self.asks.trim(self.max_levels)

    def best_bid(self) -> float | None:
        return self.bids.best()

    def best_ask(self) -> float | None:
        return self.asks.best()

    def crossed(self) -> bool:
        """Best bid at or above best ask: a book no exchange can have."""
        bid, ask = self.bids.best(), self.asks.best()
        return bid is not None and ask is not None and bid >= ask

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        return self.bids.top(n), self.asks.top(n)


# --------------------------------------------------------------------------- the books in use


class L2Side(Protocol):
    """What exchange modules use of one side of a book (``BookSide`` and its compiled twin)."""

    def __len__(self) -> int: ...

    def set(self, price: float, size: float) -> None: ...

    def update(self, levels: Iterable[tuple[float, float]]) -> None: ...

    def load(self, levels: Iterable[tuple[float, float]]) -> None: ...

    def clear(self) -> None: ...

    def best(self) -> float | None: ...

    def top(self, n: int) -> list[Level]: ...

    def trim(self, max_levels: int) -> None: ...


class L2Book(Protocol):
    """What the collector core and the exchange modules use of a book."""

    @property
    def bids(self) -> L2Side: ...

    @property
    def asks(self) -> L2Side: ...

    def __bool__(self) -> bool: ...

    def clear(self) -> None: ...

    def apply(self, bids: Iterable[tuple[float, float]], asks: Iterable[tuple[float, float]]) -> None: ...

    def replace(self, bids: Iterable[tuple[float, float]], asks: Iterable[tuple[float, float]]) -> None: ...

    def best_bid(self) -> float | None: ...

    def best_ask(self) -> float | None: ...

    def crossed(self) -> bool: ...

    def top(self, n: int) -> tuple[list[Level], list[Level]]: ...


def _compiled() -> Any:
    if os.environ.get("ARB_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from services.collector import _cbook
    except ImportError:  # not built here (no C compiler at install time): the reference serves
        return None
    return _cbook.OrderBook


COMPILED: Any = _compiled()
"""The compiled ``OrderBook`` class, or None when the pure-Python reference is in use."""


def new_book(*, keep_strings: bool = False, max_levels: int = 20_000) -> L2Book:
    """A book for an exchange module: compiled when built, unless it must keep the exchange's
    strings (checksummed books), which only the reference does."""
    if COMPILED is not None and not keep_strings:
        book: L2Book = COMPILED(max_levels=max_levels)
        return book
    return OrderBook(keep_strings=keep_strings, max_levels=max_levels)
