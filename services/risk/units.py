"""Fixed-point amounts for the shared risk state.

Redis and Lua hold every reserved amount as an integer count of 1e-8 units (of the
reference currency or of an asset), so adding and later subtracting the same reservation
returns a counter exactly to where it was: reservations never drift. Reservations round
up (never reserve less than needed); PnL rounds to nearest.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

SCALE = 100_000_000
_SCALE_D = Decimal(SCALE)


def units_up(amount: Decimal) -> int:
    return int((amount * _SCALE_D).to_integral_value(rounding=ROUND_CEILING))


def units_nearest(amount: Decimal) -> int:
    return int((amount * _SCALE_D).to_integral_value(rounding=ROUND_HALF_EVEN))


def units_of_float(amount: float) -> int:
    """Config limits and float notionals (shortest repr, so 1000.1 is exactly 1000.1)."""
    return units_up(Decimal(repr(amount)))


def to_decimal(units: int) -> Decimal:
    return Decimal(units) / _SCALE_D


def to_float(units: int) -> float:
    return units / SCALE
