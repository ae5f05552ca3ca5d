"""The fill simulator: how a taker order fills against a book, deterministically.

Paper trading and the backtest use this one core. It walks the book level by level as it
is when the order arrives (``sent + latency``; the caller picks that book), never past the
order's limit price, takes the exchange's taker fee in the asset that exchange charges it
in, and refuses what the exchange would refuse (a buy the account cannot pay for, a sell of
more than it holds). IOC cancels the unfilled rest; FOK fills all or nothing.

It does no I/O and reads no clock: the book, the arrival time and the balances come in as
arguments, so the same inputs always give the same fills. Fill ids are derived from the
client order id and the fill's index, so re-running a simulation yields the same keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from services.executor.fees import quote_needed, taker_fee
from shared.models import BookSnapshot, OrderLeg, OrderStatus, Side, split_symbol
from shared.money import to_decimal

ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class SimulatedFill:
    fill_id: str
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_asset: str


@dataclass(frozen=True, slots=True)
class BalanceDelta:
    exchange: str
    asset: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class SimulationResult:
    status: OrderStatus
    """FILLED, CANCELED (IOC rest / FOK not fillable, fills may be non-empty) or REJECTED."""
    fills: tuple[SimulatedFill, ...]
    reason: str
    ts_ns: int

    @property
    def filled_quantity(self) -> Decimal:
        return sum((f.quantity for f in self.fills), ZERO)

    @property
    def average_price(self) -> Decimal | None:
        qty = self.filled_quantity
        return sum((f.price * f.quantity for f in self.fills), ZERO) / qty if qty else None


class Balances(Protocol):
    """What an account can spend: PostgreSQL rows in paper, a dict in the backtest."""

    def available(self, exchange: str, asset: str) -> Decimal: ...


class InsufficientFunds(Exception):
    pass


@dataclass
class InMemoryBalances:
    """Balances kept in memory (the backtest), moved by the same deltas paper writes to PostgreSQL."""

    free: dict[tuple[str, str], Decimal] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, balances: Mapping[str, Mapping[str, Decimal | float | str]]) -> InMemoryBalances:
        return cls({(ex, asset): to_decimal(v) for ex, assets in balances.items() for asset, v in assets.items()})

    def available(self, exchange: str, asset: str) -> Decimal:
        return self.free.get((exchange, asset), ZERO)

    def apply(self, deltas: Iterable[BalanceDelta]) -> None:
        deltas = list(deltas)
        after = dict(self.free)
        for d in deltas:
            after[(d.exchange, d.asset)] = after.get((d.exchange, d.asset), ZERO) + d.amount
        negative = [k for k, v in after.items() if v < 0]
        if negative:
            raise InsufficientFunds(f"balance would go negative: {negative}")
        self.free = after


class Traded(Protocol):
    @property
    def price(self) -> Decimal: ...
    @property
    def quantity(self) -> Decimal: ...
    @property
    def fee(self) -> Decimal: ...
    @property
    def fee_asset(self) -> str: ...


def fill_deltas(exchange: str, symbol: str, side: Side, fill: Traded) -> list[BalanceDelta]:
    """How one fill moves the account: the traded assets, then the fee in its own asset."""
    base, quote = split_symbol(symbol)
    notional = fill.price * fill.quantity
    moves: dict[str, Decimal] = {base: fill.quantity, quote: -notional} if side == "buy" else {
        base: -fill.quantity, quote: notional}
    moves[fill.fee_asset] = moves.get(fill.fee_asset, ZERO) - fill.fee
    return [BalanceDelta(exchange, asset, amount) for asset, amount in moves.items() if amount]


class FillSimulator:
    def __init__(self, *, latency_ns: int = 0, max_book_age_ns: int | None = None) -> None:
        self.latency_ns = latency_ns
        self.max_book_age_ns = max_book_age_ns

    def arrival_ns(self, sent_ns: int) -> int:
        """When an order sent at ``sent_ns`` meets the book."""
        return sent_ns + self.latency_ns

    def fill(
        self,
        order: OrderLeg,
        book: BookSnapshot | None,
        arrival_ns: int,
        *,
        fee_rate: Decimal,
        balances: Balances | None = None,
    ) -> SimulationResult:
        """Fill ``order`` against ``book`` (the book as it is at ``arrival_ns``)."""

        def done(status: OrderStatus, reason: str, fills: tuple[SimulatedFill, ...] = ()) -> SimulationResult:
            return SimulationResult(status, fills, reason, arrival_ns)

        base, quote = split_symbol(order.symbol)
        limit = order.price if order.order_type == "limit" else None
        if order.quantity <= 0:
            return done("REJECTED", "quantity must be positive")
        if order.time_in_force not in ("IOC", "FOK"):
            return done("REJECTED", f"paper orders are IOC or FOK, not {order.time_in_force}")
        if book is None:
            return done("REJECTED", "no book for this market")
        if book.status != "synced" or (
            self.max_book_age_ns is not None and arrival_ns - book.ts_recv_ns > self.max_book_age_ns
        ):
            return done("REJECTED", "book is stale")
        if balances is not None:
            reason = _unaffordable(order, limit, fee_rate, balances, base, quote)
            if reason:
                return done("REJECTED", reason)

        fills = self._walk(order, book, limit, fee_rate, base, quote)
        filled = sum((f.quantity for f in fills), ZERO)
        if order.time_in_force == "FOK" and filled < order.quantity:
            return done("CANCELED", "FOK: not enough liquidity within the limit")
        if balances is not None and limit is None and order.side == "buy":
            cost = sum((f.price * f.quantity for f in fills), ZERO)
            if quote_needed(order.exchange, cost, Decimal(1), fee_rate) > balances.available(order.exchange, quote):
                return done("REJECTED", f"insufficient {quote} balance")
        if filled == order.quantity:
            return done("FILLED", "", fills)
        reason = "IOC: rest cancelled" if fills else "IOC: nothing within the limit"
        return done("CANCELED", reason, fills)

    def _walk(self, order: OrderLeg, book: BookSnapshot, limit: Decimal | None, fee_rate: Decimal,
              base: str, quote: str) -> tuple[SimulatedFill, ...]:
        levels = book.asks if order.side == "buy" else book.bids
        remaining = order.quantity
        fills: list[SimulatedFill] = []
        for raw_price, raw_size in levels:
            if remaining <= 0:
                break
            price, size = to_decimal(raw_price), to_decimal(raw_size)
            if limit is not None and (price > limit if order.side == "buy" else price < limit):
                break
            if size <= 0:
                continue
            take = min(remaining, size)
            fee, asset = taker_fee(order.exchange, order.side, price, take, fee_rate, base, quote)
            fills.append(SimulatedFill(f"{order.client_order_id}-{len(fills)}", price, take, fee, asset))
            remaining -= take
        return tuple(fills)


def _unaffordable(order: OrderLeg, limit: Decimal | None, fee_rate: Decimal, balances: Balances,
                  base: str, quote: str) -> str:
    # Exchanges check the whole order against free balance before matching (a limit buy
    # locks limit * quantity), so paper refuses the whole order rather than filling part.
    if order.side == "sell":
        have = balances.available(order.exchange, base)
        return f"insufficient {base} balance: need {order.quantity}, have {have}" if have < order.quantity else ""
    if limit is None:
        return ""
    need = quote_needed(order.exchange, limit, order.quantity, fee_rate)
    have = balances.available(order.exchange, quote)
    return f"insufficient {quote} balance: need {need}, have {have}" if have < need else ""
