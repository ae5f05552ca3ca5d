"""Executing an approved intent in the backtest, step for step as the paper executor does.

The executor service (``services/executor/execution.py``) sequences an arbitrage around
PostgreSQL: entry legs prepared on the instrument grid (``prepare``), sent together, each
meeting the book as it is when it arrives (``FillSimulator``), balances moved by
``fill_deltas``; then the leg-risk rounds (``LegRiskPolicy.plan``, corrective client ids
from ``correction_id``, limits put on the tick with ``bounded_to_tick``); then residuals,
``classify`` and ``realised_pnl`` with the latest FX rates. This module runs that same
sequence with the same functions, against ``InMemoryBalances`` and the engine's books, as a
generator: it yields the simulated time it waits for (an order's arrival) and the engine
resumes it once every market event up to then has been applied.

What the service does that is not here: the database (exactly-once storage, advisory
locks, crash recovery) and live venues. Intents are handled one at a time; a replica handles
up to ``executor.concurrency`` at once, which differs only when an intent arrives before the
previous one has finished.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol, cast

from services.executor.execution import correction_id
from services.executor.fills import FillSimulator, InMemoryBalances, SimulatedFill, fill_deltas
from services.executor.legs import Action, LegPosition, LegRiskPolicy, classify, residuals
from services.executor.markets import PreparedOrder, Role, best_prices, bounded_to_tick, fallback_instrument, prepare
from services.executor.orders import OrderStateMachine
from services.executor.pnl import cash_flows, realised_pnl
from shared.config import Config
from shared.models import (
    Balance,
    BookSnapshot,
    Execution,
    ExecutionLeg,
    ExecutionStatus,
    Fill,
    FxRate,
    Instrument,
    OrderIntent,
    OrderLeg,
    OrderStatus,
    Residual,
    split_symbol,
)

ZERO = Decimal(0)


class MarketView(Protocol):
    """What the executor reads of the market: the engine's clock, latest books and FX rates."""

    @property
    def now(self) -> int: ...

    def book(self, exchange: str, symbol: str) -> BookSnapshot | None: ...

    def fx(self, pair: str) -> FxRate | None: ...


@dataclass
class OrderRecord:
    """One order of an arbitrage, as the executor's ``orders`` row holds it."""

    order: PreparedOrder
    status: OrderStatus = "NEW"
    filled: Decimal = ZERO
    fills: list[SimulatedFill] = field(default_factory=list)
    reason: str = ""
    ts_ns: int = 0

    @property
    def leg(self) -> OrderLeg:
        return self.order.leg

    def execution_leg(self) -> ExecutionLeg:
        notional = sum((f.price * f.quantity for f in self.fills), ZERO)
        leg = self.leg
        return ExecutionLeg(
            client_order_id=leg.client_order_id, exchange=leg.exchange, symbol=leg.symbol, side=leg.side,
            status=self.status, quantity=leg.quantity, filled_quantity=self.filled,
            average_price=notional / self.filled if self.filled else None,
            fee=sum((f.fee for f in self.fills), ZERO), fee_asset=max((f.fee_asset for f in self.fills), default=""),
            role=cast(Literal["entry", "hedge", "unwind"], self.order.role))  # arbitrage legs never transfer


@dataclass
class Outcome:
    """What the service would publish for an intent."""

    intent: OrderIntent
    execution: Execution
    fills: list[Fill]
    orders: list[OrderRecord]
    balances: list[Balance]
    started_ns: int


class Executor:
    def __init__(self, cfg: Config, instruments: Mapping[tuple[str, str], Instrument], balances: InMemoryBalances,
                 order_latency: Mapping[str, Callable[[], int]]) -> None:
        self.cfg = cfg
        self.instruments = instruments
        self.balances = balances
        self.order_latency = order_latency
        self.reference = cfg.trading.reference_currency
        ex = cfg.executor
        self.simulator = FillSimulator(max_book_age_ns=ex.max_book_age_ms * 1_000_000)
        self.rounds: list[Action] = [ex.leg_risk_policy]
        if ex.leg_risk_fallback != "none":
            self.rounds.append(ex.leg_risk_fallback)
        self.policy = LegRiskPolicy(Decimal(repr(ex.max_slippage_bps)) / 10_000)
        self._fallback: dict[tuple[str, str], Instrument] = {}

    def instrument(self, exchange: str, symbol: str) -> tuple[Instrument, bool]:
        """The published instrument, or (as the service) the configured fee without a grid."""
        found = self.instruments.get((exchange, symbol))
        if found is not None:
            return found, True
        key = (exchange, symbol)
        if key not in self._fallback:
            fee = Decimal(repr(self.cfg.exchanges.get(exchange).taker_fee))
            self._fallback[key] = fallback_instrument(exchange, symbol, fee)
        return self._fallback[key], False

    def _prepare(self, leg: OrderLeg, role: Role) -> PreparedOrder:
        instrument, known = self.instrument(leg.exchange, leg.symbol)
        return prepare(leg, instrument, known=known, role=role, require_rules=False)

    # ------------------------------------------------------------------ one intent

    def execute(self, intent: OrderIntent, market: MarketView) -> Generator[int, None, Outcome]:
        started = market.now
        records: dict[str, OrderRecord] = {}
        if intent.expires_ns and started > intent.expires_ns:
            for leg in intent.legs:
                instrument, _ = self.instrument(leg.exchange, leg.symbol)
                late = f"intent received {(started - intent.expires_ns) / 1e6:.0f} ms after it expired"
                records[leg.client_order_id] = OrderRecord(PreparedOrder(leg, instrument, "entry", late), "EXPIRED",
                                                           reason=late, ts_ns=started)
            return self._outcome(intent, records, "expired", [], market, started)
        entry = [self._prepare(leg, "entry") for leg in intent.legs]
        yield from self._run(entry, records, market)
        actions: tuple[Action, ...] = ("hedge", "unwind")
        owners = {correction_id(leg.client_order_id, action, r): (i, action, r)
                  for i, leg in enumerate(intent.legs) for r in range(1, len(self.rounds) + 1) for action in actions}
        for round_no, action in enumerate(self.rounds, 1):
            plan = self.policy.plan(self._positions(intent, records, owners, market), action)
            if not plan:
                break
            orders = []
            for c in plan:
                leg = intent.legs[c.leg_index]
                instrument, known = self.instrument(leg.exchange, leg.symbol)
                price = bounded_to_tick(instrument, c.price, c.side) if known else c.price
                correction = OrderLeg(client_order_id=correction_id(leg.client_order_id, c.role, round_no),
                                      exchange=leg.exchange, symbol=leg.symbol, side=c.side, price=price,
                                      quantity=c.quantity, time_in_force="IOC")
                orders.append(prepare(correction, instrument, known=known, role=c.role, require_rules=False))
            yield from self._run(orders, records, market)
        positions = self._positions(intent, records, owners, market)
        left = residuals(positions)
        entry_records = [records[leg.client_order_id] for leg in intent.legs]
        corrections = [r for cid, r in records.items() if cid in owners]
        any_fill = any(r.fills for r in records.values())
        status = classify(
            entry_complete=all(r.filled == r.leg.quantity for r in entry_records),
            any_fill=any_fill,
            hedged=any(r.order.role == "hedge" and r.filled > 0 for r in corrections),
            unwound=any(r.order.role == "unwind" and r.filled > 0 for r in corrections),
            residual=bool(left),
        )
        return self._outcome(intent, records, status, left, market, started)

    def _run(self, orders: list[PreparedOrder], records: dict[str, OrderRecord],
             market: MarketView) -> Generator[int, None, None]:
        """Send ``orders`` together; each meets its book when it arrives; then fill them in order."""
        sent = market.now
        pending: list[tuple[int, int, OrderRecord]] = []
        for i, order in enumerate(orders):
            record = records[order.client_order_id] = OrderRecord(order, ts_ns=sent)
            if order.rejection:
                self._settle(record, "REJECTED", [], order.rejection)
                continue
            pending.append((sent + self.order_latency[order.leg.exchange](), i, record))
        books: dict[int, BookSnapshot | None] = {}
        for arrival, i, record in sorted(pending, key=lambda p: (p[0], p[1])):
            if arrival > market.now:
                yield arrival
            books[i] = market.book(record.leg.exchange, record.leg.symbol)
        for arrival, i, record in pending:  # filled in the order sent, each with its own book and time
            order = record.order
            result = self.simulator.fill(order.leg, books[i], arrival, fee_rate=Decimal(order.instrument.taker_fee),
                                         balances=self.balances)
            for f in result.fills:
                self.balances.apply(fill_deltas(order.leg.exchange, order.leg.symbol, order.leg.side, f))
            record.ts_ns = arrival
            self._settle(record, result.status, list(result.fills), result.reason)

    @staticmethod
    def _settle(record: OrderRecord, status: OrderStatus, fills: list[SimulatedFill], reason: str) -> None:
        machine = OrderStateMachine(record.leg.client_order_id, record.leg.quantity, record.status, record.filled)
        record.fills.extend(fills)
        filled = sum((f.quantity for f in record.fills), ZERO)
        machine.settle(status, filled, reason)
        record.status, record.filled, record.reason = machine.status, filled, reason

    def _positions(self, intent: OrderIntent, records: dict[str, OrderRecord],
                   owners: dict[str, tuple[int, Action, int]], market: MarketView) -> list[LegPosition]:
        net = [records[leg.client_order_id].filled for leg in intent.legs]
        for cid, record in records.items():
            owner = owners.get(cid)
            if owner is not None:
                net[owner[0]] += record.filled if owner[1] == "hedge" else -record.filled
        positions = []
        for i, leg in enumerate(intent.legs):
            stored = records[leg.client_order_id].leg
            instrument, _ = self.instrument(leg.exchange, leg.symbol)
            bid, ask = best_prices(market.book(leg.exchange, leg.symbol))
            positions.append(LegPosition(stored, net[i], instrument.lot_size, instrument.min_qty,
                                         instrument.min_notional, bid, ask))
        return positions

    # ------------------------------------------------------------------ results

    def _outcome(self, intent: OrderIntent, records: dict[str, OrderRecord], status: ExecutionStatus,
                 left: list[Residual], market: MarketView, started: int) -> Outcome:
        now = market.now
        fills = [Fill(fill_id=f.fill_id, client_order_id=r.leg.client_order_id, arb_id=intent.arb_id,
                      exchange=r.leg.exchange, symbol=r.leg.symbol, side=r.leg.side, price=f.price,
                      quantity=f.quantity, fee=f.fee, fee_asset=f.fee_asset, mode="backtest", ts_ns=r.ts_ns,
                      ts_origin_ns=intent.ts_origin_ns)
                 for r in records.values() for f in r.fills]
        fills.sort(key=lambda f: (f.ts_ns, f.client_order_id, f.fill_id))
        rates: dict[str, Decimal] = {}
        cash, fees, bought = cash_flows(fills)
        for c in sorted((set(cash) | set(fees) | set(bought)) - {self.reference}):
            for pair in (f"{self.reference}/{c}", f"{c}/{self.reference}"):
                rate = market.fx(pair)
                if rate is not None:
                    rates[pair] = Decimal(repr(rate.rate))
        pnl = realised_pnl(fills, self.reference, rates, strict=False)
        execution = Execution(
            arb_id=intent.arb_id, signal_id=intent.signal_id, strategy=intent.strategy, status=status,
            legs=[r.execution_leg() for r in records.values()], realised_pnl=pnl.realised,
            pnl_currency=self.reference, fees=pnl.fees, notional=pnl.bought, residuals=left, ts_ns=now,
            ts_origin_ns=intent.ts_origin_ns, pnl_by_currency=pnl.by_currency, fx_rates=pnl.fx_rates)
        touched = sorted({(f.exchange, a) for f in fills for a in (*split_symbol(f.symbol), f.fee_asset)})
        balances = [Balance(exchange=ex, asset=asset, free=self.balances.available(ex, asset), mode="backtest",
                            ts_ns=now) for ex, asset in touched]
        return Outcome(intent, execution, fills, list(records.values()), balances, started)
