"""The paper executor as a real process: intents in on ``orders``, fills on the recorded book,
balances moved in PostgreSQL exactly as the fills say, everything published."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal as D

import msgspec
import psycopg
import pytest
from executor_support import (
    BINANCE_BOOKS,
    UPBIT_BOOKS,
    executor_env,
    publish_intents,
    put_market,
    read_stream,
    recorded_books,
    service_bus,
    spatial_intent,
    start_executor,
    stop_process,
    wait_for,
)

from shared.models import Balance, Execution, Fill, OrderUpdate
from shared.runtime import Bus
from shared.streams import BALANCES, EXECUTIONS, FILLS, ORDER_UPDATES, ORDERS, dlq

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")[0]
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")[0]
START = {"binance": {"USDT": 10000, "BTC": 0.5}, "upbit": {"KRW": 20000000, "BTC": 0.5}}


@pytest.fixture
async def sbus(redis_url: str, namespace: str) -> AsyncIterator[Bus]:
    b = service_bus(redis_url, namespace)
    yield b
    await b.close()


async def executions(bus: Bus, n: int, timeout: float = 30.0) -> list[Execution]:
    async def enough() -> list[Execution] | None:
        got = [m for m in await read_stream(bus, EXECUTIONS) if isinstance(m, Execution)]
        return got if len(got) >= n else None

    return await wait_for(enough, timeout, what=f"{n} executions")  # type: ignore[no-any-return]


async def test_paper_service_fills_on_the_book_and_moves_balances_exactly(service_env, pg_url, sbus) -> None:  # type: ignore[no-untyped-def]
    await put_market(sbus, binance=BINANCE, upbit=UPBIT)
    env = executor_env(service_env, order_latency_ms=5, start_balances=START)
    intents = [spatial_intent() for _ in range(4)] + [spatial_intent(quantity="1")]  # the last one is unaffordable
    await publish_intents(sbus, intents)
    proc = start_executor(env)
    log = ""
    try:
        done = await executions(sbus, len(intents))
    finally:
        log = stop_process(proc)
        print(log[-5000:])
    assert "Traceback" not in log, log
    status = {e.arb_id: e.status for e in done}
    assert [status[i.arb_id] for i in intents] == ["completed"] * 4 + ["failed"]

    with psycopg.connect(env["DATABASE_URL"]) as conn:
        reasons = conn.execute("SELECT reason FROM orders WHERE arb_id = %s ORDER BY exchange",
                               (intents[-1].arb_id,)).fetchall()
        assert [r[0].split(":")[0] for r in reasons] == ["insufficient USDT balance", "insufficient BTC balance"]
        # Balances = start + what the fills say, each exchange charging its fee in its own asset.
        expected = {
            ("binance", "BTC"): "0.5 + sum(quantity) FILTER (WHERE side = 'buy') "
                                "- sum(fee) FILTER (WHERE fee_asset = 'BTC')",
            ("binance", "USDT"): "10000 - sum(price * quantity) FILTER (WHERE side = 'buy')",
            ("upbit", "BTC"): "0.5 - sum(quantity) FILTER (WHERE side = 'sell')",
            ("upbit", "KRW"): "20000000 + sum(price * quantity) FILTER (WHERE side = 'sell') - sum(fee)",
        }
        balances = dict(((ex, a), free) for ex, a, free in conn.execute(
            "SELECT exchange, asset, free FROM balances WHERE mode = 'paper'").fetchall())
        for (exchange, asset), formula in expected.items():
            [(want,)] = conn.execute(f"SELECT {formula} FROM fills WHERE exchange = %s", (exchange,)).fetchall()
            assert balances[(exchange, asset)] == want, (exchange, asset)
        assert balances[("binance", "BTC")] == D("0.5") + 4 * D("0.01") - 4 * D("0.00001")
        fill_rows = conn.execute("SELECT exchange, fill_id FROM fills").fetchall()
        events = conn.execute("SELECT client_order_id, status, filled_quantity FROM order_events").fetchall()

    fills = [m for m in await read_stream(sbus, FILLS) if isinstance(m, Fill)]
    assert sorted((f.exchange, f.fill_id) for f in fills) == sorted(fill_rows)
    updates = [m for m in await read_stream(sbus, ORDER_UPDATES) if isinstance(m, OrderUpdate)]
    assert sorted((u.client_order_id, u.status, u.filled_quantity) for u in updates) == sorted(events)
    published = {(b.exchange, b.asset): b.free for b in await read_stream(sbus, BALANCES) if isinstance(b, Balance)}
    assert published == balances


async def test_expired_and_invalid_intents_never_trade(service_env, pg_url, sbus) -> None:  # type: ignore[no-untyped-def]
    await put_market(sbus, binance=BINANCE, upbit=UPBIT)
    env = executor_env(service_env, order_latency_ms=0, start_balances=START)
    expired = spatial_intent(expires_ns=time.time_ns() - 10**9)
    bad = msgspec.json.decode(msgspec.json.encode(spatial_intent()))
    bad["legs"][0]["client_order_id"] = "not-alnum!"
    await sbus.redis.xadd(sbus.stream(ORDERS), {b"d": msgspec.json.encode(bad)})
    await publish_intents(sbus, [expired])
    proc = start_executor(env)
    try:
        [execution] = await executions(sbus, 1)

        async def dead() -> list[object]:
            return list(await sbus.redis.xrange(sbus.stream(dlq(ORDERS))))

        [(_, entry)] = await wait_for(dead, 10, what="dead letter")
    finally:
        stop_process(proc)
    assert execution.arb_id == expired.arb_id and execution.status == "expired"
    assert b"letters or digits" in entry[b"error"]
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM fills").fetchone() == (0,)
        assert conn.execute("SELECT status, count(*) FROM orders GROUP BY status").fetchall() == [("EXPIRED", 2)]
        assert conn.execute("SELECT arb_id, status FROM trades").fetchall() == [(expired.arb_id, "expired")]
