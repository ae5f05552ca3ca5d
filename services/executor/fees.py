"""In which asset each exchange charges the taker fee, and how much it is.

- Binance spot: the commission is taken from the asset received: a buy pays in the base
  asset (bought BTC arrives net of the fee), a sell in the quote asset (Binance
  `faqs/commission_faq.md`: "the received amount is multiplied with the sum of the
  rates"). Paying in BNB at a discount is an account option we do not model: paper
  accounts always pay in the received asset.
- Upbit: the fee is always in the quote currency (KRW on KRW markets): a bid pays
  ``price * volume * (1 + fee)``, an ask receives ``price * volume * (1 - fee)``.
- Any other exchange: the received asset, the common spot convention (not verified per
  exchange; add a rule here before trading one).

Paper fees are exact Decimals; exchanges round commissions to the asset's precision
(Binance 8 decimals, Upbit KRW to the won for display), which paper does not copy.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, TypeAlias

from shared.models import Side

FeeAssetRule: TypeAlias = Literal["received", "quote"]

FEE_ASSET_RULES: dict[str, FeeAssetRule] = {
    "binance": "received",
    "upbit": "quote",
}
DEFAULT_FEE_ASSET_RULE: FeeAssetRule = "received"


def fee_rule(exchange: str) -> FeeAssetRule:
    return FEE_ASSET_RULES.get(exchange, DEFAULT_FEE_ASSET_RULE)


def fee_asset(exchange: str, side: Side, base: str, quote: str) -> str:
    if fee_rule(exchange) == "quote" or side == "sell":
        return quote
    return base


def taker_fee(exchange: str, side: Side, price: Decimal, quantity: Decimal, rate: Decimal,
              base: str, quote: str) -> tuple[Decimal, str]:
    """The fee of one fill and its asset."""
    asset = fee_asset(exchange, side, base, quote)
    if asset == base:
        return quantity * rate, asset
    return price * quantity * rate, asset


def quote_needed(exchange: str, price: Decimal, quantity: Decimal, rate: Decimal) -> Decimal:
    """Quote an exchange locks for a buy of ``quantity`` at limit ``price`` (fee included where
    the fee is charged in the quote asset)."""
    notional = price * quantity
    return notional * (1 + rate) if fee_rule(exchange) == "quote" else notional
