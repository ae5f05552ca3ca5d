"""The executor's writes to PostgreSQL: orders, their transitions, fills, trades, paper balances.

Every write is idempotent, keyed by what the exchange keys things by:
- an order row per client order id, stored (status NEW) before the order is sent;
- a fill row per (exchange, exchange trade id), inserted ``ON CONFLICT DO NOTHING``; paper
  balances move only for fills actually inserted, in the same transaction, so a replay
  never applies a fill twice;
- a transition row per (client order id, status, filled quantity);
- a trade row per arbitrage, written last.

A connection failure (or deadlock) raises ``DatabaseUnavailable``, a ``Retryable``: the
consumer retries the same intent in place and acknowledges nothing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from services.executor.fills import BalanceDelta, fill_deltas
from services.executor.markets import PreparedOrder
from services.executor.orders import OrderStateMachine, Transition
from services.executor.venues.base import VenueResult
from shared.ledger import adjust_balance
from shared.models import OrderStatus, Side
from shared.runtime import Retryable

ZERO = Decimal(0)


class DatabaseUnavailable(Retryable):
    pass


def to_ts(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC)


def to_ns(ts: datetime) -> int:
    return int(ts.timestamp() * 1_000_000) * 1000


class Database:
    """Up to ``size`` connections (one per intent in hand), each reopened after a failure.

    A connection goes back to the pool only when its holder finished cleanly and it is idle
    (no transaction open): after any error it is closed, so a session-level advisory lock
    can never outlive its holder on a pooled connection.
    """

    def __init__(self, url: str, *, on_connect: Callable[[AsyncConnection], Awaitable[None]] | None = None,
                 connect_timeout_s: int = 2, size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"a database pool holds at least one connection, not {size}")
        self.url = url
        self.on_connect = on_connect
        self.connect_timeout_s = connect_timeout_s
        self.size = size
        self._idle: list[AsyncConnection] = []
        self._slots = asyncio.Semaphore(size)
        self._closing: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._slots:
            conn: AsyncConnection | None = None
            try:
                conn = await self._take()
                yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                await _close(conn)
                conn = None
                raise DatabaseUnavailable(f"postgresql unavailable: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                await _close(conn)
                conn = None
                raise
            finally:
                if conn is not None:
                    self._give_back(conn)

    async def _take(self) -> AsyncConnection:
        while self._idle:
            conn = self._idle.pop()
            if not (conn.closed or conn.broken):
                return conn
        conn = await AsyncConnection.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
        try:
            if self.on_connect is not None:
                await self.on_connect(conn)
        except BaseException:
            await _close(conn)
            raise
        return conn

    def _give_back(self, conn: AsyncConnection) -> None:
        if conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
            task = asyncio.get_running_loop().create_task(_close(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            return
        self._idle.append(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close(conn: AsyncConnection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):  # possibly broken already: closing is best effort
            await conn.close()


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class OrderRow:
    client_order_id: str
    arb_id: str
    exchange: str
    symbol: str
    side: Side
    order_type: str
    time_in_force: str
    role: str
    price: Decimal | None
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None
    fee: Decimal
    fee_asset: str
    status: OrderStatus
    exchange_order_id: str
    not_after_ns: int
    reason: str


@dataclass(frozen=True, slots=True)
class FillRow:
    exchange: str
    fill_id: str
    client_order_id: str
    arb_id: str
    symbol: str
    side: Side
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: str
    mode: str
    ts_ns: int


@dataclass(frozen=True, slots=True)
class EventRow:
    client_order_id: str
    status: OrderStatus
    filled_quantity: Decimal
    reason: str
    ts_ns: int


_ORDER_COLUMNS = ("client_order_id, arb_id, exchange, symbol, side, order_type, time_in_force, role, price, quantity, "
                  "filled_quantity, average_price, fee, fee_asset, status, exchange_order_id, not_after, reason")
_FILL_COLUMNS = ("exchange, fill_id, client_order_id, arb_id, symbol, side, price, quantity, fee, fee_asset, "
                 "liquidity, mode, ts")


def _order_row(r: tuple[Any, ...]) -> OrderRow:
    values = list(r)
    values[16] = to_ns(values[16]) if values[16] is not None else 0
    return OrderRow(*values)


def _fill_row(r: tuple[Any, ...]) -> FillRow:
    values = list(r)
    values[12] = to_ns(values[12])
    return FillRow(*values)


# --------------------------------------------------------------------------- locks


def lock_key(session: str, arb_id: str) -> int:
    digest = hashlib.blake2b(f"executor:{session}:{arb_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def unlock(conn: AsyncConnection, key: int) -> None:
    """Release the session-level lock ``lock_and_load`` took (a dead session releases it too)."""
    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


# --------------------------------------------------------------------------- reads


_TRADE_COLUMNS = ("status", "legs", "notional", "fees", "realised_pnl", "pnl_currency", "pnl_by_currency",
                  "fx_rates", "residuals", "closed_at")
_SELECT_ORDERS = f"SELECT {_ORDER_COLUMNS} FROM orders WHERE arb_id = %s ORDER BY created_at, client_order_id"
_SELECT_FILLS = f"SELECT {_FILL_COLUMNS} FROM fills WHERE arb_id = %s ORDER BY ts, client_order_id, fill_id"
_SELECT_EVENTS = ("SELECT e.client_order_id, e.status, e.filled_quantity, e.reason, e.ts FROM order_events e "
                  "JOIN orders o USING (client_order_id) WHERE o.arb_id = %s ORDER BY e.id")
_SELECT_TRADE = f"SELECT {', '.join(_TRADE_COLUMNS)} FROM trades WHERE arb_id = %s"


@dataclass(frozen=True, slots=True)
class ArbState:
    """Everything stored about one arbitrage."""

    orders: dict[str, OrderRow]
    fills: list[FillRow]
    events: list[EventRow]
    trade: dict[str, Any] | None


async def load_orders(conn: AsyncConnection, arb_id: str) -> dict[str, OrderRow]:
    cur = await conn.execute(_SELECT_ORDERS, (arb_id,))
    return {row.client_order_id: row for row in map(_order_row, await cur.fetchall())}


async def load_orders_by_id(conn: AsyncConnection, client_order_ids: list[str]) -> dict[str, OrderRow]:
    cur = await conn.execute(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE client_order_id = ANY(%s)",
                             (client_order_ids,))
    return {row.client_order_id: row for row in map(_order_row, await cur.fetchall())}


async def load_fills(conn: AsyncConnection, arb_id: str) -> list[FillRow]:
    cur = await conn.execute(_SELECT_FILLS, (arb_id,))
    return [_fill_row(r) for r in await cur.fetchall()]


def _trade(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    return None if row is None else dict(zip(_TRADE_COLUMNS, row, strict=True))


async def load_trade(conn: AsyncConnection, arb_id: str) -> dict[str, Any] | None:
    cur = await conn.execute(_SELECT_TRADE, (arb_id,))
    return _trade(await cur.fetchone())


@dataclass(frozen=True, slots=True)
class Locked:
    """What ``lock_and_load`` found: whether the lock is ours, the trade and orders stored
    before, and the orders it stored itself."""

    locked: bool
    trade: dict[str, Any] | None
    orders: dict[str, OrderRow]
    inserted: dict[str, OrderRow]


# The outcome of this session's try for the arbitrage's lock, for the statement after it in
# the same round trip (a session setting, so it outlives the statement that set it).
_TRY_LOCK = "SELECT set_config('arb.executor_locked', pg_try_advisory_lock(%s)::text, false)"
_LOCK_IS_OURS_AND_NOTHING_STORED = ("current_setting('arb.executor_locked') = 'true' "
                                    "AND NOT EXISTS (SELECT 1 FROM trades WHERE arb_id = %s) "
                                    "AND NOT EXISTS (SELECT 1 FROM orders WHERE arb_id = %s)")


async def lock_and_load(conn: AsyncConnection, key: int, arb_id: str, new: NewOrders | None = None) -> Locked:
    """Take the arbitrage's lock and read its trade and orders; with ``new``, also store those
    orders if the lock is ours and nothing of the arbitrage is stored yet. One round trip.

    The statements run in order, each with its own snapshot (READ COMMITTED), so the insert
    sees everything an earlier holder of the lock committed. They form one implicit
    transaction that commits at the pipeline's Sync: the rows are durable once the pipeline
    block has exited, which is before anything here is returned."""
    stored = None
    async with conn.pipeline():
        locked = await conn.execute(_TRY_LOCK, (key,))
        trade = await conn.execute(_SELECT_TRADE, (arb_id,))
        orders = await conn.execute(_SELECT_ORDERS, (arb_id,))
        if new is not None and new.orders:
            sql, params = _store_orders(new, _LOCK_IS_OURS_AND_NOTHING_STORED, (arb_id, arb_id))
            stored = await conn.execute(sql, params)
    got = await locked.fetchone()
    return Locked(got is not None and got[0] == "true", _trade(await trade.fetchone()),
                  {r.client_order_id: r for r in map(_order_row, await orders.fetchall())},
                  {r.client_order_id: r for r in map(_order_row, await stored.fetchall())} if stored else {})


async def load_state(conn: AsyncConnection, arb_id: str) -> ArbState:
    """Orders, fills, transitions and trade of an arbitrage, in one round trip."""
    async with conn.pipeline():
        orders = await conn.execute(_SELECT_ORDERS, (arb_id,))
        fills = await conn.execute(_SELECT_FILLS, (arb_id,))
        events = await conn.execute(_SELECT_EVENTS, (arb_id,))
        trade = await conn.execute(_SELECT_TRADE, (arb_id,))
        return ArbState(
            {r.client_order_id: r for r in map(_order_row, await orders.fetchall())},
            [_fill_row(r) for r in await fills.fetchall()],
            [EventRow(c, st, q, r, to_ns(t)) for c, st, q, r, t in await events.fetchall()],
            _trade(await trade.fetchone()))


async def load_balances(conn: AsyncConnection, session: str, mode: str,
                        keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    if not keys:
        return {}
    cur = await conn.execute(
        "SELECT exchange, asset, free, locked FROM balances WHERE session = %s AND mode = %s "
        "AND (exchange, asset) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
        (session, mode, [k[0] for k in keys], [k[1] for k in keys]))
    return {(ex, asset): (free, locked) for ex, asset, free, locked in await cur.fetchall()}


class LockedBalances:
    """Free paper balances, row-locked for the current transaction, kept current as fills move them."""

    def __init__(self, values: dict[tuple[str, str], Decimal]) -> None:
        self.values = values

    def available(self, exchange: str, asset: str) -> Decimal:
        return self.values.get((exchange, asset), ZERO)

    def apply(self, deltas: Iterable[BalanceDelta]) -> None:
        for d in deltas:
            self.values[(d.exchange, d.asset)] = self.available(d.exchange, d.asset) + d.amount


async def lock_balances(conn: AsyncConnection, session: str, mode: str,
                        keys: Iterable[tuple[str, str]]) -> LockedBalances:
    """Lock the balance rows of ``keys`` (exchange, asset), always in the same order so two
    replicas locking overlapping rows cannot deadlock."""
    ordered = sorted(set(keys))
    cur = await conn.execute(
        "SELECT b.exchange, b.asset, b.free FROM balances b "
        "JOIN unnest(%s::text[], %s::text[]) AS k(exchange, asset) USING (exchange, asset) "
        "WHERE b.session = %s AND b.mode = %s ORDER BY b.exchange, b.asset FOR UPDATE OF b",
        ([k[0] for k in ordered], [k[1] for k in ordered], session, mode))
    return LockedBalances({(ex, asset): free for ex, asset, free in await cur.fetchall()})


# --------------------------------------------------------------------------- writes


@dataclass(frozen=True, slots=True)
class NewOrders:
    """Orders of one arbitrage to store (NEW, or straight to REJECTED when refused) before they are sent."""

    session: str
    mode: str
    arb_id: str
    signal_id: str
    orders: list[PreparedOrder]
    not_after_ns: int
    ts_ns: int


def _store_orders(new: NewOrders, guard: str = "TRUE", guard_params: tuple[Any, ...] = ()) -> tuple[str, list[Any]]:
    """One statement storing ``new`` with its transitions where ``guard`` holds; it returns
    the rows it inserted. Events go only with rows inserted here (the JOIN on the RETURNING
    rows), so a replay adds none."""
    order_values: list[str] = []
    event_values: list[str] = []
    params: list[Any] = []
    events: list[Any] = []
    created, not_after = to_ts(new.ts_ns), to_ts(new.not_after_ns)
    for order in new.orders:
        leg = order.leg
        machine = OrderStateMachine(leg.client_order_id, leg.quantity)
        transitions = [Transition(leg.client_order_id, "NEW", ZERO)]
        if order.rejection:
            transitions += machine.settle("REJECTED", ZERO, order.rejection)
        order_values.append("(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::numeric, %s::numeric, %s, %s, %s, "
                            "%s::timestamptz, %s::timestamptz)")
        params += [leg.client_order_id, new.session, new.arb_id, new.signal_id, leg.exchange, leg.symbol, leg.side,
                   leg.order_type, leg.time_in_force, order.role, leg.price, leg.quantity, machine.status,
                   order.rejection, new.mode, not_after, created]
        for t in transitions:
            event_values.append("(%s, %s, %s::numeric, %s, %s::timestamptz)")
            events += [t.client_order_id, t.status, t.filled_quantity, t.reason, created]
    columns = ("client_order_id, session, arb_id, signal_id, exchange, symbol, side, order_type, time_in_force, "
               "role, price, quantity, status, reason, mode, not_after, created_at")
    sql = f"""WITH o AS (
            INSERT INTO orders ({columns})
            SELECT * FROM (VALUES {", ".join(order_values)}) AS v({columns}) WHERE {guard}
            ON CONFLICT (client_order_id) DO NOTHING RETURNING {_ORDER_COLUMNS}
        ), e AS (
            INSERT INTO order_events (client_order_id, status, filled_quantity, reason, ts)
            SELECT v.client_order_id, v.status, v.filled_quantity, v.reason, v.ts
            FROM (VALUES {", ".join(event_values)}) AS v(client_order_id, status, filled_quantity, reason, ts)
            JOIN o ON o.client_order_id = v.client_order_id
            ON CONFLICT (client_order_id, status, filled_quantity) DO NOTHING
        )
        SELECT {_ORDER_COLUMNS} FROM o"""
    return sql, params + list(guard_params) + events


async def insert_orders(conn: AsyncConnection, *, session: str, mode: str, arb_id: str, signal_id: str,
                        orders: list[PreparedOrder], not_after_ns: int, ts_ns: int) -> dict[str, OrderRow]:
    """Store orders with their transitions in one statement: one round trip, one atomic
    commit outside a transaction. Returns the rows this call inserted; an order whose row
    already existed is left as it is and is not among them (it must not be sent as new)."""
    if not orders:
        return {}
    sql, params = _store_orders(NewOrders(session, mode, arb_id, signal_id, orders, not_after_ns, ts_ns))
    cur = await conn.execute(sql, params)
    return {row.client_order_id: row for row in map(_order_row, await cur.fetchall())}


async def insert_order(conn: AsyncConnection, *, session: str, mode: str, arb_id: str, signal_id: str,
                       order: PreparedOrder, not_after_ns: int, ts_ns: int) -> OrderRow:
    """Store one order as ``insert_orders`` does; the stored row, whether inserted now or before."""
    inserted = await insert_orders(conn, session=session, mode=mode, arb_id=arb_id, signal_id=signal_id,
                                   orders=[order], not_after_ns=not_after_ns, ts_ns=ts_ns)
    if order.client_order_id in inserted:
        return inserted[order.client_order_id]
    return (await load_orders_by_id(conn, [order.client_order_id]))[order.client_order_id]


async def expire_order(conn: AsyncConnection, *, session: str, mode: str, arb_id: str, signal_id: str,
                       order: PreparedOrder, reason: str, ts_ns: int) -> None:
    """An order of an intent that arrived too late: recorded, never sent."""
    leg = order.leg
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO orders (client_order_id, session, arb_id, signal_id, exchange, symbol, side, order_type,
                                   time_in_force, role, price, quantity, status, mode, reason, created_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'EXPIRED', %s, %s, %s)
               ON CONFLICT (client_order_id) DO NOTHING""",
            (leg.client_order_id, session, arb_id, signal_id, leg.exchange, leg.symbol, leg.side, leg.order_type,
             leg.time_in_force, order.role, leg.price, leg.quantity, mode, reason, to_ts(ts_ns)))
        await _insert_events(conn, [Transition(leg.client_order_id, "EXPIRED", ZERO, reason)], ts_ns)


async def record_outcome(conn: AsyncConnection, *, session: str, mode: str, row: OrderRow, result: VenueResult,
                         ts_ns: int, paper_balances: bool = False) -> list[Transition]:
    """Store what the venue reported for one order: new fills, balance moves (paper), the
    order's transitions. Call inside a transaction. Returns the transitions made."""
    inserted = []
    if result.fills:
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(result.fills))
        params: list[Any] = []
        for f in result.fills:
            params += [session, row.exchange, f.fill_id, row.client_order_id, row.arb_id, row.symbol, row.side,
                       f.price, f.quantity, f.fee, f.fee_asset, f.liquidity, mode, to_ts(f.ts_ns or ts_ns)]
        cur = await conn.execute(
            f"INSERT INTO fills (session, {_FILL_COLUMNS}) VALUES {values} "
            "ON CONFLICT (exchange, fill_id) DO NOTHING RETURNING fill_id", params)
        new_ids = {r[0] for r in await cur.fetchall()}
        inserted = [f for f in result.fills if f.fill_id in new_ids]
    if paper_balances and inserted:
        moves: dict[str, Decimal] = {}
        for f in inserted:
            for d in fill_deltas(row.exchange, row.symbol, row.side, f):
                moves[d.asset] = moves.get(d.asset, ZERO) + d.amount
        for asset in sorted(moves):
            await adjust_balance(conn, session=session, mode=mode, exchange=row.exchange, asset=asset,
                                 delta_free=moves[asset])
    cur = await conn.execute(
        """SELECT o.status, o.filled_quantity, f.quantity, f.notional, f.fee, f.fee_asset
           FROM orders o, LATERAL (
               SELECT coalesce(sum(quantity), 0) AS quantity, coalesce(sum(price * quantity), 0) AS notional,
                      coalesce(sum(fee), 0) AS fee, coalesce(max(fee_asset), '') AS fee_asset
               FROM fills WHERE client_order_id = o.client_order_id) f
           WHERE o.client_order_id = %s FOR UPDATE OF o""", (row.client_order_id,))
    current = await cur.fetchone()
    assert current is not None
    status, before, filled, notional, fee, fee_asset = current
    machine = OrderStateMachine(row.client_order_id, row.quantity, status, before)
    transitions = machine.settle(result.status, filled, result.reason)
    await conn.execute(
        """UPDATE orders SET status = %s, filled_quantity = %s, average_price = %s, fee = %s, fee_asset = %s,
                             exchange_order_id = CASE WHEN %s = '' THEN exchange_order_id ELSE %s END,
                             reason = %s, updated_at = now()
           WHERE client_order_id = %s""",
        (machine.status, filled, notional / filled if filled else None, fee, fee_asset, result.exchange_order_id,
         result.exchange_order_id, result.reason, row.client_order_id))
    await _insert_events(conn, transitions, ts_ns)
    return transitions


async def mark_unknown(conn: AsyncConnection, row: OrderRow, reason: str, ts_ns: int) -> list[Transition]:
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT status, filled_quantity FROM orders WHERE client_order_id = %s FOR UPDATE", (row.client_order_id,))
        current = await cur.fetchone()
        assert current is not None
        machine = OrderStateMachine(row.client_order_id, row.quantity, current[0], current[1])
        if machine.terminal or machine.status == "UNKNOWN":
            return []
        transitions = machine.settle("UNKNOWN", machine.filled_quantity, reason)
        await conn.execute("UPDATE orders SET status = 'UNKNOWN', reason = %s, updated_at = now() "
                           "WHERE client_order_id = %s", (reason, row.client_order_id))
        await _insert_events(conn, transitions, ts_ns)
        return transitions


async def _insert_events(conn: AsyncConnection, transitions: list[Transition], ts_ns: int) -> None:
    if not transitions:
        return
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(transitions))
    params: list[Any] = []
    for t in transitions:
        params += [t.client_order_id, t.status, t.filled_quantity, t.reason, to_ts(ts_ns)]
    await conn.execute(
        f"""INSERT INTO order_events (client_order_id, status, filled_quantity, reason, ts) VALUES {values}
            ON CONFLICT (client_order_id, status, filled_quantity) DO NOTHING""", params)


async def insert_trade(conn: AsyncConnection, *, session: str, mode: str, arb_id: str, signal_id: str,
                       strategy: str, status: str, asset: str, legs: list[Any], notional: Decimal, fees: Decimal,
                       realised_pnl: Decimal, pnl_currency: str, pnl_by_currency: Mapping[str, Decimal],
                       fx_rates: Mapping[str, Any], expected_profit: Decimal, residuals: list[Any],
                       opened_ns: int, closed_ns: int) -> None:
    def js(value: Any) -> Jsonb:
        return Jsonb(msgspec.to_builtins(value))  # Decimals become strings: exact

    await conn.execute(
        """INSERT INTO trades (arb_id, session, signal_id, strategy, status, asset, legs, notional, fees, realised_pnl,
                               pnl_currency, pnl_by_currency, fx_rates, expected_profit, residuals, mode, opened_at,
                               closed_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (arb_id) DO NOTHING""",
        (arb_id, session, signal_id, strategy, status, asset, js(legs), notional, fees, realised_pnl, pnl_currency,
         js(dict(pnl_by_currency)), js(dict(fx_rates)), expected_profit, js(residuals), mode, to_ts(opened_ns),
         to_ts(closed_ns)))
