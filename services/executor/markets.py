"""Trading rules and market data the executor reads: instruments, latest books, FX rates.

``prepare`` puts an order on the instrument's grid (price to the tick, size down to the lot,
with Decimal) and refuses what the exchange would refuse (zero size, below the minimum
quantity or notional) before anything is sent. ``MarketData`` reads what the collector
keeps in Redis: ``instruments`` (HGET per exchange), ``latest_book`` and ``fx_latest``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeAlias

import msgspec
from msgspec.structs import replace

from shared.config import Config
from shared.models import BookSnapshot, FxRate, Instrument, OrderLeg, Side, split_symbol
from shared.money import meets_minimums, round_price, round_qty, round_to_step, tick_for, to_decimal
from shared.runtime import Bus

Role: TypeAlias = Literal["entry", "hedge", "unwind", "transfer"]
"""``transfer``: a conversion step of a live rebalancing transfer (not part of an arbitrage)."""

_instrument_decoder = msgspec.json.Decoder(Instrument)
_book_decoder = msgspec.json.Decoder(BookSnapshot)
_fx_decoder = msgspec.json.Decoder(FxRate)


def native_symbol(exchange: str, symbol: str) -> str:
    """The exchange's own market code when no instrument record says it."""
    base, quote = split_symbol(symbol)
    if exchange == "upbit":
        return f"{quote}-{base}"
    return f"{base}{quote}"


def fallback_instrument(exchange: str, symbol: str, taker_fee: Decimal) -> Instrument:
    """No trading rules known: no grid (tick and lot 0 leave values as they are), config fee."""
    base, quote = split_symbol(symbol)
    return Instrument(exchange=exchange, symbol=symbol, native=native_symbol(exchange, symbol), base=base,
                      quote=quote, tick_size=Decimal(0), lot_size=Decimal(0), taker_fee=taker_fee,
                      maker_fee=taker_fee)


@dataclass(frozen=True, slots=True)
class PreparedOrder:
    leg: OrderLeg
    """On the instrument's grid."""
    instrument: Instrument
    role: Role = "entry"
    rejection: str = ""
    """Why it must not be sent (empty when it may)."""

    @property
    def client_order_id(self) -> str:
        return self.leg.client_order_id


def prepare(leg: OrderLeg, instrument: Instrument, *, known: bool, role: Role = "entry",
            require_rules: bool = False) -> PreparedOrder:
    """Round ``leg`` to the instrument's tick and lot and check the exchange's minimums."""
    if require_rules and not known:
        return PreparedOrder(leg, instrument, role, "no trading rules (tick, lot) known for this market")
    if require_rules and (leg.order_type != "limit" or leg.time_in_force == "GTC"):
        # Live legs are limit IOC/FOK: nothing may rest on a book after the arbitrage is over.
        return PreparedOrder(leg, instrument, role, f"live orders are limit IOC or FOK, not "
                                                    f"{leg.order_type} {leg.time_in_force}")
    price = round_price(instrument, leg.price, leg.side) if leg.order_type == "limit" else leg.price
    quantity = round_qty(instrument, leg.quantity)
    rounded = replace(leg, price=price, quantity=quantity)
    if quantity <= 0:  # keep the asked size: the stored order must show what was refused
        return PreparedOrder(leg, instrument, role, f"quantity {leg.quantity} rounds to 0 on lot "
                                                    f"{instrument.lot_size}")
    if not meets_minimums(instrument, price, quantity):
        return PreparedOrder(rounded, instrument, role,
                             f"below the minimum (min qty {instrument.min_qty}, min notional "
                             f"{instrument.min_notional}): {quantity} @ {price}")
    return PreparedOrder(rounded, instrument, role)


def bounded_to_tick(instrument: Instrument, price: Decimal, side: Side) -> Decimal:
    """A slippage-bounded limit on the tick grid without passing the bound: buys down, sells up."""
    return round_to_step(price, tick_for(instrument, price), up=side == "sell")


def best_prices(book: BookSnapshot | None) -> tuple[Decimal | None, Decimal | None]:
    if book is None or book.status != "synced":
        return None, None
    bid = to_decimal(book.bids[0][0]) if book.bids else None
    ask = to_decimal(book.asks[0][0]) if book.asks else None
    return bid, ask


class MarketData:
    """Instruments, books and FX rates from Redis, as the collector wrote them."""

    def __init__(self, bus: Bus, cfg: Config, *, instrument_ttl_s: float = 5.0) -> None:
        self.bus = bus
        self.cfg = cfg
        self.instrument_ttl_s = instrument_ttl_s
        self._instruments: dict[tuple[str, str], tuple[float, Instrument, bool]] = {}

    async def instrument(self, exchange: str, symbol: str) -> tuple[Instrument, bool]:
        """The instrument and whether it came from the exchange (False: config fee, no grid)."""
        key = (exchange, symbol)
        cached = self._instruments.get(key)
        now = time.monotonic()
        if cached and now - cached[0] < self.instrument_ttl_s:
            return cached[1], cached[2]
        raw = await self.bus.redis.hget(self.bus.keys.instruments(exchange), symbol)
        if raw:
            instrument, known = _instrument_decoder.decode(raw), True
        else:
            fee = Decimal(repr(self.cfg.exchanges.get(exchange).taker_fee))
            instrument, known = fallback_instrument(exchange, symbol, fee), False
        self._instruments[key] = (now, instrument, known)
        return instrument, known

    async def book(self, exchange: str, symbol: str) -> BookSnapshot | None:
        raw = await self.bus.redis.get(self.bus.keys.latest_book(exchange, symbol))
        return _book_decoder.decode(raw) if raw else None

    async def fx(self, pairs: list[str]) -> dict[str, FxRate]:
        if not pairs:
            return {}
        raws = await self.bus.redis.mget([self.bus.keys.fx_latest(p) for p in pairs])
        return {p: _fx_decoder.decode(r) for p, r in zip(pairs, raws, strict=True) if r}
