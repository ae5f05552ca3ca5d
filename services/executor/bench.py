"""`arb bench executor --json`: paper intent-to-fill latency over Redis, and intents per second.

The executor runs as its own process (paper mode, like production), against real Redis and
PostgreSQL. The bench writes a 20-level book per market, publishes intents on ``orders`` and
reads ``fills`` and ``executions`` back:

- latency: intents at a steady rate; per intent, the time from publishing it to receiving its
  first fill and its execution (the executor stores everything in PostgreSQL before it
  publishes, so this includes the durable writes);
- throughput: a burst of intents published at once; intents finished per second.

Baselines from the same run put the figures in context: a Redis PING round trip and one
durable PostgreSQL commit (an intent makes a few of each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from shared.bench.common import bench_redis, drop_prefix, emit, percentiles
from shared.models import BookSnapshot, Execution, Fill, FxRate, Instrument, OrderIntent, OrderLeg, decode, encode
from shared.runtime import FIELD, Bus
from shared.streams import EXECUTIONS, FILLS, ORDERS, KeySpace

MARKETS = {
    ("binance", "BTC/USDT"): (61837.63, 0.01, "BTCUSDT", Decimal("0.01"), Decimal("0.00001"), Decimal("0.001")),
    ("upbit", "BTC/KRW"): (85_000_000.0, 1000.0, "KRW-BTC", Decimal("1000"), Decimal("0.00000001"), Decimal("0.0005")),
}


def _book(exchange: str, symbol: str, now: int) -> BookSnapshot:
    mid, step = MARKETS[(exchange, symbol)][:2]
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=now, ts_exchange_ns=now, ts_recv_ns=now, ts_pub_ns=now,
                        bids=[(mid - (k + 1) * step, 0.5 + k * 0.1) for k in range(20)],
                        asks=[(mid + (k + 1) * step, 0.5 + k * 0.1) for k in range(20)])


def _intent(i: int) -> OrderIntent:
    arb = f"b{uuid.uuid4().hex[:20]}"
    now = time.time_ns()
    return OrderIntent(
        arb_id=arb, signal_id=f"s{arb}", strategy="spatial", notional=600.0, ts_ns=now, ts_origin_ns=now,
        legs=[OrderLeg(client_order_id=f"{arb}b", exchange="binance", symbol="BTC/USDT", side="buy",
                       price=Decimal("61900"), quantity=Decimal("0.01")),
              OrderLeg(client_order_id=f"{arb}s", exchange="upbit", symbol="BTC/KRW", side="sell",
                       price=Decimal("84000000"), quantity=Decimal("0.01"))])


async def _market(bus: Bus) -> None:
    now = time.time_ns()
    pipe = bus.redis.pipeline(transaction=False)
    for (exchange, symbol), (_, _, native, tick, lot, fee) in MARKETS.items():
        base, quote = symbol.split("/")
        instrument = Instrument(exchange=exchange, symbol=symbol, native=native, base=base, quote=quote,
                                tick_size=tick, lot_size=lot, taker_fee=fee, maker_fee=fee)
        pipe.hset(bus.keys.instruments(exchange), symbol, msgspec.json.encode(instrument))
        pipe.set(bus.keys.latest_book(exchange, symbol), encode(_book(exchange, symbol, now)), ex=60)
    pipe.set(bus.keys.fx_latest("USDT/KRW"), encode(FxRate(pair="USDT/KRW", rate=1380.0, source="bench",
                                                           ts_source_ns=now)), ex=600)
    await pipe.execute()


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    """A migrated schema of its own: in ``url`` / $DATABASE_URL, else a private PostgreSQL."""
    from shared.db import migrate, with_schema

    url = url or os.environ.get("DATABASE_URL")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if not url:
        from shared.embedded import start_postgres

        tmp = tempfile.TemporaryDirectory(prefix="arb-bench-pg-")
        Path(tmp.name).chmod(0o755)
        url = start_postgres(Path(tmp.name) / "data").database_url("bench")
    schema = f"bench_executor_{uuid.uuid4().hex[:8]}"
    scoped = with_schema(url, schema)
    try:
        migrate(scoped)
        yield scoped
    finally:
        with contextlib.suppress(Exception), psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if tmp is not None:
            from shared.embedded import stop_postgres

            stop_postgres(Path(tmp.name) / "data")
            tmp.cleanup()


class _Collector:
    """Reads fills and executions as they arrive; first fill and execution time per arbitrage."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.first_fill: dict[str, int] = {}
        self.executed: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self._ids: dict[Any, Any] = {bus.stream(FILLS): "0", bus.stream(EXECUTIONS): "0"}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.poll()

    async def poll(self) -> None:
        reply: Any = await self.bus.redis.xread(self._ids, count=1000, block=50)
        now = time.time_ns()
        for key, entries in reply or ():
            for entry_id, fields in entries:
                self._ids[key.decode() if isinstance(key, bytes) else key] = entry_id
                msg = decode(fields[FIELD])
                if isinstance(msg, Fill):
                    self.first_fill.setdefault(msg.arb_id, now)
                elif isinstance(msg, Execution) and msg.arb_id not in self.executed:
                    self.executed[msg.arb_id] = now
                    self.statuses[msg.status] = self.statuses.get(msg.status, 0) + 1


async def _run(args: argparse.Namespace, redis_url: str, db_url: str) -> dict[str, Any]:
    session = f"bench{uuid.uuid4().hex[:8]}"
    prefix = f"bench:executor:{session}:"
    bus = Bus.from_url(redis_url, prefix=prefix, keys=KeySpace("development", session))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env.update({
        "REDIS_URL": redis_url, "DATABASE_URL": db_url, "ARB_SESSION": session, "ARB_REDIS__STREAM_PREFIX": prefix,
        "ARB_HTTP__BASE_PORT": "0", "ARB_LOG__LEVEL": "WARNING", "ARB_REDIS__BLOCK_MS": "100",
        "ARB_EXECUTOR__ORDER_LATENCY_MS": str(args.latency_ms),
        "ARB_EXECUTOR__START_BALANCES": msgspec.json.encode({
            "binance": {"USDT": 1e12, "BTC": 1e6}, "upbit": {"KRW": 1e15, "BTC": 1e6}}).decode(),
        "CLICKHOUSE_URL": "chdb://" + tempfile.gettempdir() + "/arb-bench-unused",
    })
    await _market(bus)
    procs = [subprocess.Popen([sys.executable, "-m", "services.executor", "--instance", f"bench-{i}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(args.replicas)]
    collector = _Collector(bus)
    stop = asyncio.Event()

    async def refresh() -> None:  # books are only good for a few seconds
        while not stop.is_set():
            await _market(bus)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    refresher = asyncio.create_task(refresh())
    reader = asyncio.create_task(collector.run(stop))
    try:
        published: dict[str, int] = {}

        async def publish(intents: list[OrderIntent]) -> None:
            pipe = bus.redis.pipeline(transaction=False)
            for intent in intents:
                pipe.xadd(bus.stream(ORDERS), {FIELD: encode(intent)})
                published[intent.arb_id] = intent.ts_ns
            await pipe.execute()

        async def wait_done(n: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while len(collector.executed) < n:
                if time.monotonic() > deadline or reader.done():
                    raise TimeoutError(f"{len(collector.executed)} of {n} intents finished in {timeout} s")
                await asyncio.sleep(0.01)

        # Warm-up: the first intents pay for connections and prepared statements.
        await publish([_intent(i) for i in range(20)])
        await wait_done(20, 60)
        warm = set(published)

        start = time.monotonic()
        for i in range(args.intents):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await publish([_intent(i)])
        await wait_done(len(published), 120)
        measured = [a for a in published if a not in warm]
        to_fill = [collector.first_fill[a] - published[a] for a in measured if a in collector.first_fill]
        to_exec = [collector.executed[a] - published[a] for a in measured]

        burst_start = time.monotonic()
        before = len(collector.executed)
        await publish([_intent(i) for i in range(args.burst)])
        await wait_done(before + args.burst, 300)
        burst_s = time.monotonic() - burst_start
    finally:
        stop.set()
        await asyncio.gather(refresher, reader, return_exceptions=True)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        await bus.close()
        drop_prefix(redis_url, prefix)
        drop_prefix(redis_url, f"arbitrage:development:{session}:")
        drop_prefix(redis_url, f"arbitrage:{{*:development:{session}}}:")

    return {
        "intent_to_fill": percentiles(to_fill),
        "intent_to_execution": percentiles(to_exec),
        "latency_rate_intents_s": args.rate,
        "throughput_intents_s": round(args.burst / burst_s, 1),
        "throughput_burst": args.burst,
        "statuses": collector.statuses,
    }


async def _baselines(redis_url: str, db_url: str, n: int = 300) -> dict[str, Any]:
    bus = Bus.from_url(redis_url)
    pings = []
    for _ in range(n):
        t = time.perf_counter_ns()
        await bus.redis.ping()
        pings.append(time.perf_counter_ns() - t)
    await bus.close()
    commits = []
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TEMP TABLE bench_commit (x int)")
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_durable (x int)")
        for _ in range(n // 3):
            t = time.perf_counter_ns()
            await conn.execute("INSERT INTO bench_commit_durable VALUES (1)")
            commits.append(time.perf_counter_ns() - t)
        await conn.execute("DROP TABLE bench_commit_durable")
    return {"redis_ping_p50_us": percentiles(pings)["p50_us"], "pg_commit_p50_us": percentiles(commits)["p50_us"]}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench executor")
    p.add_argument("--json", action="store_true")
    p.add_argument("--redis-url")
    p.add_argument("--database-url", help="default: $DATABASE_URL, else a private PostgreSQL")
    p.add_argument("--intents", type=int, default=1000, help="intents in the latency run")
    p.add_argument("--rate", type=float, default=20.0, help="intents per second in the latency run")
    p.add_argument("--burst", type=int, default=1000, help="intents published at once in the throughput run")
    p.add_argument("--latency-ms", type=float, default=0.0, help="paper order latency (executor.order_latency_ms)")
    p.add_argument("--replicas", type=int, default=1, help="executor processes")
    args = p.parse_args(argv)
    from shared.service import install_event_loop_policy

    install_event_loop_policy()
    with bench_redis(args.redis_url) as redis_url, _database(args.database_url) as db_url:
        result = asyncio.run(_run(args, redis_url, db_url))
        result["baseline"] = asyncio.run(_baselines(redis_url, db_url))
    result["config"] = {"replicas": args.replicas, "order_latency_ms": args.latency_ms, "intents": args.intents,
                        "legs_per_intent": 2, "mode": "paper"}
    emit(result, args.json)
    return 0
