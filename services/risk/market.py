"""Market inputs of the risk core: FX rates and rolling price windows, all in memory.

Each replica keeps its own: FX comes from the ``fx`` stream (every replica reads all of
it), prices are observed from the legs of the signals the replica sees. Valuation into the
reference currency uses, in order: the reference itself, an FX rate, then a price of the
asset against the reference (from the signal's own legs, else the latest observed).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from shared.models import FxRate, split_symbol


@dataclass(frozen=True, slots=True)
class FxQuote:
    rate: Decimal
    """Units of ``quote`` per one ``base``."""
    ts_ns: int


class PriceWindow:
    """Prices of one (exchange, symbol) over the last ``window_ns``, with an O(1) median.

    Bounded to ``max_samples`` (oldest dropped first), so a burst cannot grow it.
    """

    __slots__ = ("_sorted", "_times", "max_samples", "window_ns")

    def __init__(self, window_ns: int, max_samples: int = 512) -> None:
        self.window_ns = window_ns
        self.max_samples = max_samples
        self._times: deque[tuple[int, float]] = deque()
        self._sorted: list[float] = []

    def _evict(self, now_ns: int) -> None:
        horizon = now_ns - self.window_ns
        while self._times and (self._times[0][0] < horizon or len(self._times) > self.max_samples):
            _, price = self._times.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, price)]

    def add(self, ts_ns: int, price: float) -> None:
        self._times.append((ts_ns, price))
        bisect.insort(self._sorted, price)
        self._evict(ts_ns)

    def median(self, now_ns: int, min_samples: int) -> float | None:
        self._evict(now_ns)
        n = len(self._sorted)
        if n < min_samples or n == 0:
            return None
        mid = n // 2
        return self._sorted[mid] if n % 2 else (self._sorted[mid - 1] + self._sorted[mid]) / 2

    def __len__(self) -> int:
        return len(self._times)


class MarketView:
    def __init__(self, reference_currency: str, window_ns: int) -> None:
        self.reference = reference_currency
        self.window_ns = window_ns
        self.fx: dict[tuple[str, str], FxQuote] = {}
        self.windows: dict[tuple[str, str], PriceWindow] = {}
        self.last_price: dict[str, tuple[Decimal, int]] = {}
        """Asset -> latest price against the reference seen on any venue, and its time."""

    def set_window(self, window_ns: int) -> None:
        self.window_ns = window_ns
        for w in self.windows.values():
            w.window_ns = window_ns

    def on_fx(self, fx: FxRate) -> None:
        base, quote = split_symbol(fx.pair)
        current = self.fx.get((base, quote))
        if current is not None and current.ts_ns > fx.ts_source_ns:
            return  # out of order: keep the newer rate
        if fx.rate > 0:
            self.fx[(base, quote)] = FxQuote(Decimal(repr(fx.rate)), fx.ts_source_ns)

    def fx_quote(self, currency: str) -> FxQuote | None:
        """How many ``currency`` one reference unit buys, if an FX rate is known."""
        direct = self.fx.get((self.reference, currency))
        if direct is not None:
            return direct
        inverse = self.fx.get((currency, self.reference))
        if inverse is not None:
            return FxQuote(1 / inverse.rate, inverse.ts_ns)
        return None

    def observe(self, exchange: str, symbol: str, price: Decimal, ts_ns: int) -> None:
        base, quote = split_symbol(symbol)
        self.observe_parts(exchange, symbol, base, quote, price, ts_ns)

    def observe_parts(self, exchange: str, symbol: str, base: str, quote: str, price: Decimal, ts_ns: int) -> None:
        """``observe`` with the symbol already split (the core has split it)."""
        key = (exchange, symbol)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = PriceWindow(self.window_ns)
        window.add(ts_ns, float(price))
        if quote == self.reference:
            self.last_price[base] = (price, ts_ns)

    def median(self, exchange: str, symbol: str, now_ns: int, min_samples: int) -> float | None:
        window = self.windows.get((exchange, symbol))
        return None if window is None else window.median(now_ns, min_samples)
