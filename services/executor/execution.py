"""Executing one arbitrage, exactly once, whatever crashes or redeliveries happen.

For each intent, under a PostgreSQL advisory lock on its ``arb_id`` (one replica at a time):

1. a finished arbitrage (its ``trades`` row exists) is not executed again: its stored
   fills, transitions and execution are published again (consumers key them by id);
2. an intent received after ``expires_ns`` is recorded EXPIRED and nothing is sent;
3. every leg's order row (NEW) is committed before the leg is sent; all legs go at once
   (``asyncio.gather``). A fresh intent's rows are stored in the round trip that takes the
   lock (only when the lock is granted and nothing of the arbitrage is stored yet). A leg
   whose row already exists is never sent again: live, it is looked up by client order id;
   paper, a row still NEW means its simulation was never stored, so it is simulated now;
4. when the legs filled unevenly, the leg-risk policy plans bounded-slippage IOCs (hedge
   or unwind, then the fallback). Their client ids derive from the leg's id, the action
   and the round, and a round's rows are committed together before any is sent, so a
   replay finds and reconciles them instead of planning new ones;
5. realised PnL is computed from the stored fills and the ``trades`` row written last.

Outputs are built from what PostgreSQL holds, after everything is stored; the consumer
publishes them and only then acknowledges the intent. Any database failure raises a
``Retryable``: the intent is retried in place and acknowledged only once stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection

from services.executor import ledger
from services.executor import metrics as m
from services.executor.fills import fill_deltas
from services.executor.legs import Action, LegPosition, LegRiskPolicy, classify, residuals
from services.executor.markets import MarketData, PreparedOrder, Role, best_prices, bounded_to_tick, prepare
from services.executor.orders import TERMINAL
from services.executor.pnl import cash_flows, realised_pnl
from services.executor.venues.base import HttpVenue, OrderStateUnknown, VenueResult
from services.executor.venues.paper import PaperVenue
from shared.config import EXCHANGES, Config
from shared.models import (
    Alert,
    Balance,
    Execution,
    ExecutionLeg,
    ExecutionStatus,
    Fill,
    OrderIntent,
    OrderLeg,
    OrderUpdate,
    Residual,
    split_symbol,
)
from shared.runtime import Retryable

log = logging.getLogger(__name__)

ZERO = Decimal(0)
CLIENT_ORDER_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
MAX_LEGS = 8


class InvalidIntent(ValueError):
    pass


class ArbitrageBusy(Retryable):
    """Another live replica is executing this arbitrage right now."""


class OrdersUnsettled(Retryable):
    """An exchange has not said what became of an order; look again later."""


def validate_intent(intent: OrderIntent) -> OrderIntent:
    """Refuse what must never reach an exchange; raises ``InvalidIntent`` with the reason."""
    if not intent.arb_id:
        raise InvalidIntent("arb_id is empty")
    if not 1 <= len(intent.legs) <= MAX_LEGS:
        raise InvalidIntent(f"an intent has 1 to {MAX_LEGS} legs, not {len(intent.legs)}")
    seen: set[str] = set()
    for i, leg in enumerate(intent.legs):
        where = f"legs[{i}]"
        if not CLIENT_ORDER_ID.match(leg.client_order_id):
            raise InvalidIntent(f"{where}.client_order_id {leg.client_order_id!r} must be 1-32 letters or digits")
        if leg.client_order_id in seen:
            raise InvalidIntent(f"{where}.client_order_id {leg.client_order_id!r} is used by another leg")
        seen.add(leg.client_order_id)
        if leg.exchange not in EXCHANGES:
            raise InvalidIntent(f"{where}.exchange {leg.exchange!r} is not a known exchange")
        try:
            split_symbol(leg.symbol)
        except ValueError as exc:
            raise InvalidIntent(f"{where}.symbol: {exc}") from None
        if leg.quantity <= 0 or not leg.quantity.is_finite():
            raise InvalidIntent(f"{where}.quantity {leg.quantity} must be positive")
        if leg.order_type == "limit" and (leg.price <= 0 or not leg.price.is_finite()):
            raise InvalidIntent(f"{where}.price {leg.price} must be positive")
    return intent


_intent_decoder = msgspec.json.Decoder(OrderIntent)


def decode_intent(raw: bytes) -> OrderIntent:
    """The ``orders`` decoder: a malformed or invalid intent raises ValueError, which sends it
    to the dead-letter stream at once with the reason (nothing is lost, nothing is sent)."""
    return validate_intent(_intent_decoder.decode(raw))


def correction_id(leg_client_order_id: str, action: Action, round_no: int) -> str:
    """Deterministic client id of a hedge/unwind order: 31 letters/digits, the same on every replay."""
    digest = hashlib.blake2b(f"{leg_client_order_id}:{action}:{round_no}".encode(), digest_size=15).hexdigest()
    return action[0] + digest


@dataclass
class Outputs:
    fills: list[Fill] = field(default_factory=list)
    updates: list[OrderUpdate] = field(default_factory=list)
    execution: Execution | None = None
    balances: list[Balance] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


class IntentHandler:
    def __init__(
        self,
        cfg: Config,
        *,
        db: ledger.Database,
        market: MarketData,
        paper: PaperVenue | None = None,
        live: dict[str, HttpVenue] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.market = market
        self.paper = paper
        self.live = live or {}
        self.clock_ns = clock_ns
        self.mode = cfg.trading.mode
        if self.mode == "paper" and paper is None:
            raise ValueError("paper mode needs a paper venue")
        self.session = cfg.session
        self.reference = cfg.trading.reference_currency
        ex = cfg.executor
        self.rounds: list[Action] = [ex.leg_risk_policy]
        if ex.leg_risk_fallback != "none":
            self.rounds.append(ex.leg_risk_fallback)
        self.policy = LegRiskPolicy(Decimal(repr(ex.max_slippage_bps)) / 10_000)
        self.grace_ns = ex.unknown_order_grace_ms * 1_000_000

    # ------------------------------------------------------------------ entry point

    async def handle(self, intent: OrderIntent) -> Outputs:
        now = self.clock_ns()
        expired = bool(intent.expires_ns) and now > intent.expires_ns
        # A fresh intent's entry orders are stored in the same round trip as the lock is taken
        # (if the lock is ours and nothing of the arbitrage is stored yet): ready to send after it.
        entry = None if expired else [await self._prepare(leg, "entry") for leg in intent.legs]
        new = None if entry is None else ledger.NewOrders(
            self.session, self.mode, intent.arb_id, intent.signal_id, entry, now + self.grace_ns, now)
        async with self.db.connection() as conn:
            key = ledger.lock_key(self.session, intent.arb_id)
            found = await ledger.lock_and_load(conn, key, intent.arb_id, new)
            if not found.locked:
                raise ArbitrageBusy(f"arbitrage {intent.arb_id} is being executed by another replica")
            try:
                if found.trade is None:
                    if not found.orders and expired:
                        await self._expire(conn, intent, self.clock_ns())
                    else:
                        await self._execute(conn, intent, found.orders, entry, found.inserted)
                return await self._outputs(conn, intent)
            finally:
                if not conn.broken and not conn.closed:
                    with contextlib.suppress(psycopg.Error):  # a lost session releases its locks anyway
                        await ledger.unlock(conn, key)

    # ------------------------------------------------------------------ execution

    async def _expire(self, conn: AsyncConnection, intent: OrderIntent, now: int) -> None:
        late_ms = (now - intent.expires_ns) / 1e6
        reason = f"intent received {late_ms:.0f} ms after it expired"
        legs = []
        for leg in intent.legs:
            instrument, _ = await self.market.instrument(leg.exchange, leg.symbol)
            order = PreparedOrder(leg, instrument, "entry", reason)
            await ledger.expire_order(conn, session=self.session, mode=self.mode, arb_id=intent.arb_id,
                                      signal_id=intent.signal_id, order=order, reason=reason, ts_ns=now)
            legs.append(ExecutionLeg(client_order_id=leg.client_order_id, exchange=leg.exchange, symbol=leg.symbol,
                                     side=leg.side, status="EXPIRED", quantity=leg.quantity, filled_quantity=ZERO))
        base, _ = split_symbol(intent.legs[0].symbol)
        await ledger.insert_trade(
            conn, session=self.session, mode=self.mode, arb_id=intent.arb_id, signal_id=intent.signal_id,
            strategy=intent.strategy, status="expired", asset=base, legs=legs, notional=ZERO, fees=ZERO,
            realised_pnl=ZERO, pnl_currency=self.reference, pnl_by_currency={}, fx_rates={},
            expected_profit=Decimal(repr(intent.expected_profit)), residuals=[], opened_ns=intent.ts_ns or now,
            closed_ns=now)

    async def _execute(self, conn: AsyncConnection, intent: OrderIntent, rows: dict[str, ledger.OrderRow],
                       entry: list[PreparedOrder] | None, inserted: dict[str, ledger.OrderRow]) -> None:
        if entry is None:
            entry = [await self._prepare(leg, "entry") for leg in intent.legs]
        rows.update(inserted)
        rows.update(await self._run(conn, intent, entry, rows, set(inserted)))
        owners = self._correction_owners(intent)
        for round_no, action in enumerate(self.rounds, 1):
            existing = [r for r in rows.values() if r.client_order_id in owners
                        and owners[r.client_order_id][2] == round_no]
            if existing:  # planned before a crash or a retry: finish those, never plan anew
                orders = [await self._from_row(r) for r in existing]
            else:
                positions = await self._positions(intent, rows, owners)
                plan = self.policy.plan(positions, action)
                if not plan:
                    break
                orders = []
                for c in plan:
                    leg = intent.legs[c.leg_index]
                    instrument, known = await self.market.instrument(leg.exchange, leg.symbol)
                    price = bounded_to_tick(instrument, c.price, c.side) if known else c.price
                    correction = OrderLeg(client_order_id=correction_id(leg.client_order_id, c.role, round_no),
                                          exchange=leg.exchange, symbol=leg.symbol, side=c.side, price=price,
                                          quantity=c.quantity, time_in_force="IOC")
                    orders.append(prepare(correction, instrument, known=known, role=c.role,
                                          require_rules=self.mode == "live"))
                log.warning("legs filled unevenly, correcting",
                            extra={"arb_id": intent.arb_id, "action": action, "round": round_no,
                                   "orders": [f"{o.leg.side} {o.leg.quantity} {o.leg.exchange}" for o in orders]})
            rows.update(await self._run(conn, intent, orders, rows))
        await self._finish(conn, intent, rows, owners)

    async def _prepare(self, leg: OrderLeg, role: Role) -> PreparedOrder:
        instrument, known = await self.market.instrument(leg.exchange, leg.symbol)
        return prepare(leg, instrument, known=known, role=role, require_rules=self.mode == "live")

    async def _from_row(self, row: ledger.OrderRow) -> PreparedOrder:
        """The order exactly as stored (the stored price and size are what was, or may have been, sent)."""
        instrument, _ = await self.market.instrument(row.exchange, row.symbol)
        leg = OrderLeg(client_order_id=row.client_order_id, exchange=row.exchange, symbol=row.symbol, side=row.side,
                       price=row.price if row.price is not None else ZERO, quantity=row.quantity,
                       order_type="limit" if row.order_type == "limit" else "market",
                       time_in_force="FOK" if row.time_in_force == "FOK" else
                       "GTC" if row.time_in_force == "GTC" else "IOC")
        role: Role = "hedge" if row.role == "hedge" else "unwind" if row.role == "unwind" else "entry"
        return PreparedOrder(leg, instrument, role)

    async def _run(self, conn: AsyncConnection, intent: OrderIntent, orders: list[PreparedOrder],
                   rows: dict[str, ledger.OrderRow], fresh: set[str] | None = None) -> dict[str, ledger.OrderRow]:
        """Store, send (or reconcile) and record ``orders``; their rows afterwards. ``fresh``:
        those among them whose rows the caller has just stored (never sent yet)."""
        now = self.clock_ns()
        fresh = set(fresh or ())
        new = [o for o in orders if o.client_order_id not in rows]
        if new:
            # One statement, one commit for the group (a replay sees all or none), durable
            # before anything is sent.
            inserted = await ledger.insert_orders(
                conn, session=self.session, mode=self.mode, arb_id=intent.arb_id, signal_id=intent.signal_id,
                orders=new, not_after_ns=now + self.grace_ns, ts_ns=now)
            rows.update(inserted)
            fresh.update(inserted)
            if len(inserted) < len(new):  # stored meanwhile (not under our lock): never sent as new
                rows.update(await ledger.load_orders_by_id(
                    conn, [o.client_order_id for o in new if o.client_order_id not in inserted]))
        pending = [await self._from_row(rows[o.client_order_id]) for o in orders
                   if rows[o.client_order_id].status not in TERMINAL]
        if pending:
            if self.mode == "paper":
                await self._run_paper(conn, pending, rows)
            else:
                await self._run_live(conn, pending, rows, fresh)
        current = await ledger.load_orders(conn, intent.arb_id)
        return {o.client_order_id: current[o.client_order_id] for o in orders}

    async def _run_paper(self, conn: AsyncConnection, orders: list[PreparedOrder],
                         rows: dict[str, ledger.OrderRow]) -> None:
        assert self.paper is not None
        sent = self.clock_ns()
        started = time.perf_counter()
        arrivals = await asyncio.gather(*(self.paper.arrive(o, sent) for o in orders))
        for o in orders:
            m.ORDER_SECONDS.labels(o.leg.exchange).observe(time.perf_counter() - started)
        keys = [(o.leg.exchange, asset) for o in orders for asset in split_symbol(o.leg.symbol)]
        # One commit for the group of orders, balances locked throughout; pipelined, so the
        # statements whose results are not read go out together.
        async with conn.pipeline(), conn.transaction():
            balances = await ledger.lock_balances(conn, self.session, self.mode, keys)
            for o, (book, arrival) in zip(orders, arrivals, strict=True):
                result = self.paper.execute(o, book, arrival, balances)
                for f in result.fills:
                    balances.apply(fill_deltas(o.leg.exchange, o.leg.symbol, o.leg.side, f))
                await ledger.record_outcome(conn, session=self.session, mode=self.mode,
                                            row=rows[o.client_order_id], result=result, ts_ns=arrival,
                                            paper_balances=True)

    async def _run_live(self, conn: AsyncConnection, orders: list[PreparedOrder], rows: dict[str, ledger.OrderRow],
                        fresh: set[str]) -> None:
        async def one(o: PreparedOrder) -> VenueResult:
            row = rows[o.client_order_id]
            venue = self.live.get(o.leg.exchange)
            if venue is None:
                if o.client_order_id in fresh:
                    return VenueResult("REJECTED", (), f"no live venue for {o.leg.exchange} (API keys missing)")
                raise OrderStateUnknown(f"no live venue to look up {o.client_order_id} on {o.leg.exchange}")
            if o.client_order_id in fresh:
                started = time.perf_counter()
                result = await venue.submit(o, row.not_after_ns)
                m.ORDER_SECONDS.labels(o.leg.exchange).observe(time.perf_counter() - started)
                return result
            return await venue.reconcile(o, row.not_after_ns)

        results = await asyncio.gather(*(one(o) for o in orders), return_exceptions=True)
        unsettled: list[str] = []
        failure: BaseException | None = None
        now = self.clock_ns()
        settled: list[tuple[ledger.OrderRow, VenueResult]] = []
        for o, result in zip(orders, results, strict=True):
            row = rows[o.client_order_id]
            if isinstance(result, OrderStateUnknown):
                await ledger.mark_unknown(conn, row, str(result), now)
                unsettled.append(f"{o.client_order_id}: {result}")
            elif isinstance(result, BaseException):
                failure = failure or result
            else:
                settled.append((row, result))
        if settled:
            async with conn.transaction():
                for row, result in settled:
                    await ledger.record_outcome(conn, session=self.session, mode=self.mode, row=row, result=result,
                                                ts_ns=now)
        if failure is not None:
            raise failure
        if unsettled:
            raise OrdersUnsettled("; ".join(unsettled))

    def _correction_owners(self, intent: OrderIntent) -> dict[str, tuple[int, Action, int]]:
        """Every possible correction client id -> (leg index, action, round)."""
        out: dict[str, tuple[int, Action, int]] = {}
        for i, leg in enumerate(intent.legs):
            for round_no in range(1, len(self.rounds) + 1):
                for action in ("hedge", "unwind"):
                    out[correction_id(leg.client_order_id, action, round_no)] = (i, action, round_no)
        return out

    async def _positions(self, intent: OrderIntent, rows: dict[str, ledger.OrderRow],
                         owners: dict[str, tuple[int, Action, int]]) -> list[LegPosition]:
        net = [rows[leg.client_order_id].filled_quantity for leg in intent.legs]
        for cid, row in rows.items():
            owner = owners.get(cid)
            if owner is not None:
                net[owner[0]] += row.filled_quantity if owner[1] == "hedge" else -row.filled_quantity
        positions = []
        for i, leg in enumerate(intent.legs):
            row = rows[leg.client_order_id]
            instrument, _ = await self.market.instrument(leg.exchange, leg.symbol)
            bid, ask = best_prices(await self.market.book(leg.exchange, leg.symbol))
            stored = OrderLeg(client_order_id=leg.client_order_id, exchange=leg.exchange, symbol=leg.symbol,
                              side=leg.side, price=row.price if row.price is not None else leg.price,
                              quantity=row.quantity)
            positions.append(LegPosition(stored, net[i], instrument.lot_size, instrument.min_qty,
                                         instrument.min_notional, bid, ask))
        return positions

    async def _finish(self, conn: AsyncConnection, intent: OrderIntent, rows: dict[str, ledger.OrderRow],
                      owners: dict[str, tuple[int, Action, int]]) -> None:
        now = self.clock_ns()
        positions = await self._positions(intent, rows, owners)
        left = residuals(positions)
        fills = await ledger.load_fills(conn, intent.arb_id)
        entry_rows = [rows[leg.client_order_id] for leg in intent.legs]
        corrections = [r for r in rows.values() if r.client_order_id in owners]
        status: ExecutionStatus = classify(
            entry_complete=all(r.filled_quantity == r.quantity for r in entry_rows),
            any_fill=bool(fills),
            hedged=any(r.role == "hedge" and r.filled_quantity > 0 for r in corrections),
            unwound=any(r.role == "unwind" and r.filled_quantity > 0 for r in corrections),
            residual=bool(left),
        )
        pnl = realised_pnl(fills, self.reference, await self._fx_rates(fills), strict=False)
        fx_rates: dict[str, Any] = dict(pnl.fx_rates)
        if pnl.missing:
            fx_rates["missing"] = list(pnl.missing)
        base, _ = split_symbol(intent.legs[0].symbol)
        legs = [_execution_leg(r) for r in rows.values()]
        await ledger.insert_trade(
            conn, session=self.session, mode=self.mode, arb_id=intent.arb_id, signal_id=intent.signal_id,
            strategy=intent.strategy, status=status, asset=base, legs=legs, notional=pnl.bought, fees=pnl.fees,
            realised_pnl=pnl.realised, pnl_currency=self.reference, pnl_by_currency=pnl.by_currency,
            fx_rates=fx_rates, expected_profit=Decimal(repr(intent.expected_profit)), residuals=left,
            opened_ns=intent.ts_ns or now, closed_ns=now)
        if left or status != "completed":
            log.warning("arbitrage finished broken", extra={"arb_id": intent.arb_id, "status": status,
                                                           "residuals": str(msgspec.to_builtins(left))})

    async def _fx_rates(self, fills: list[ledger.FillRow]) -> dict[str, Decimal]:
        cash, fees, bought = cash_flows(fills)
        pairs = []
        for c in sorted((set(cash) | set(fees) | set(bought)) - {self.reference}):
            pairs += [f"{self.reference}/{c}", f"{c}/{self.reference}"]
        rates = await self.market.fx(pairs)
        return {pair: Decimal(repr(rate.rate)) for pair, rate in rates.items()}

    # ------------------------------------------------------------------ outputs

    async def _outputs(self, conn: AsyncConnection, intent: OrderIntent) -> Outputs:
        state = await ledger.load_state(conn, intent.arb_id)
        rows, fills, events, trade = state.orders, state.fills, state.events, state.trade
        out = Outputs()
        origin = intent.ts_origin_ns
        out.fills = [
            Fill(fill_id=f.fill_id, client_order_id=f.client_order_id, arb_id=f.arb_id, exchange=f.exchange,
                 symbol=f.symbol, side=f.side, price=f.price, quantity=f.quantity, fee=f.fee, fee_asset=f.fee_asset,
                 liquidity="maker" if f.liquidity == "maker" else "taker",
                 mode="live" if f.mode == "live" else "paper", ts_ns=f.ts_ns, ts_origin_ns=origin)
            for f in fills]
        for e in events:
            row = rows[e.client_order_id]
            out.updates.append(OrderUpdate(
                client_order_id=e.client_order_id, arb_id=intent.arb_id, exchange=row.exchange, symbol=row.symbol,
                side=row.side, status=e.status, filled_quantity=e.filled_quantity,
                average_price=row.average_price if e.filled_quantity and e.status == row.status else None,
                exchange_order_id=row.exchange_order_id, reason=e.reason, ts_ns=e.ts_ns))
        if trade is None:
            return out
        left = msgspec.convert(trade["residuals"], list[Residual], strict=False)
        status: ExecutionStatus = trade["status"]
        execution = Execution(
            arb_id=intent.arb_id, signal_id=intent.signal_id, strategy=intent.strategy, status=status,
            legs=msgspec.convert(trade["legs"], list[ExecutionLeg], strict=False),
            realised_pnl=trade["realised_pnl"], pnl_currency=trade["pnl_currency"], fees=trade["fees"],
            notional=trade["notional"], residuals=left, ts_ns=ledger.to_ns(trade["closed_at"]),
            ts_origin_ns=origin,
            pnl_by_currency={k: Decimal(v) for k, v in trade["pnl_by_currency"].items()},
            fx_rates={k: Decimal(v) for k, v in trade["fx_rates"].items() if k != "missing"})
        out.execution = execution
        if self.mode == "paper" and fills:
            keys = sorted({(f.exchange, a) for f in fills for a in (*split_symbol(f.symbol), f.fee_asset)})
            now = self.clock_ns()
            for (exchange, asset), (free, locked) in sorted(
                    (await ledger.load_balances(conn, self.session, self.mode, keys)).items()):
                out.balances.append(Balance(exchange=exchange, asset=asset, free=free, locked=locked, mode="paper",
                                            ts_ns=now))
        out.alerts = _alerts(execution, rows, intent)
        missing = trade["fx_rates"].get("missing")
        if missing:
            out.alerts.append(Alert(
                alert_id=f"{intent.arb_id}:fx_missing", severity="critical", source="executor", kind="fx_missing",
                message=f"arbitrage {intent.arb_id}: no FX rate for {', '.join(missing)}; realised PnL in "
                        f"{execution.pnl_currency} leaves those currencies out", ts_ns=execution.ts_ns,
                labels={"arb_id": intent.arb_id}))
        return out


def _execution_leg(row: ledger.OrderRow) -> ExecutionLeg:
    role: Literal["entry", "hedge", "unwind"] = (
        "hedge" if row.role == "hedge" else "unwind" if row.role == "unwind" else "entry")
    return ExecutionLeg(client_order_id=row.client_order_id, exchange=row.exchange, symbol=row.symbol, side=row.side,
                        status=row.status, quantity=row.quantity, filled_quantity=row.filled_quantity,
                        average_price=row.average_price, fee=row.fee, fee_asset=row.fee_asset, role=role)


def _alerts(execution: Execution, rows: dict[str, ledger.OrderRow], intent: OrderIntent) -> list[Alert]:
    entry = [rows[leg.client_order_id] for leg in intent.legs if leg.client_order_id in rows]
    broken = [r for r in entry if r.filled_quantity != r.quantity]
    filled = any(r.filled_quantity > 0 for r in rows.values())
    labels = {"arb_id": execution.arb_id, "status": execution.status}
    if execution.residuals:
        exposure = ", ".join(f"{r.quantity} {r.asset} on {r.exchange}" for r in execution.residuals)
        return [Alert(alert_id=f"{execution.arb_id}:residual", severity="critical", source="executor",
                      kind="residual_exposure", message=f"arbitrage {execution.arb_id} left exposure: {exposure}",
                      ts_ns=execution.ts_ns, labels=labels)]
    if broken and filled:
        legs = ", ".join(f"{r.exchange} {r.side} {r.filled_quantity}/{r.quantity} ({r.status})" for r in broken)
        return [Alert(alert_id=f"{execution.arb_id}:broken_leg", severity="warning", source="executor",
                      kind="broken_leg", message=f"arbitrage {execution.arb_id} {execution.status}: {legs}",
                      ts_ns=execution.ts_ns, labels=labels)]
    return []
