"""FX rates between quote currencies (KRW, USDT, USDC, USD), as published on the ``fx`` stream.

A ``Conversion`` turns an amount in one currency into the reference currency. It carries two
factors, not one: an amount we *pay* is valued at the side of the rate that makes it dearer,
an amount we *receive* at the side that makes it cheaper, so an edge that only exists inside
the FX spread is never reported. Without bid/ask the published rate serves both.
Rates older than the configured age are not used: a stale rate is no rate (never a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.models import FxRate


@dataclass(frozen=True, slots=True)
class Conversion:
    cost: float
    """Multiply an amount paid in the currency to value it in the reference currency."""
    proceeds: float
    """Multiply an amount received in the currency to value it in the reference currency."""
    mid: float
    ts_ns: int
    """Source time of the oldest rate used; 0 for the identity."""
    rates: tuple[tuple[str, float], ...] = ()
    """(pair, published rate) of every rate used."""

    def age_ns(self, now_ns: int) -> int:
        return now_ns - self.ts_ns if self.ts_ns else 0


IDENTITY = Conversion(1.0, 1.0, 1.0, 0)


def fx_problem(rate: FxRate) -> str | None:
    """Why ``rate`` cannot be used (a short reason code), or None if it can."""
    base, sep, quote = rate.pair.partition("/")
    if not sep or not base or not quote or base == quote:
        return "pair"
    if not (0.0 < rate.rate < math.inf):
        return "rate"
    if (rate.bid is None) != (rate.ask is None):
        return "one_sided"
    if rate.bid is not None and rate.ask is not None and not (0.0 < rate.bid <= rate.ask < math.inf):
        return "bid_ask"
    return None


def _leg(rate: FxRate, inverse: bool) -> tuple[float, float, float]:
    """(cost, proceeds, mid) factors of one rate, used forwards (base -> quote) or inverted."""
    bid = rate.bid if rate.bid is not None else rate.rate
    ask = rate.ask if rate.ask is not None else rate.rate
    if inverse:  # an amount in the pair's quote, valued in its base: divide
        return 1.0 / bid, 1.0 / ask, 1.0 / rate.rate
    return ask, bid, rate.rate


class FxTable:
    """The latest rate per pair and conversions through at most one intermediate currency."""

    __slots__ = ("_cache", "_max_age_ns", "_rates", "version")

    def __init__(self, max_age_ns: int) -> None:
        self._max_age_ns = max_age_ns
        self._rates: dict[str, FxRate] = {}
        self._cache: dict[tuple[str, str], Conversion | None] = {}
        self.version = 0
        """Bumped on every accepted rate, so callers can cache what they derive from routes."""

    def update(self, rate: FxRate) -> bool:
        """Keep ``rate`` if it is valid and newer than the one held; True if kept."""
        if fx_problem(rate) is not None:
            return False
        held = self._rates.get(rate.pair)
        if held is not None and rate.ts_source_ns < held.ts_source_ns:
            return False
        self._rates[rate.pair] = rate
        self._cache.clear()
        self.version += 1
        return True

    def latest(self, pair: str) -> FxRate | None:
        return self._rates.get(pair)

    @property
    def max_age_ns(self) -> int:
        return self._max_age_ns

    def conversion(self, ccy: str, ref: str, now_ns: int) -> Conversion | None:
        """How to value ``ccy`` in ``ref`` now; None if no rate path exists or it is stale."""
        conv = self.route(ccy, ref)
        if conv is None or (conv.ts_ns and now_ns - conv.ts_ns > self._max_age_ns):
            return None
        return conv

    def route(self, ccy: str, ref: str) -> Conversion | None:
        """The conversion from the rates held, whatever their age (``conversion`` checks it)."""
        if ccy == ref:
            return IDENTITY
        key = (ccy, ref)
        try:
            return self._cache[key]
        except KeyError:
            conv = self._cache[key] = self._find(ccy, ref)
            return conv

    def _find(self, ccy: str, ref: str) -> Conversion | None:
        direct = self._hop(ccy, ref)
        if direct is not None:
            return direct
        best: Conversion | None = None
        for via in self._currencies():
            if via in (ccy, ref):
                continue
            first, second = self._hop(ccy, via), self._hop(via, ref)
            if first is None or second is None:
                continue
            conv = Conversion(
                first.cost * second.cost,
                first.proceeds * second.proceeds,
                first.mid * second.mid,
                min(first.ts_ns, second.ts_ns),
                first.rates + second.rates,
            )
            if best is None or conv.ts_ns > best.ts_ns:  # the freshest route
                best = conv
        return best

    def _hop(self, ccy: str, to: str) -> Conversion | None:
        rate = self._rates.get(f"{ccy}/{to}")
        inverse = False
        if rate is None:
            rate = self._rates.get(f"{to}/{ccy}")
            inverse = True
        if rate is None:
            return None
        cost, proceeds, mid = _leg(rate, inverse)
        return Conversion(cost, proceeds, mid, rate.ts_source_ns, ((rate.pair, rate.rate),))

    def _currencies(self) -> set[str]:
        out: set[str] = set()
        for pair in self._rates:
            base, _, quote = pair.partition("/")
            out.add(base)
            out.add(quote)
        return out
