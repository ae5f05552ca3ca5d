"""Walking a book's levels: what taking a quantity costs, and float-to-lot snapping.

Shared by the cores so "what the book gives for this quantity" is computed in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from shared.models import Level


def take(levels: Sequence[Level], qty: float, *, paying: bool) -> tuple[float, float] | None:
    """(quote amount, worst price) of taking ``qty`` from the top of ``levels``; None if they
    hold less.

    Float dust from summing the same sizes in another order may leave a sliver beyond the
    last level needed: it is charged at that level when ``paying`` and not credited when
    receiving, so the amount is never better than the book's.
    """
    left = qty
    amount = 0.0
    slack = qty * 1e-12
    for price, size in levels:
        if size >= left - slack:
            return amount + (left if paying or left <= size else size) * price, price
        amount += size * price
        left -= size
    return None


def base_for(asks: Sequence[Level], spend: float) -> float:
    """Base quantity that ``spend`` of quote buys walking ``asks``, before fees."""
    base = 0.0
    left = spend
    for price, size in asks:
        cost = price * size
        if cost >= left:
            return base + left / price
        base += size
        left -= cost
    return base


def snap(q: float) -> Decimal:
    """``q`` as a Decimal of 14 significant digits.

    A float sum of exchange sizes is off by a few ulps (5.374021999999999 for 5.374022);
    flooring that to the lot would lose a whole lot. Fourteen digits keep every real step
    (a lot of 1e-8 on a million units) and drop the dust.
    """
    return Decimal(f"{q:.14g}")
