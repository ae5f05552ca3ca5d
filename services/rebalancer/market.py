"""Prices the rebalancer needs, in exact decimals: conversions at the book and marks.

``ConversionMarket`` walks one (exchange, symbol) book with the taker fee, both ways:
forward (what an amount in yields) for paper execution, backward (what must go in for an
amount out) for planning; the backward answer is checked against the forward walk, so a
planned conversion always yields at least what the plan counts on, on the same book.
The fee is charged in the asset received, rounded up to its step; inputs are rounded up
and outputs down to each asset's step.

``Marks`` value every asset in the reference currency: the median mid of its books quoted
in the reference currency, else its books in another marked currency (KRW through the
``USDT/KRW`` rate), so routes through different assets compare in one unit.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from shared.models import BookSnapshot, FxRate, split_symbol
from shared.money import round_to_step, to_decimal

ZERO = Decimal(0)
ONE = Decimal(1)
DEFAULT_STEP = Decimal("0.00000001")

# Book walks divide by prices; 40 digits keep the error far below any asset's step.
_CTX = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)

Level = tuple[Decimal, Decimal]


def step_of(steps: Mapping[str, Decimal], asset: str) -> Decimal:
    return steps.get(asset, DEFAULT_STEP)


@dataclass(frozen=True, slots=True)
class Conversion:
    """The result of one conversion on one book."""

    amount_in: Decimal
    amount_out: Decimal
    """Received, net of the fee, rounded down to the asset's step."""
    fee: Decimal
    """Taker fee, in the asset received."""
    worst_price: Decimal


@dataclass(frozen=True, slots=True)
class ConversionMarket:
    exchange: str
    symbol: str
    base: str
    quote: str
    bids: tuple[Level, ...]
    """Best first."""
    asks: tuple[Level, ...]
    taker_fee: Decimal
    steps: Mapping[str, Decimal] = field(default_factory=dict)

    @classmethod
    def from_book(cls, book: BookSnapshot, taker_fee: Decimal, steps: Mapping[str, Decimal]) -> ConversionMarket:
        base, quote = split_symbol(book.symbol)
        return cls(
            exchange=book.exchange,
            symbol=book.symbol,
            base=base,
            quote=quote,
            bids=tuple((to_decimal(p), to_decimal(s)) for p, s in book.bids if p > 0 and s > 0),
            asks=tuple((to_decimal(p), to_decimal(s)) for p, s in book.asks if p > 0 and s > 0),
            taker_fee=taker_fee,
            steps=steps,
        )

    def mid(self) -> Decimal | None:
        if not self.bids or not self.asks:
            return None
        return _CTX.divide(self.bids[0][0] + self.asks[0][0], Decimal(2))

    def converts(self, from_asset: str, to_asset: str) -> bool:
        return (from_asset, to_asset) in ((self.quote, self.base), (self.base, self.quote))

    # ------------------------------------------------------------------ forward

    def convert(self, from_asset: str, amount_in: Decimal) -> Conversion | None:
        """Sell ``amount_in`` of ``from_asset`` at the book; None if the book is too thin."""
        if amount_in <= 0:
            return None
        if from_asset == self.quote:  # buy base, spending quote
            walked = _spend_quote(self.asks, amount_in)
            to_asset = self.base
        elif from_asset == self.base:  # sell base for quote
            walked = _sell_base(self.bids, amount_in)
            to_asset = self.quote
        else:
            raise ValueError(f"{self.exchange} {self.symbol} does not convert {from_asset}")
        if walked is None:
            return None
        gross, worst = walked
        step = step_of(self.steps, to_asset)
        fee = round_to_step(_CTX.multiply(gross, self.taker_fee), step, up=True)
        net = round_to_step(gross - fee, step, up=False)  # the remainder below one step is lost
        if net <= 0:
            return None
        return Conversion(amount_in=amount_in, amount_out=net, fee=fee, worst_price=worst)

    # ------------------------------------------------------------------ backward

    def input_for(self, from_asset: str, amount_out: Decimal) -> Decimal | None:
        """Least ``from_asset`` (on its step) whose conversion yields at least ``amount_out``."""
        if amount_out <= 0:
            return None
        if from_asset not in (self.base, self.quote):
            raise ValueError(f"{self.exchange} {self.symbol} does not convert {from_asset}")
        buying = from_asset == self.quote
        # One extra output step absorbs the fee's rounding up and the output's rounding down.
        out_step = step_of(self.steps, self.base if buying else self.quote)
        gross = _CTX.divide(round_to_step(amount_out, out_step, up=True) + out_step, ONE - self.taker_fee)
        exact = _quote_for_base(self.asks, gross) if buying else _base_for_quote(self.bids, gross)
        if exact is None:
            return None
        amount_in = round_to_step(exact, step_of(self.steps, from_asset), up=True)
        done = self.convert(from_asset, amount_in)
        if done is None or done.amount_out < amount_out:  # cannot happen with 40 digits; never trust it blindly
            return None
        return amount_in


def _spend_quote(asks: tuple[Level, ...], budget: Decimal) -> tuple[Decimal, Decimal] | None:
    got, left, worst = ZERO, budget, ZERO
    for price, size in asks:
        cost = _CTX.multiply(price, size)
        worst = price
        if left <= cost:
            return got + _CTX.divide(left, price), worst
        got += size
        left -= cost
    return None


def _sell_base(bids: tuple[Level, ...], quantity: Decimal) -> tuple[Decimal, Decimal] | None:
    got, left, worst = ZERO, quantity, ZERO
    for price, size in bids:
        worst = price
        if left <= size:
            return got + _CTX.multiply(price, left), worst
        got += _CTX.multiply(price, size)
        left -= size
    return None


def _quote_for_base(asks: tuple[Level, ...], base: Decimal) -> Decimal | None:
    cost, left = ZERO, base
    for price, size in asks:
        if left <= size:
            return cost + _CTX.multiply(price, left)
        cost += _CTX.multiply(price, size)
        left -= size
    return None


def _base_for_quote(bids: tuple[Level, ...], quote: Decimal) -> Decimal | None:
    qty, left = ZERO, quote
    for price, size in bids:
        proceeds = _CTX.multiply(price, size)
        if left <= proceeds:
            return qty + _CTX.divide(left, price)
        qty += size
        left -= proceeds
    return None


# --------------------------------------------------------------------------- marks


class Marks:
    """Value of one unit of each asset in the reference currency."""

    def __init__(self, reference: str, values: Mapping[str, Decimal]) -> None:
        self.reference = reference
        self._values = dict(values)
        self._values[reference] = ONE

    def get(self, asset: str) -> Decimal | None:
        return self._values.get(asset)

    def value(self, asset: str, amount: Decimal) -> Decimal:
        mark = self._values.get(asset)
        if mark is None:
            raise KeyError(f"no price for {asset} in {self.reference}")
        return amount * mark

    def __contains__(self, asset: object) -> bool:
        return asset in self._values

    def as_dict(self) -> dict[str, Decimal]:
        return dict(self._values)

    @classmethod
    def from_market(cls, reference: str, markets: Iterable[ConversionMarket], fx: Iterable[FxRate]) -> Marks:
        values: dict[str, Decimal] = {reference: ONE}
        for rate in fx:  # "USDT/KRW" = 1380: one USDT buys 1380 KRW
            base, quote = split_symbol(rate.pair)
            if base == reference and rate.rate > 0:
                values.setdefault(quote, _CTX.divide(ONE, to_decimal(rate.rate)))
        mids = [(m.base, m.quote, m.mid()) for m in markets]
        for _ in range(3):  # a second pass values assets quoted in currencies marked by the first
            candidates: dict[str, list[Decimal]] = {}
            for base, quote, mid in mids:
                if mid is None or base in values or quote not in values:
                    continue
                candidates.setdefault(base, []).append(mid * values[quote])
            if not candidates:
                break
            for asset, prices in candidates.items():
                prices.sort()
                values[asset] = prices[(len(prices) - 1) // 2]
        return cls(reference, values)
