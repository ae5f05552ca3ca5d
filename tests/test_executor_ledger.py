"""The executor's PostgreSQL layer: order rows stored in one committed statement before they
are sent, the connection pool that lets intents run side by side, and concurrent intents
keeping the paper ledger exact."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import psycopg
import pytest
from executor_support import BINANCE_BOOKS, BTC_KRW, BTC_USDT, UPBIT_BOOKS, put_market, recorded_books, spatial_intent

from services.executor import ledger
from services.executor.execution import IntentHandler
from services.executor.fills import FillSimulator
from services.executor.ledger import Database
from services.executor.markets import MarketData, PreparedOrder, prepare
from services.executor.venues.paper import PaperVenue
from shared.config import load_config
from shared.ledger import seed_balances
from shared.models import OrderLeg
from shared.runtime import Bus

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")[0]
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")[0]


def _orders(arb: str) -> list[PreparedOrder]:
    buy = OrderLeg(client_order_id=f"{arb}b", exchange="binance", symbol="BTC/USDT", side="buy",
                   price=Decimal("115300.01"), quantity=Decimal("0.01"))
    dust = OrderLeg(client_order_id=f"{arb}s", exchange="upbit", symbol="BTC/KRW", side="sell",
                    price=Decimal("159000000"), quantity=Decimal("0.000000001"))  # below the lot: refused
    return [prepare(buy, BTC_USDT, known=True), prepare(dust, BTC_KRW, known=True)]


async def test_orders_and_their_transitions_are_committed_by_one_statement_and_never_inserted_twice(
        pg_url: str, namespace: str) -> None:
    orders = _orders("a1")
    assert orders[1].rejection
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        rows = await ledger.insert_orders(conn, session=namespace, mode="paper", arb_id="a1", signal_id="s1",
                                          orders=orders, not_after_ns=2_000_000_000_000_000_000,
                                          ts_ns=1_900_000_000_000_000_000)
        assert {c: r.status for c, r in rows.items()} == {"a1b": "NEW", "a1s": "REJECTED"}
        assert rows["a1b"].price == Decimal("115300.01") and rows["a1s"].reason == orders[1].rejection
        # Seen committed by another session the moment the call returns: safe to send.
        with psycopg.connect(pg_url) as other:
            stored = other.execute("SELECT client_order_id, status FROM orders ORDER BY 1").fetchall()
            events = other.execute("SELECT client_order_id, status, reason FROM order_events ORDER BY id").fetchall()
        assert stored == [("a1b", "NEW"), ("a1s", "REJECTED")]
        assert [(c, s) for c, s, _ in events] == [("a1b", "NEW"), ("a1s", "NEW"), ("a1s", "REJECTED")]
        # A replay inserts nothing and reports nothing as new (nothing may be sent again).
        again = await ledger.insert_orders(conn, session=namespace, mode="paper", arb_id="a1", signal_id="s1",
                                           orders=orders, not_after_ns=2_000_000_000_000_000_000,
                                           ts_ns=1_950_000_000_000_000_000)
        assert again == {}
        one = await ledger.insert_order(conn, session=namespace, mode="paper", arb_id="a1", signal_id="s1",
                                        order=orders[0], not_after_ns=0, ts_ns=1_950_000_000_000_000_000)
        assert one == rows["a1b"]
        cur = await conn.execute("SELECT count(*) FROM order_events")
        assert await cur.fetchone() == (3,)


async def test_pool_gives_concurrent_holders_their_own_connections_and_reuses_idle_ones(pg_url: str) -> None:
    db = Database(pg_url, size=3)
    inside = asyncio.Barrier(3)

    async def holder() -> int:
        async with db.connection() as conn:
            await inside.wait()  # all three hold a connection at the same time
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    try:
        first = await asyncio.wait_for(asyncio.gather(holder(), holder(), holder()), 10)
        assert len(set(first)) == 3
        async with db.connection() as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            assert (await cur.fetchone())[0] in first  # type: ignore[index]
    finally:
        await db.close()


async def test_pool_closes_a_connection_whose_holder_failed_so_its_advisory_lock_is_released(pg_url: str) -> None:
    db = Database(pg_url, size=1)
    key = 424242
    try:
        with pytest.raises(RuntimeError):
            async with db.connection() as conn:
                await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
                raise RuntimeError("the holder failed before unlocking")
        await asyncio.sleep(0.1)
        with psycopg.connect(pg_url, autocommit=True) as other:
            row = other.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            assert row == (True,)
            other.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        await db.close()


async def test_concurrent_intents_keep_fills_and_paper_balances_exact(bus: Bus, pg_url: str, namespace: str) -> None:
    start = {"binance": {"USDT": Decimal(2_000_000), "BTC": Decimal(5)},
             "upbit": {"KRW": Decimal(3_000_000_000), "BTC": Decimal(5)}}
    cfg = load_config(environ={"ARB_SESSION": namespace}, overrides={"executor": {"order_latency_ms": 0}})

    async def seed(conn: psycopg.AsyncConnection) -> None:
        await seed_balances(conn, namespace, "paper", start)

    db = Database(pg_url, on_connect=seed, size=4)
    market = MarketData(bus, cfg)
    handler = IntentHandler(cfg, db=db, market=market, paper=PaperVenue(market, FillSimulator()))
    await put_market(bus, binance=BINANCE, upbit=UPBIT)
    ask, bid = Decimal(repr(BINANCE.asks[0][0])), Decimal(repr(UPBIT.bids[0][0]))
    intents = [spatial_intent(quantity="0.001", buy_price=str(ask + 50), sell_price=str(bid - 50000))
               for _ in range(40)]
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(handler.handle(i) for i in intents)), 60)
    finally:
        await db.close()
    assert all(o.execution is not None and o.execution.status == "completed" for o in outs)
    with psycopg.connect(pg_url) as conn:
        trades = conn.execute("SELECT count(*) FROM trades").fetchone()
        fills = conn.execute("SELECT exchange, symbol, side, price, quantity, fee, fee_asset FROM fills").fetchall()
        balances = dict(((ex, a), free) for ex, a, free in conn.execute(
            "SELECT exchange, asset, free FROM balances WHERE mode = 'paper'").fetchall())
    assert trades == (40,)
    published = sorted((f.exchange, f.fill_id) for o in outs for f in o.fills)
    assert len(published) == len(set(published)) == len(fills)
    moved: dict[tuple[str, str], Decimal] = {}
    for exchange, symbol, side, price, qty, fee, fee_asset in fills:
        base, quote = symbol.split("/")
        sign = 1 if side == "buy" else -1
        for key, amount in (((exchange, base), sign * qty), ((exchange, quote), -sign * price * qty),
                            ((exchange, fee_asset), -fee)):
            moved[key] = moved.get(key, Decimal(0)) + amount
    for exchange, assets in start.items():
        for asset, amount in assets.items():
            assert balances[(exchange, asset)] == amount + moved.get((exchange, asset), Decimal(0)), (exchange, asset)


async def test_orders_are_stored_with_the_lock_only_when_it_is_granted_and_nothing_is_stored_yet(
        pg_url: str, namespace: str) -> None:
    new = ledger.NewOrders(namespace, "paper", "a2", "s2", _orders("a2")[:1], 2_000_000_000_000_000_000,
                           1_900_000_000_000_000_000)
    key = ledger.lock_key(namespace, "a2")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as holder, \
            await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
        await holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        busy = await ledger.lock_and_load(other, key, "a2", new)
        assert not busy.locked and busy.inserted == {}  # another session holds it: nothing stored
        await ledger.unlock(holder, key)

        first = await ledger.lock_and_load(other, key, "a2", new)
        assert first.locked and first.orders == {} and list(first.inserted) == ["a2b"]
        with psycopg.connect(pg_url) as third:  # committed when the round trip returns
            assert third.execute("SELECT status FROM orders WHERE arb_id = 'a2'").fetchall() == [("NEW",)]
        await ledger.unlock(other, key)

        later = ledger.NewOrders(namespace, "paper", "a2", "s2", _orders("a2"), 2_000_000_000_000_000_000,
                                 1_950_000_000_000_000_000)
        again = await ledger.lock_and_load(holder, key, "a2", later)
        # Something of the arbitrage is stored: nothing new (not even its other leg) goes in here.
        assert again.locked and list(again.orders) == ["a2b"] and again.inserted == {}
        await ledger.unlock(holder, key)
        with psycopg.connect(pg_url) as third:
            assert third.execute("SELECT count(*) FROM order_events").fetchone() == (1,)
