"""PostgreSQL stopped for 30 s while intents keep coming: the executor waits and retries,
acknowledges nothing it has not stored, and afterwards PostgreSQL holds exactly the fills it
published. Runs against a private PostgreSQL (pgserver, Unix socket) that the test stops."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

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
)

from shared.db import migrate
from shared.embedded import stop_postgres
from shared.models import Fill
from shared.runtime import Bus
from shared.streams import FILLS, ORDERS, Group

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")[0]
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")[0]
OUTAGE_S = 30.0
RATE = 10.0


def start_private_postgres(data_dir: Path) -> str:
    # In a child process: pgserver caches its server handle per process, so a second start in
    # this process after a stop would not start anything.
    code = ("import sys; from pathlib import Path; from shared.embedded import start_postgres; "
            "print(start_postgres(Path(sys.argv[1])).database_url('arb'))")
    out = subprocess.run([sys.executable, "-c", code, str(data_dir)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


async def acked_ids(bus: Bus) -> set[bytes]:
    """Entries of ``orders`` the executor group has acknowledged (delivered and no longer pending)."""
    key = bus.stream(ORDERS)
    groups = await bus.redis.xinfo_groups(key)
    last = next(g["last-delivered-id"] for g in groups if g["name"] in (Group.EXECUTOR, Group.EXECUTOR.encode()))
    delivered = {eid for eid, _ in await bus.redis.xrange(key, max=last)}
    pending = {p["message_id"] for p in await bus.redis.xpending_range(key, Group.EXECUTOR, "-", "+", 100_000)}
    return delivered - pending


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: that is private to root, and pgserver runs PostgreSQL as its own user.
    base = Path(tempfile.mkdtemp(prefix="arb-executor-pg-"))
    base.chmod(0o755)
    yield base / "data"
    stop_postgres(base / "data")
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
async def test_postgres_down_30s_under_load_acks_nothing_unstored_and_rows_equal_fills(
        service_env: dict[str, str], redis_url: str, namespace: str, pg_dir: Path) -> None:
    data_dir = pg_dir
    url = start_private_postgres(data_dir)
    bus = service_bus(redis_url, namespace)
    proc = None
    loader: asyncio.Task[None] | None = None
    published: list[str] = []
    try:
        migrate(url)
        await put_market(bus, binance=BINANCE, upbit=UPBIT)
        env = executor_env(service_env, order_latency_ms=0, start_balances={
            "binance": {"USDT": 10_000_000, "BTC": 100}, "upbit": {"KRW": 100_000_000_000, "BTC": 100}})
        env.update({"DATABASE_URL": url, "ARB_REDIS__BLOCK_MS": "100", "ARB_LOG__LEVEL": "WARNING"})
        proc = start_executor(env)
        stop_load = asyncio.Event()

        async def load() -> None:  # books keep moving and intents keep coming, outage or not
            start = time.monotonic()
            while True:
                await put_market(bus, binance=BINANCE, upbit=UPBIT, instruments=False, usdt_krw=1380.0)
                due = int((time.monotonic() - start) * RATE) - len(published)
                if due > 0 and not stop_load.is_set():
                    batch = [spatial_intent() for _ in range(due)]
                    await publish_intents(bus, batch)
                    published.extend(i.arb_id for i in batch)
                await asyncio.sleep(0.05)

        loader = asyncio.create_task(load())
        await asyncio.sleep(3.0)
        before = await acked_ids(bus)
        assert before, "nothing was executed before the outage"
        await asyncio.to_thread(stop_postgres, data_dir)
        down_at = time.monotonic()
        await asyncio.sleep(2.0)
        early = await acked_ids(bus)
        await asyncio.sleep(down_at + OUTAGE_S - time.monotonic())
        late = await acked_ids(bus)
        # Whatever was in hand when PostgreSQL went away was stored and acknowledged by now;
        # from then on, nothing more is acknowledged while PostgreSQL is down.
        assert late == early, f"{len(late - early)} intents acknowledged while PostgreSQL was down"
        assert proc.poll() is None, "the executor died instead of waiting"
        await asyncio.to_thread(start_private_postgres, data_dir)
        assert time.monotonic() - down_at >= OUTAGE_S
        await asyncio.sleep(2.0)
        stop_load.set()  # no more intents; the books stay fresh

        def finished() -> int:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM trades").fetchone()
                return int(row[0]) if row else 0

        deadline = time.monotonic() + 60
        while finished() < len(published):
            assert time.monotonic() < deadline, f"{finished()} of {len(published)} intents stored"
            await asyncio.sleep(0.25)
        deadline = time.monotonic() + 20
        while len(await acked_ids(bus)) < len(published):
            assert time.monotonic() < deadline, "intents stored but not acknowledged"
            await asyncio.sleep(0.1)
    finally:
        if loader is not None:
            loader.cancel()
        if proc is not None:
            log = stop_process(proc)
            print(log[-20000:])
            assert "Traceback" not in log, log[-3000:]
        await bus.close()
        stop_postgres(data_dir)

    fills = [m for m in await _fills(redis_url, namespace) if isinstance(m, Fill)]
    restarted = start_private_postgres(data_dir)
    try:
        with psycopg.connect(restarted) as conn:
            rows = conn.execute("SELECT exchange, fill_id, price, quantity, fee FROM fills").fetchall()
            trades = {r[0] for r in conn.execute("SELECT arb_id FROM trades").fetchall()}
    finally:
        stop_postgres(data_dir)
    assert trades == set(published)
    assert len(fills) == len(rows) == len({(f.exchange, f.fill_id) for f in fills})
    assert {(f.exchange, f.fill_id, f.price, f.quantity, f.fee) for f in fills} == set(rows)
    print(f"intents {len(published)}, acked before the outage {len(before)}, during {len(late)}, fills {len(rows)}")


async def _fills(redis_url: str, namespace: str) -> list[object]:
    bus = service_bus(redis_url, namespace)
    try:
        return await read_stream(bus, FILLS)
    finally:
        await bus.close()
