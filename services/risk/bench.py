"""`arb bench risk --json`: what a risk decision costs, against a bare hop measured in the same run.

Three measurements, each against its own baseline, in alternating rounds (medians reported):

- hop latency: signals published at a steady rate, each stamped with its send time
  (``ts_origin_ns``); a reader takes the relay's output and records receive - send.
  Baseline relay: bare redis-py in its own process (XREADGROUP -> XADD + XACK in one
  pipeline, payload untouched). Calibration relay: the same plus one trivial EVALSHA round
  trip per batch, the floor of any design that takes one atomic step in Redis per batch and
  then publishes. Risk relay: the real service (``python -m services.risk``), every signal
  approved (the most work: all checks, then every counter reserved), its ``Decision`` read
  back; reservations lapse after 1 s (no executor here), so the state stays the size a live
  one has. The service's deciding script publishes the approval and acknowledges the signal
  itself, so its hop is XREADGROUP -> EVALSHA: the same round trips as the bare relay, plus
  the checks in Python and the script's run in Redis. The difference to the bare hop is what
  deciding adds to a hop.
- throughput: N signals published at once; decisions per second of one replica vs. the
  bare relay's messages per second.
- check-and-reserve: the atomic Lua step alone (without publishing), EVALSHA round trips
  from this process on the state's deciding connection, against a PING round trip.

PostgreSQL is off unless ``--database-url`` is given (snapshots then run as in production
and their rows are deleted afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

from shared.bench.common import bench_redis, drop_prefix, emit, percentiles

GROUP = "risk"
SIGNALS = "signals"
RELAY_OUT = "decisions"
TARGET_ADDED_P50_US = 300.0
_BENCH_RISK: dict[str, str] = {
    "ARB_RISK__MAX_OPEN_ARBITRAGES": "100000000",
    "ARB_RISK__ORDER_RATE_LIMIT": "100000000",
    "ARB_RISK__MAX_SIGNAL_AGE_MS": "120000",
    "ARB_RISK__VERDICT_RETENTION_S": "600",
    "ARB_RISK__INTENT_TTL_MS": "1000",
    "ARB_RISK__RESERVATION_GRACE_MS": "0",
    "ARB_RISK__REQUIRE_BALANCES": "false",
    "ARB_RISK__ALERT_INTERVAL_S": "60",
    "ARB_RISK__PORTFOLIO__MAX_TOTAL_EXPOSURE": "1e12",
    "ARB_RISK__PORTFOLIO__MAX_EXPOSURE_PER_COIN": "1e12",
    "ARB_RISK__PORTFOLIO__MAX_EXPOSURE_PER_EXCHANGE": "1e12",
}


class _Origin(msgspec.Struct):
    ts_origin_ns: int


_origin = msgspec.json.Decoder(_Origin)


def _signal(i: int, now: int, tag: str) -> bytes:
    from decimal import Decimal

    from shared.models import Signal, SignalLeg, encode

    venues = [("binance", "okx"), ("okx", "bybit"), ("bybit", "binance")][i % 3]
    legs = [SignalLeg(exchange=venues[0], symbol="BTC/USDT", side="buy", price=Decimal("60000.1"),
                      quantity=Decimal("0.01"), book_seq=i, book_age_ns=2_000_000),
            SignalLeg(exchange=venues[1], symbol="BTC/USDT", side="sell", price=Decimal("60030.2"),
                      quantity=Decimal("0.01"), book_seq=i, book_age_ns=3_000_000)]
    return encode(Signal(signal_id=f"{tag}-{i}", strategy="spatial", asset="BTC", legs=legs, gross_edge_bps=5.0,
                         net_edge_bps=2.0, expected_profit=0.12, profit_currency="USDT", notional=600.3,
                         ts_ns=now, ts_origin_ns=now))


# ------------------------------------------------------------------ relays


def _bare_relay(url: str, prefix: str, batch: int, ready: Any, stop: Any, extra_round_trip: bool) -> None:
    """XREADGROUP -> XADD (+ XACK) with redis-py, nothing else: the baseline hop (optionally plus
    one trivial script round trip per batch, for calibration)."""
    from shared.service import install_event_loop_policy

    install_event_loop_policy()

    async def run() -> None:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(url)
        src, dst = prefix + SIGNALS, prefix + RELAY_OUT
        with contextlib.suppress(redis.ResponseError):  # the group exists already
            await r.xgroup_create(src, GROUP, id="0", mkstream=True)
        script = r.register_script("return 1")
        await script()
        ready.set()
        while not stop.is_set():
            reply: Any = await r.xreadgroup(GROUP, "bare", {src: ">"}, count=batch, block=200)
            if reply and extra_round_trip:
                await script()
            for _, entries in reply or ():
                pipe = r.pipeline(transaction=False)
                for _, fields in entries:
                    pipe.xadd(dst, {b"d": fields[b"d"]})
                pipe.xack(src, GROUP, *(eid for eid, _ in entries))
                await pipe.execute()
        await r.aclose()

    asyncio.run(run())


class _Relay:
    def __init__(self, kind: str, url: str, prefix: str, session: str, batch: int, database_url: str | None,
                 log_dir: Path) -> None:
        self.kind, self.url, self.prefix, self.session, self.batch = kind, url, prefix, session, batch
        self.database_url = database_url
        self.log_dir = log_dir
        self._proc: Any = None
        self._stop: Any = None

    def start(self) -> None:
        if self.kind != "risk":
            ctx = mp.get_context("spawn")
            ready, self._stop = ctx.Event(), ctx.Event()
            self._proc = ctx.Process(target=_bare_relay, args=(self.url, self.prefix, self.batch, ready, self._stop,
                                                               self.kind == "bare+rtt"))
            self._proc.start()
            if not ready.wait(30):
                raise RuntimeError("bare relay did not start")
            return
        _init_state(self.url, self.session)  # so the service needs no PostgreSQL to start
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
        env.update(_BENCH_RISK)
        env.update({
            "REDIS_URL": self.url, "ARB_SESSION": self.session, "ARB_ENV": "development",
            "ARB_REDIS__STREAM_PREFIX": self.prefix, "ARB_REDIS__BATCH_SIZE": str(self.batch),
            "ARB_HTTP__BASE_PORT": "0", "ARB_LOG__LEVEL": "ERROR", "ARB_VAR_DIR": str(self.log_dir),
            "DATABASE_URL": self.database_url or "postgresql://bench@127.0.0.1:1/none",
        })
        log = open(self.log_dir / f"{self.session}.log", "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen([sys.executable, "-m", "services.risk", "--instance", "bench"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis.from_url(self.url)
        from shared.streams import KeySpace

        key = KeySpace("development", self.session).heartbeats()
        deadline = time.monotonic() + 60
        while not client.hexists(key, "bench"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"risk did not start: see {self.log_dir / (self.session + '.log')}")
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.kind != "risk":
            self._stop.set()
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            return
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _init_state(url: str, session: str) -> None:
    from services.risk.redis_state import RedisRiskState
    from services.risk.state import StateDump
    from shared.runtime import Bus
    from shared.streams import KeySpace

    async def run() -> None:
        bus = Bus.from_url(url, keys=KeySpace("development", session))
        state = RedisRiskState(bus)
        await state.restore(StateDump(ts_ms=0))
        await state.mark_initialised("bench")
        await bus.close()

    asyncio.run(run())


# ------------------------------------------------------------------ driver


async def _drive(url: str, prefix: str, n: int, rate: float | None, tag: str) -> dict[str, Any]:
    """Publish ``n`` signals (paced, or at once) and read the relay's ``n`` outputs."""
    import redis.asyncio as aioredis

    pub = aioredis.Redis.from_url(url)
    sub = aioredis.Redis.from_url(url)
    src, dst = prefix + SIGNALS, prefix + RELAY_OUT
    last_id: Any = (await sub.xrevrange(dst, count=1) or [(b"0-0", {})])[0][0]
    latencies: list[int] = []
    done = asyncio.Event()
    first_sent = 0
    last_seen = 0

    async def read() -> None:
        nonlocal last_id, last_seen
        while len(latencies) < n:
            reply: Any = await sub.xread({dst: last_id}, count=1000, block=1000)
            for _, entries in reply or ():
                now = time.time_ns()
                for eid, fields in entries:
                    last_id = eid
                    latencies.append(now - _origin.decode(fields[b"d"]).ts_origin_ns)
                last_seen = now
        done.set()

    reader = asyncio.create_task(read())
    start = time.time_ns()
    first_sent = start
    if rate:
        for i in range(n):
            due = start + int(i * 1e9 / rate)
            delay = (due - time.time_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            await pub.xadd(src, {b"d": _signal(i, time.time_ns(), tag)})
    else:
        for lo in range(0, n, 500):
            pipe = pub.pipeline(transaction=False)
            now = time.time_ns()
            for i in range(lo, min(n, lo + 500)):
                pipe.xadd(src, {b"d": _signal(i, now, tag)})
            await pipe.execute()
    await asyncio.wait_for(done.wait(), timeout=300)
    await reader
    await pub.aclose()
    await sub.aclose()
    elapsed = (last_seen - first_sent) / 1e9
    stats: dict[str, Any] = percentiles(latencies)
    stats["per_s"] = round(n / elapsed) if elapsed > 0 else None
    return stats


def _round(kind: str, url: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from shared.service import install_event_loop_policy

    session = f"bench{uuid.uuid4().hex[:10]}"
    prefix = f"bench:risk:{session}:"
    relay = _Relay(kind, url, prefix, session, args.batch, args.database_url, log_dir)
    relay.start()
    install_event_loop_policy()
    try:
        asyncio.run(_drive(url, prefix, args.warmup, args.rate, "warm"))
        latency = asyncio.run(_drive(url, prefix, args.messages, args.rate, "lat"))
        throughput = asyncio.run(_drive(url, prefix, args.throughput_messages, None, "thr"))
    finally:
        relay.stop()
        drop_prefix(url, prefix)
        drop_prefix(url, f"arbitrage:{{guard:development:{session}}}")
        drop_prefix(url, f"arbitrage:development:{session}:")
        if args.database_url and kind == "risk":
            _drop_snapshots(args.database_url, session)
    return {"latency": latency, "throughput": throughput["per_s"]}


def _drop_snapshots(url: str, session: str) -> None:
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        conn.execute("DELETE FROM risk_guard_snapshots WHERE session = %s", (session,))


async def _check_and_reserve(url: str, n: int) -> dict[str, Any]:
    """The Lua step alone: EVALSHA round trips vs PING round trips, same connection, same process."""
    from services.risk.core import Assessment, RiskBook
    from services.risk.limits import RiskLimits
    from services.risk.redis_state import RedisRiskState
    from services.risk.state import StateDump
    from shared.config import load_config
    from shared.models import decode
    from shared.runtime import Bus
    from shared.streams import KeySpace

    session = f"bench{uuid.uuid4().hex[:10]}"
    env = {**_BENCH_RISK, "ARB_SESSION": session}
    cfg = load_config(environ=env)
    book = RiskBook(RiskLimits.from_config(cfg), env=cfg.env, session=session)
    bus = Bus.from_url(url, keys=KeySpace(cfg.env, session))
    state = RedisRiskState(bus)
    await state.restore(StateDump(ts_ms=0))
    await state.mark_initialised("bench")
    decide: list[int] = []
    ping: list[int] = []
    core: list[int] = []
    try:
        for i in range(n + 200):
            now = time.time_ns()
            signal: Any = decode(_signal(i, now, "cr"))
            t0 = time.perf_counter_ns()
            assessed = book.assess(signal, now)
            t1 = time.perf_counter_ns()
            assert isinstance(assessed, Assessment)
            outcome = await state.decide(assessed.request)
            t2 = time.perf_counter_ns()
            verdict = book.decided(signal, assessed, outcome, now)
            t3 = time.perf_counter_ns()
            assert verdict.intent is not None
            await bus.redis.ping()
            t4 = time.perf_counter_ns()
            if i >= 200:  # after warm-up
                core.append((t1 - t0) + (t3 - t2))
                decide.append(t2 - t1)
                ping.append(t4 - t3)
    finally:
        keys = [k async for k in bus.redis.scan_iter(match=f"arbitrage:{{guard:development:{session}}}*")]
        if keys:
            await bus.redis.delete(*keys)
        await state.close()
        await bus.close()
    d, p = percentiles(decide), percentiles(ping)
    return {"decide_evalsha": d, "ping": p, "core_python": percentiles(core),
            "added_p50_us": round(d["p50_us"] - p["p50_us"], 1)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench risk")
    p.add_argument("--json", action="store_true")
    p.add_argument("--redis-url")
    p.add_argument("--database-url", help="snapshot to this PostgreSQL as in production (default: no database)")
    p.add_argument("--rate", type=float, default=500.0, help="latency test rate, signals/s")
    p.add_argument("--messages", type=int, default=3000, help="latency samples per round")
    p.add_argument("--throughput-messages", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--batch", type=int, default=256, help="consumer batch size (both relays)")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/risk rounds; medians are reported")
    p.add_argument("--check-and-reserve", type=int, default=3000, help="direct Lua round trips measured")
    args = p.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "bare+rtt": [], "risk": []}
    with bench_redis(args.redis_url) as url, tempfile.TemporaryDirectory(prefix="arb-bench-risk-") as tmp:
        for r in range(args.rounds):
            kinds = ["bare", "bare+rtt", "risk"]
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                runs[kind].append(_round(kind, url, args, Path(tmp)))
        direct = asyncio.run(_check_and_reserve(url, args.check_and_reserve))

    def med(kind: str, key: str) -> float:
        values = sorted(x["latency"][key] for x in runs[kind])
        return float(values[len(values) // 2])

    bare = {k: med("bare", k) for k in ("p50_us", "p90_us", "p99_us")}
    floor = {k: med("bare+rtt", k) for k in ("p50_us", "p90_us", "p99_us")}
    risk = {k: med("risk", k) for k in ("p50_us", "p90_us", "p99_us")}
    added_p50 = round(risk["p50_us"] - bare["p50_us"], 1)
    result: dict[str, Any] = {
        "hop_latency": {
            "rate_msg_s": args.rate, "messages_per_round": args.messages, "rounds": args.rounds,
            "bare_xreadgroup_xadd": bare, "risk_decision": risk,
            "added_p50_us": added_p50, "added_p99_us": round(risk["p99_us"] - bare["p99_us"], 1),
            "calibration_bare_plus_one_round_trip": floor,
            "added_p50_us_over_calibration": round(risk["p50_us"] - floor["p50_us"], 1),
            "target_added_p50_us": TARGET_ADDED_P50_US, "target_met": added_p50 < TARGET_ADDED_P50_US,
            "per_round": {k: [{q: x["latency"][q] for q in ("p50_us", "p99_us", "max_us")} for x in v]
                          for k, v in runs.items()},
        },
        "throughput": {
            "messages": args.throughput_messages,
            "bare_msg_s": sorted(x["throughput"] for x in runs["bare"])[len(runs["bare"]) // 2],
            "calibration_msg_s": sorted(x["throughput"] for x in runs["bare+rtt"])[len(runs["bare+rtt"]) // 2],
            "risk_decisions_s": sorted(x["throughput"] for x in runs["risk"])[len(runs["risk"]) // 2],
            "per_round": {k: [x["throughput"] for x in v] for k, v in runs.items()},
        },
        "check_and_reserve": direct,
        "setup": {"replicas": 1, "verdict": "approved (every check, every counter reserved)",
                  "batch": args.batch, "postgres_snapshots": bool(args.database_url),
                  "python": sys.version.split()[0], "cpus": os.cpu_count()},
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))

