"""`arb bench pipeline --json`: tick-to-order latency of the real services, against a bare redis-py chain.

For each rate (default 1,000 and 5,000 market-data messages/s), in one run:

- **pipeline**: collector, detector, risk and executor as separate OS processes over Redis
  and PostgreSQL, in paper mode. The collector replays the bundled scenario (Binance
  recorded, Upbit synthetic) at a fixed rate of frames per second (``collector.replay_rate``),
  stamping each with the time it handles it. Settings for measuring: a 200 ms detector
  cooldown (enough orders, none queued behind another), start balances that do not run out,
  order latency 0 (the paper exchange answers at once: the figure is ours, not an exchange's).
  **Tick-to-order** = the executor sending an arbitrage's orders minus the collector's
  receive time of the frame that triggered its signal (``ts_origin_ns``). The send time is
  the orders' final ``order_updates`` time: with a 0 ms paper latency an order is filled at
  the instant it is sent. The stage breakdown uses the messages' own timestamps: collector
  receive -> publish (``ts_pub_ns`` of the triggering book), -> detector signal
  (``Signal.ts_ns``), -> risk decision (``Decision.ts_ns``, before the reservation), ->
  executor start (the orders' ``NEW`` time: reservation, ``orders`` hop, the executor taking
  the intent), -> order send (the arbitrage's lock and its order rows committed, one round
  trip). The first 1.5 s of each run are left out (first connections, caches).
- **bare**: the same number of Redis hops (3: collector -> detector -> risk -> executor) as
  four redis-py processes relaying each batch they read (XREADGROUP, then the XADDs to the
  next stream and the XACK in one pipelined round trip), the source stamping each message as
  it sends it, at the same rate: the floor any Redis pipeline
  of three hops pays on this machine at that moment. It runs right before and right after
  the pipeline (a shared machine's load moves), and the ratios use the mean of the two.

Redis: ``--redis`` / $REDIS_URL, else a private embedded one. PostgreSQL: ``--database`` /
$DATABASE_URL (a private schema, dropped after), else a private embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from backtest.runner import SCENARIO_CONFIG
from backtest.scenario import ScenarioParams, ensure
from backtest.stack import services
from shared.bench.common import bench_redis, drop_prefix, emit, percentiles
from shared.config import load_config
from shared.models import BookSnapshot, Decision, OrderIntent, OrderUpdate, Signal

HOPS = 3
WARMUP_NS = 1_500_000_000
FRAMES_PER_RECORDED_S = 126.0
"""Frames per second of the scenario at its recorded pace (Binance ~119, Upbit ~7)."""
COOLDOWN_MS = 200
"""At most five signals per route per second: enough orders to measure, few enough that one
executor never queues them (a queue would measure its backlog, not the pipeline)."""
BIG_BALANCES = {"binance": {"USDT": 10_000_000, "BTC": 200}, "upbit": {"KRW": 14_000_000_000, "BTC": 200}}


@contextlib.contextmanager
def bench_postgres(url: str | None) -> Iterator[str]:
    """A migrated schema of its own on ``url`` (dropped after), else a private embedded server."""
    import psycopg

    from shared.db import migrate, with_schema

    url = url or os.environ.get("DATABASE_URL")
    if url:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        scoped = with_schema(url, schema)
        migrate(scoped)
        try:
            yield scoped
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    from shared.embedded import start_postgres

    with tempfile.TemporaryDirectory(prefix="arb-bench-pg-") as tmp:
        pg = start_postgres(Path(tmp))
        try:
            scoped = pg.database_url("arb")
            from shared.db import ensure_database

            ensure_database(scoped)
            migrate(scoped)
            yield scoped
        finally:
            pg.stop()


# --------------------------------------------------------------------------- the pipeline


def _store_instruments(cfg: Any, captures: dict[str, list[str]]) -> None:
    import redis

    from services.collector.replay import ReplaySource
    from shared.streams import KeySpace

    replay = asyncio.run(ReplaySource.load(captures, cfg))
    client = redis.Redis.from_url(cfg.redis.url)
    keys = KeySpace(cfg.env, cfg.session)
    for found in replay.instruments.values():
        client.hset(keys.instruments(found[0].exchange), mapping={i.symbol: msgspec.json.encode(i) for i in found})
    client.close()


def run_pipeline(rate: float, seconds: float, redis_url: str, pg_url: str, work: Path) -> dict[str, Any]:
    namespace = f"bp{uuid.uuid4().hex[:8]}"
    # The premium starts 40 bps out, so the detector has something to signal from the first second.
    scenario = ensure(ScenarioParams(duration_s=min(346.0, rate * seconds / FRAMES_PER_RECORDED_S),
                                     premium_start=-0.004), work / "scenarios")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env.update({
        "ARB_CONFIG": str(SCENARIO_CONFIG), "REDIS_URL": redis_url, "DATABASE_URL": pg_url,
        "ARB_SESSION": namespace, "ARB_REDIS__STREAM_PREFIX": f"{namespace}:", "ARB_HTTP__BASE_PORT": "0",
        "ARB_VAR_DIR": str(work / namespace), "ARB_CLICKHOUSE__ENABLED": "false", "PYTHONUNBUFFERED": "1",
        "ARB_OPS__LOG_TO_POSTGRES": "false",
        "ARB_DETECTOR__COOLDOWN_MS": str(COOLDOWN_MS), "ARB_EXECUTOR__ORDER_LATENCY_MS": "0",
        "ARB_EXECUTOR__START_BALANCES": json.dumps(BIG_BALANCES),
        "ARB_COLLECTOR__REPLAY": json.dumps(scenario.captures), "ARB_COLLECTOR__REPLAY_RATE": str(rate),
    })
    cfg = load_config(environ=env)
    _store_instruments(cfg, scenario.captures)
    try:
        with services(cfg, env, work / namespace / "logs") as stack:
            for name in ("detector", "risk", "executor"):
                stack.start(name)
            stack.ready(["detector", "risk", "executor"], timeout=120)
            stack.start("collector")
            deadline = time.monotonic() + 60 + seconds * 3
            while not stack.health("collector").get("replay", {}).get("done"):
                if time.monotonic() > deadline or stack.procs["collector"].poll() is not None:
                    raise RuntimeError(f"the replay did not finish; see {work / namespace / 'logs'}")
                time.sleep(0.5)
            settle = time.monotonic() + 30
            while len(stack.read("executions")) < len(stack.read("orders")) and time.monotonic() < settle:
                time.sleep(0.2)
            streams = {name: stack.read(name) for name in ("signals", "decisions", "orders", "order_updates")}
            books = {m.ts_recv_ns: m for m in stack.read("md.BTC") + stack.read("md.USDT")
                     if isinstance(m, BookSnapshot)}
            replay = stack.health("collector")["replay"]
    finally:
        drop_prefix(redis_url, f"{namespace}:")  # streams
        drop_prefix(redis_url, f"arbitrage:{cfg.env}:{namespace}:")  # keys
        drop_prefix(redis_url, f"arbitrage:{{*:{cfg.env}:{namespace}}}:")  # hash-tagged keys (risk state, ...)
    return _latencies(streams, books, rate, replay)


def _latencies(streams: dict[str, list[Any]], books: dict[int, BookSnapshot], rate: float,
               replay: dict[str, Any]) -> dict[str, Any]:
    signals = {s.signal_id: s for s in streams["signals"] if isinstance(s, Signal)}
    decisions = {d.signal_id: d for d in streams["decisions"] if isinstance(d, Decision)}
    intents = [i for i in streams["orders"] if isinstance(i, OrderIntent)]
    sent: dict[str, int] = {}
    stored: dict[str, int] = {}
    for u in streams["order_updates"]:
        cid = u.client_order_id if isinstance(u, OrderUpdate) else ""
        if len(cid) == 23 and cid[:22] == u.arb_id:  # an entry leg: arb id + leg digit
            into = stored if u.status == "NEW" else sent
            into[u.arb_id] = min(into.get(u.arb_id, u.ts_ns), u.ts_ns)
    origins = [i.ts_origin_ns for i in intents if i.ts_origin_ns]
    first = min(origins) if origins else 0
    total: list[int] = []
    stages: dict[str, list[int]] = {"collector": [], "to_detector_signal": [], "to_risk_decision": [],
                                    "to_executor_start": [], "to_executor_send": []}
    for intent in intents:
        origin, send = intent.ts_origin_ns, sent.get(intent.arb_id)
        signal, decision = signals.get(intent.signal_id), decisions.get(intent.signal_id)
        if not origin or send is None or signal is None or decision is None or origin < first + WARMUP_NS:
            continue
        total.append(send - origin)
        book = books.get(origin)
        if book is not None:
            stages["collector"].append(book.ts_pub_ns - origin)
            stages["to_detector_signal"].append(signal.ts_ns - book.ts_pub_ns)
        stages["to_risk_decision"].append(decision.ts_ns - signal.ts_ns)
        start = stored.get(intent.arb_id, send)
        stages["to_executor_start"].append(start - decision.ts_ns)
        stages["to_executor_send"].append(send - start)
    return {
        "rate_msg_s": rate, "frames_played": replay["played"], "achieved_msg_s": replay["frames_per_s"],
        "signals": len(signals), "orders": len(intents),
        "decisions": dict(sorted(_count(d.reason for d in decisions.values()).items())),
        "tick_to_order": percentiles(total),
        "stages": {name: percentiles(values) for name, values in stages.items()},
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


# --------------------------------------------------------------------------- the bare chain


def _relay(url: str, prefix: str, index: int, hops: int, total: int, ready: Any, out: Any) -> None:
    from shared.service import install_event_loop_policy

    install_event_loop_policy()
    out.put(asyncio.run(_relay_async(url, prefix, index, hops, total, ready)))


async def _relay_async(url: str, prefix: str, index: int, hops: int, total: int, ready: Any) -> list[int]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    source, target = f"{prefix}s{index}", f"{prefix}s{index + 1}"
    with contextlib.suppress(Exception):
        await r.xgroup_create(source, "g", id="$", mkstream=True)
    ready.set()
    seen = 0
    latencies: list[int] = []
    while seen < total:
        reply: Any = await r.xreadgroup("g", "c", {source: ">"}, count=256, block=500)
        for _, entries in reply or ():
            # What a competent relay does: every message of the batch forwarded and acknowledged in
            # one round trip (the services' runtime pipelines the same way).
            pipe = r.pipeline(transaction=False)
            for _, fields in entries:
                seen += 1
                if index == hops:
                    latencies.append(time.time_ns() - int(fields[b"t"]))
                else:
                    pipe.xadd(target, fields)
            pipe.xack(source, "g", *(entry_id for entry_id, _ in entries))
            await pipe.execute()
    await r.aclose()
    return latencies


async def _source(url: str, prefix: str, rate: float, total: int, payload: bytes) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    start = time.time_ns()
    i = 0
    while i < total:
        due = start + int(i * 1e9 / rate)
        delay = (due - time.time_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        # every message due by now leaves in one round trip, each stamped as it is sent
        pipe = r.pipeline(transaction=False)
        now = time.time_ns()
        while i < total and start + int(i * 1e9 / rate) <= now:
            pipe.xadd(f"{prefix}s1", {b"d": payload, b"t": str(time.time_ns()).encode()})
            i += 1
        await pipe.execute()
    await r.aclose()


def run_bare(rate: float, seconds: float, redis_url: str, hops: int = HOPS) -> dict[str, Any]:
    from shared.service import install_event_loop_policy

    prefix = f"bench:chain:{uuid.uuid4().hex[:8]}:"
    total = int(rate * seconds)
    book = BookSnapshot(exchange="binance", symbol="BTC/USDT", seq=1, ts_exchange_ns=0, ts_recv_ns=0,
                        bids=[(61837.63 - k * 0.01, 1.5 + k) for k in range(20)],
                        asks=[(61837.64 + k * 0.01, 1.2 + k) for k in range(20)])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    readies = [ctx.Event() for _ in range(hops)]
    procs = [ctx.Process(target=_relay, args=(redis_url, prefix, k + 1, hops, total, readies[k], out))
             for k in range(hops)]
    for p in procs:
        p.start()
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a relay did not start")
        install_event_loop_policy()
        asyncio.run(_source(redis_url, prefix, rate, total, msgspec.json.encode(book)))
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        drop_prefix(redis_url, prefix)
    latencies = next(r for r in results if r)
    skip = int(rate * WARMUP_NS / 1e9)
    return {"rate_msg_s": rate, "hops": hops, "processes": hops + 1, "messages": total,
            "latency": percentiles(latencies[skip:])}


# --------------------------------------------------------------------------- command


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench pipeline", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rates", default="1000,5000", help="market-data messages per second, comma separated")
    p.add_argument("--seconds", type=float, default=12.0, help="seconds of replay per rate")
    p.add_argument("--redis", help="Redis URL (default: $REDIS_URL, else a private embedded one)")
    p.add_argument("--database", help="PostgreSQL URL (default: $DATABASE_URL, else a private embedded one)")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r]
    doc: dict[str, Any] = {"benchmark": "pipeline", "hops": HOPS, "warmup_s": WARMUP_NS / 1e9, "results": []}
    with tempfile.TemporaryDirectory(prefix="arb-bench-pipeline-") as tmp, bench_redis(args.redis) as redis_url, \
            bench_postgres(args.database) as pg_url:
        work = Path(tmp)
        for rate in rates:
            # The machine is shared: the bare chain runs right before and right after the pipeline,
            # and the ratio is taken against the mean of the two.
            before = run_bare(rate, args.seconds, redis_url)
            pipeline = run_pipeline(rate, args.seconds, redis_url, pg_url, work)
            after = run_bare(rate, args.seconds, redis_url)
            bare = {q: round((before["latency"][q] + after["latency"][q]) / 2, 1) for q in ("p50_us", "p99_us")}
            row: dict[str, Any] = {"rate_msg_s": rate, "pipeline": pipeline, "bare_chain": bare,
                                   "bare_chain_runs": [before, after]}
            p50, p99 = pipeline["tick_to_order"].get("p50_us"), pipeline["tick_to_order"].get("p99_us")
            if p50 and p99:
                row["p50_ratio_vs_bare"] = round(p50 / bare["p50_us"], 2)
                row["p99_ratio_vs_bare"] = round(p99 / bare["p99_us"], 2)
            doc["results"].append(row)
    doc["target"] = "at 1,000 msg/s: tick-to-order p99 within 1.5x of the bare chain's p99"
    emit(doc, args.json)
    return 0
