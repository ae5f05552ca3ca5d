"""Exact money: Decimal rounding of order prices and sizes to an instrument's tick and lot.

Detection math runs on floats; everything sent to an exchange or written to the ledger
goes through here first. Conversions from float use the shortest repr (``Decimal(repr(x))``),
which gives back the exchange's original string for any price that was parsed from one.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from shared.models import Instrument, Side

ZERO = Decimal(0)


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def tick_for(instrument: Instrument, price: Decimal) -> Decimal:
    for threshold, tick in instrument.tick_table:
        if price >= threshold:
            return tick
    return instrument.tick_size


def round_to_step(value: Decimal, step: Decimal, *, up: bool) -> Decimal:
    if step <= 0:
        return value
    units = (value / step).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return units * step


def common_step(a: Decimal, b: Decimal) -> Decimal:
    """The smallest step that is a whole multiple of both ``a`` and ``b`` (a quantity traded on
    two markets must sit on both lot grids)."""
    if a <= 0:
        return b
    if b <= 0:
        return a
    exp = min(int(a.as_tuple().exponent), int(b.as_tuple().exponent))
    scale = Decimal(1).scaleb(exp)
    ia, ib = int(a / scale), int(b / scale)
    return Decimal(ia * ib // math.gcd(ia, ib)) * scale


def round_price(instrument: Instrument, price: float | Decimal, side: Side) -> Decimal:
    """A limit price on the tick grid, never less aggressive than asked: buys round up, sells down."""
    p = to_decimal(price)
    return round_to_step(p, tick_for(instrument, p), up=side == "buy")


def round_qty(instrument: Instrument, quantity: float | Decimal) -> Decimal:
    """A size on the lot grid, rounded down (never more than the book or balance allows)."""
    return round_to_step(to_decimal(quantity), instrument.lot_size, up=False)


def meets_minimums(instrument: Instrument, price: Decimal, quantity: Decimal) -> bool:
    return quantity > 0 and quantity >= instrument.min_qty and price * quantity >= instrument.min_notional
