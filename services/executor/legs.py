"""Leg risk: what to do when the legs of an arbitrage fill unevenly, as a pure function.

An arbitrage is balanced when every leg filled the same fraction of its quantity. When
one leg filled more than another, the account holds exposure it did not ask for (the
broken leg that loses bots money). Two remedies, chosen by configuration:

- **hedge**: complete the short legs, on their own venues, up to the fraction of the
  fullest leg, with an IOC whose limit is the best price plus a bounded slippage;
- **unwind**: take back the excess of the long legs, on their own venues, down to the
  fraction of the emptiest leg, with the same kind of bounded IOC on the opposite side.

Quantities are rounded down to the lot; what cannot be traded (below a lot, the minimum
quantity or the minimum notional) stays as a residual. Ratios are exact fractions, so
equal quantities never leave a phantom residual from rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Literal, TypeAlias

from shared.models import ExecutionStatus, OrderLeg, Residual, Side, split_symbol

Action: TypeAlias = Literal["hedge", "unwind"]
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class LegPosition:
    """One entry leg and how much of it is filled now, net of hedges (+) and unwinds (-)."""

    leg: OrderLeg
    filled: Decimal
    lot_size: Decimal = ZERO
    min_qty: Decimal = ZERO
    min_notional: Decimal = ZERO
    best_bid: Decimal | None = None
    best_ask: Decimal | None = None

    @property
    def ratio(self) -> Fraction:
        return Fraction(self.filled) / Fraction(self.leg.quantity)


@dataclass(frozen=True, slots=True)
class Correction:
    leg_index: int
    role: Action
    side: Side
    quantity: Decimal
    price: Decimal
    """Limit price: best price moved by at most the slippage bound (not yet on the tick grid)."""


class LegRiskPolicy:
    def __init__(self, max_slippage: Decimal) -> None:
        if not 0 < max_slippage < 1:
            raise ValueError("max_slippage is a fraction in (0, 1)")
        self.max_slippage = max_slippage

    def plan(self, positions: list[LegPosition], action: Action) -> list[Correction]:
        """The orders that would rebalance ``positions`` by ``action``; empty when balanced."""
        if len(positions) < 2:
            return []
        ratios = [p.ratio for p in positions]
        target = max(ratios) if action == "hedge" else min(ratios)
        out: list[Correction] = []
        for i, p in enumerate(positions):
            gap = Fraction(p.leg.quantity) * target - Fraction(p.filled)
            if action == "hedge" and gap > 0:
                side = p.leg.side
            elif action == "unwind" and gap < 0:
                side = _opposite(p.leg.side)
            else:
                continue
            quantity = _floor_to_lot(abs(gap), p.lot_size)
            price = self._bounded_price(p, side)
            if quantity <= 0 or quantity < p.min_qty or price * quantity < p.min_notional:
                continue
            out.append(Correction(i, action, side, quantity, price))
        return out

    def _bounded_price(self, p: LegPosition, side: Side) -> Decimal:
        if side == "buy":
            ref = p.best_ask if p.best_ask is not None else p.leg.price
            return ref * (1 + self.max_slippage)
        ref = p.best_bid if p.best_bid is not None else p.leg.price
        return ref * (1 - self.max_slippage)


def residuals(positions: list[LegPosition]) -> list[Residual]:
    """Exposure left: each leg's fill beyond the emptiest leg's fraction, signed in its base asset
    (long after a buy, short after a sell)."""
    if not positions:
        return []
    low = min(p.ratio for p in positions) if len(positions) > 1 else Fraction(0)
    out: list[Residual] = []
    for p in positions:
        excess = Fraction(p.filled) - Fraction(p.leg.quantity) * low
        if excess <= 0:
            continue
        amount = _to_decimal(excess)
        base, _ = split_symbol(p.leg.symbol)
        out.append(Residual(exchange=p.leg.exchange, asset=base, quantity=amount if p.leg.side == "buy" else -amount))
    return out


def classify(*, entry_complete: bool, any_fill: bool, hedged: bool, unwound: bool,
             residual: bool) -> ExecutionStatus:
    """The status of a finished arbitrage (``expired`` is decided before anything is sent)."""
    if not any_fill:
        return "failed"
    if residual:
        return "partial"
    if unwound:
        return "unwound"
    if hedged:
        return "hedged"
    return "completed" if entry_complete else "partial"


def _opposite(side: Side) -> Side:
    return "sell" if side == "buy" else "buy"


def _floor_to_lot(quantity: Fraction, lot: Decimal) -> Decimal:
    if lot <= 0:
        return _to_decimal(quantity)
    units = quantity // Fraction(lot)
    return Decimal(int(units)) * lot


def _to_decimal(value: Fraction, places: int = 18) -> Decimal:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    if exact * value.denominator == value.numerator:
        return exact
    return exact.quantize(Decimal(1).scaleb(-places))
