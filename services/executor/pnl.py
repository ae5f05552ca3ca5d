"""Realised PnL of an arbitrage from its fills: exact per currency, then one rule to convert.

Per fill (``notional = price * quantity``), in the quote currency of its market:
    sell: + notional, buy: - notional;
    fee: - fee when charged in the quote, - fee * price when charged in the base asset
    (valued at the fill's own price), - fee in its own asset otherwise.
Summed per currency these are exact Decimals (NUMERIC in PostgreSQL), so the result
reconciles to the cent with ``SELECT ... FROM fills``.

Conversion into the reference currency uses the recorded FX rates (``pair -> rate``, the
price of the pair's base in its quote, e.g. ``USDT/KRW`` = KRW per USDT): an amount in
KRW becomes ``amount / rate(USDT/KRW)``, an amount in X becomes ``amount * rate(X/USDT)``.
Each converted amount is rounded half-even to 12 decimals, then summed; amounts already in
the reference currency are not rounded. The same rates and rule reproduce the figure exactly.

With a residual position the figure is the arbitrage's net cash flow: the residual's
cost is in it and the position itself is listed in the execution's ``residuals``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

from shared.models import Side, split_symbol

ZERO = Decimal(0)
REFERENCE_QUANTUM = Decimal("1e-12")


class FillLike(Protocol):
    @property
    def symbol(self) -> str: ...
    @property
    def side(self) -> Side: ...
    @property
    def price(self) -> Decimal: ...
    @property
    def quantity(self) -> Decimal: ...
    @property
    def fee(self) -> Decimal: ...
    @property
    def fee_asset(self) -> str: ...


class MissingFxRate(LookupError):
    def __init__(self, currency: str, reference: str) -> None:
        self.currency = currency
        super().__init__(f"no FX rate to convert {currency} into {reference} (need {reference}/{currency} "
                         f"or {currency}/{reference})")


@dataclass(frozen=True)
class ArbPnl:
    by_currency: dict[str, Decimal]
    fees_by_currency: dict[str, Decimal]
    realised: Decimal
    """In the reference currency, fees included."""
    fees: Decimal
    """Fees in the reference currency."""
    bought: Decimal
    """What the buys cost, in the reference currency (the capital the arbitrage used)."""
    currency: str
    fx_rates: dict[str, Decimal] = field(default_factory=dict)
    """The rates actually used."""
    missing: tuple[str, ...] = ()
    """Currencies left out of the reference figures for want of a rate (``strict=False``)."""


def cash_flows(fills: Iterable[FillLike]) -> tuple[dict[str, Decimal], dict[str, Decimal], dict[str, Decimal]]:
    """(net cash per currency, fees per currency, buy notional per currency), exact."""
    cash: dict[str, Decimal] = {}
    fees: dict[str, Decimal] = {}
    bought: dict[str, Decimal] = {}
    for f in fills:
        base, quote = split_symbol(f.symbol)
        notional = f.price * f.quantity
        cash[quote] = cash.get(quote, ZERO) + (notional if f.side == "sell" else -notional)
        if f.side == "buy":
            bought[quote] = bought.get(quote, ZERO) + notional
        if f.fee_asset == base:
            currency, fee = quote, f.fee * f.price
        else:
            currency, fee = f.fee_asset, f.fee
        cash[currency] = cash.get(currency, ZERO) - fee
        fees[currency] = fees.get(currency, ZERO) + fee
    return cash, fees, bought


def convert(amount: Decimal, currency: str, reference: str, fx: Mapping[str, Decimal],
            used: dict[str, Decimal] | None = None) -> Decimal:
    if currency == reference:
        return amount
    direct, inverse = f"{currency}/{reference}", f"{reference}/{currency}"
    if direct in fx:
        rate, value = fx[direct], amount * fx[direct]
        pair = direct
    elif inverse in fx:
        rate, value = fx[inverse], amount / fx[inverse]
        pair = inverse
    else:
        raise MissingFxRate(currency, reference)
    if used is not None:
        used[pair] = rate
    return value.quantize(REFERENCE_QUANTUM, rounding=ROUND_HALF_EVEN)


def realised_pnl(fills: Iterable[FillLike], reference: str, fx: Mapping[str, Decimal], *,
                 strict: bool = True) -> ArbPnl:
    """PnL of ``fills``. A currency without a rate raises ``MissingFxRate``, or with
    ``strict=False`` is left out of the reference figures and listed in ``missing``."""
    cash, fees, bought = cash_flows(fills)
    used: dict[str, Decimal] = {}
    missing: set[str] = set()

    def total(amounts: dict[str, Decimal]) -> Decimal:
        out = ZERO
        for currency, amount in sorted(amounts.items()):
            try:
                out += convert(amount, currency, reference, fx, used)
            except MissingFxRate:
                if strict:
                    raise
                missing.add(currency)
        return out

    return ArbPnl(cash, fees, total(cash), total(fees), total(bought), reference, used, tuple(sorted(missing)))
