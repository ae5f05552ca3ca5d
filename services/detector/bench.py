"""`arb bench detector --json`: cost of the detector cores per book update, and the service's
throughput over Redis, each next to a baseline measured in the same run.

- spatial: 8 venues of one asset (USDT, KRW and USDC books, FX applied), 20 levels a side;
  each update replaces one venue's book with a random-walk move, a few percent of them
  crossing another venue (1% of moves jump 40 bps, and a jumped book stays off until its
  venue's next update). Baseline: decoding that book from its bus JSON (msgspec), a cost
  every update pays before the core sees it.
- triangular: 1,000 markets on one exchange (alts against USDT, BTC and ETH, plus the three
  hub markets), 10 levels a side; each update moves one market chosen at random (1% of moves
  jump 60 bps, past the three fees). Updates of
  the hub markets (hundreds of cycles each) are reported on their own.
- service: the detector service (spatial, 8 venues) as its own process reads N book updates
  from ``md.BTC``; throughput is N over the time until its group has read and acknowledged
  them all. Baseline: a bare redis-py XREADGROUP + XACK loop (no decoding, no detection) on
  the same messages.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
import uuid
from typing import Any

from services.detector.books import FallbackRules, InstrumentTable
from services.detector.spatial import SpatialConfig, SpatialDetector
from services.detector.triangular import TriangularConfig, TriangularDetector
from shared.bench.common import bench_redis, drop_prefix, emit, percentiles
from shared.models import BookSnapshot, FxRate, Level, decoder_for, encode

_S = 1_000_000_000
VENUES = (("binance", "USDT"), ("okx", "USDT"), ("bybit", "USDT"), ("kucoin", "USDT"), ("gateio", "USDT"),
          ("bitget", "USDC"), ("upbit", "KRW"), ("bithumb", "KRW"))
KRW_PER_USDT = 1380.0
USDT_PER_USDC = 1.0002


def _levels(rng: random.Random, best: float, step: float, depth: int, sign: int, digits: int) -> list[Level]:
    out, price = [], best
    for _ in range(depth):
        out.append((round(price, digits), round(rng.uniform(0.01, 2.0), 6)))
        price += sign * step * rng.randint(1, 4)
    return out


def _venue_book(rng: random.Random, exchange: str, quote: str, mid_usdt: float, seq: int, now: int,
                depth: int) -> BookSnapshot:
    scale = KRW_PER_USDT if quote == "KRW" else (1 / USDT_PER_USDC if quote == "USDC" else 1.0)
    digits = 0 if quote == "KRW" else 2
    # Venues disagree by a few bps; now and then one jumps by 40 bps, past both fees: those cross.
    jump = rng.choice((-0.004, 0.004)) if rng.random() < 0.01 else 0.0
    mid = mid_usdt * (1 + rng.gauss(0.0, 0.0004) + jump) * scale
    half = mid * rng.uniform(0.00002, 0.0002)
    step = mid * 0.00002
    return BookSnapshot(exchange=exchange, symbol=f"BTC/{quote}", seq=seq, ts_exchange_ns=now, ts_recv_ns=now,
                        bids=_levels(rng, mid - half, step, depth, -1, digits),
                        asks=_levels(rng, mid + half, step, depth, +1, digits))


def bench_spatial(updates: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    fees = {ex: 0.0005 if quote == "KRW" else 0.001 for ex, quote in VENUES}
    det = SpatialDetector(SpatialConfig(max_book_age_ns=3600 * _S, max_fx_age_ns=3600 * _S, cooldown_ns=0),
                          InstrumentTable(FallbackRules(fees)))
    now = 1_700_000_000 * _S
    det.on_fx(FxRate(pair="USDT/KRW", rate=KRW_PER_USDT, bid=KRW_PER_USDT - 0.5, ask=KRW_PER_USDT + 0.5,
                     source="bench", ts_source_ns=now), now)
    det.on_fx(FxRate(pair="USDC/USDT", rate=USDT_PER_USDC, source="bench", ts_source_ns=now), now)
    mid = 100_000.0
    for i, (exchange, quote) in enumerate(VENUES):
        det.on_book(_venue_book(rng, exchange, quote, mid, i, now, 20), now)
    books = []
    for i in range(updates):
        mid *= 1 + rng.gauss(0.0, 0.00005)
        exchange, quote = VENUES[rng.randrange(len(VENUES))]
        books.append(_venue_book(rng, exchange, quote, mid, 100 + i, now + i * 1000, 20))
    payloads = [encode(b) for b in books]
    decode = decoder_for(BookSnapshot).decode
    decode_ns = []
    for payload in payloads:
        t0 = time.perf_counter_ns()
        decode(payload)
        decode_ns.append(time.perf_counter_ns() - t0)
    quiet: list[int] = []
    signalled: list[int] = []
    signals = 0
    for book in books:
        t0 = time.perf_counter_ns()
        out = det.on_book(book, book.ts_recv_ns)
        elapsed = time.perf_counter_ns() - t0
        (signalled if out else quiet).append(elapsed)
        signals += len(out)
    return {
        "venues": len(VENUES),
        "levels": 20,
        "updates": updates,
        "updates_with_signal_share": round(len(signalled) / updates, 4),
        "signals": signals,
        "per_update": percentiles(quiet + signalled),
        "per_update_with_signal": percentiles(signalled),
        "per_update_without_signal": percentiles(quiet),
        "baseline_decode_book_json": percentiles(decode_ns),
        "target_p50_us": 20,
    }


def _triangular_markets(n_markets: int) -> list[tuple[str, str]]:
    markets = [("BTC", "USDT"), ("ETH", "USDT"), ("ETH", "BTC")]
    i = 0
    while len(markets) < n_markets:
        alt = f"A{i:03d}"
        for quote in ("USDT", "BTC", "ETH"):
            if len(markets) < n_markets:
                markets.append((alt, quote))
        i += 1
    return markets


def _tri_book(rng: random.Random, base: str, quote: str, value: dict[str, float], seq: int, now: int) -> BookSnapshot:
    jump = rng.choice((-0.006, 0.006)) if rng.random() < 0.01 else 0.0  # now and then past three fees
    mid = value[base] / value[quote] * (1 + rng.gauss(0.0, 0.0004) + jump)
    half = mid * rng.uniform(0.0001, 0.0005)
    step = mid * 0.0001
    return BookSnapshot(exchange="ex", symbol=f"{base}/{quote}", seq=seq, ts_exchange_ns=now, ts_recv_ns=now,
                        bids=[(mid - half - k * step, rng.uniform(0.1, 5.0)) for k in range(10)],
                        asks=[(mid + half + k * step, rng.uniform(0.1, 5.0)) for k in range(10)])


def bench_triangular(updates: int, seed: int, n_markets: int = 1000) -> dict[str, Any]:
    rng = random.Random(seed)
    markets = _triangular_markets(n_markets)
    value = {"USDT": 1.0, "BTC": 100_000.0, "ETH": 4_000.0}
    for base, _ in markets:
        value.setdefault(base, rng.uniform(0.05, 50.0))
    det = TriangularDetector(TriangularConfig(max_book_age_ns=3600 * _S, cooldown_ns=0),
                             InstrumentTable(FallbackRules({"ex": 0.001})))
    now = 1_700_000_000 * _S
    t0 = time.perf_counter()
    for i, (base, quote) in enumerate(markets):
        det.on_book(_tri_book(rng, base, quote, value, i, now), now)
    build_s = time.perf_counter() - t0
    hubs = {"BTC/USDT", "ETH/USDT", "ETH/BTC"}
    books = []
    for i in range(updates):
        base, quote = markets[rng.randrange(len(markets))]
        books.append(_tri_book(rng, base, quote, value, n_markets + i, now + i * 1000))
    for symbol in sorted(hubs):  # make sure the hub cost is measured even in short runs
        base, _, quote = symbol.partition("/")
        books += [_tri_book(rng, base, quote, value, 10**9 + k, now + (updates + k) * 1000) for k in range(50)]
    every, hub, signals = [], [], 0
    for book in books:
        t0_ns = time.perf_counter_ns()
        out = det.on_book(book, book.ts_recv_ns)
        elapsed = time.perf_counter_ns() - t0_ns
        signals += len(out)
        if book.symbol in hubs:
            hub.append(elapsed)
        if book.seq < 10**9:
            every.append(elapsed)
    return {
        "markets": len(markets),
        "cycles": len(det.cycles),
        "graph_build_s": round(build_s, 3),
        "updates": updates,
        "signals": signals,
        "per_update": percentiles(every),
        "per_hub_update": percentiles(hub),
        "target_p50_us": 50,
    }


# ------------------------------------------------------------------ service over Redis


def _service_env(url: str, prefix: str, session: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env.update({
        "REDIS_URL": url,
        "ARB_ENV": "development",
        "ARB_SESSION": session,
        "ARB_REDIS__STREAM_PREFIX": prefix,
        "ARB_HTTP__BASE_PORT": "0",
        "ARB_LOG__LEVEL": "WARNING",
        "ARB_DETECTOR__STRATEGIES": '["spatial"]',
        "ARB_DETECTOR__MAX_BOOK_AGE_MS": "3600000",
    })
    for exchange, quote in VENUES:
        env[f"ARB_EXCHANGES__{exchange.upper()}__ENABLED"] = "true"
        env[f"ARB_EXCHANGES__{exchange.upper()}__SYMBOLS"] = f'["BTC/{quote}"]'
    return env


async def _group_info(redis: Any, key: str, group: bytes) -> dict[Any, Any] | None:
    try:
        groups = await redis.xinfo_groups(key)
    except Exception:
        return None
    return next((g for g in groups if g["name"] == group), None)


def _raw_consumer(url: str, key: str, n: int, batch: int, ready: Any, out: Any) -> None:
    async def run() -> float:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(url)
        await r.xgroup_create(key, "raw", id="$", mkstream=True)
        ready.set()
        seen = 0
        first = 0.0
        while seen < n:
            reply: Any = await r.xreadgroup("raw", "c1", {key: ">"}, count=batch, block=200)
            for _, entries in reply or ():
                first = first or time.perf_counter()
                await r.xack(key, "raw", *[eid for eid, _ in entries])
                seen += len(entries)
        await r.aclose()
        return time.perf_counter()

    out.put(asyncio.run(run()))


async def _publish(url: str, key: str, payloads: list[bytes]) -> float:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    started = time.perf_counter()
    for lo in range(0, len(payloads), 500):
        pipe = r.pipeline(transaction=False)
        for payload in payloads[lo:lo + 500]:
            pipe.xadd(key, {b"d": payload})
        await pipe.execute()
    await r.aclose()
    return started


def _payloads(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    mid = 100_000.0
    out = []
    now = time.time_ns()
    for i in range(n):
        mid *= 1 + rng.gauss(0.0, 0.00005)
        exchange, quote = VENUES[rng.randrange(len(VENUES))]
        out.append(encode(_venue_book(rng, exchange, quote, mid, i, now + i * 1000, 20)))
    return out


def bench_service(url: str, n: int, seed: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    session = f"bench-{uuid.uuid4().hex[:8]}"
    prefix = f"bench:detector:{session}:"
    key = prefix + "md.BTC"
    payloads = _payloads(n, seed)
    proc = subprocess.Popen([sys.executable, "-m", "services.detector", "--instance", "bench"],
                            env=_service_env(url, prefix, session), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        async def run_detector() -> dict[str, Any]:
            r = aioredis.Redis.from_url(url)
            deadline = time.monotonic() + 30
            while await _group_info(r, key, b"spatial") is None:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the detector service did not start")
                await asyncio.sleep(0.05)
            started = await _publish(url, key, payloads)
            newest: Any = await r.xrevrange(key, count=1)
            last_id = newest[0][0]
            while True:
                info = await _group_info(r, key, b"spatial")
                if info and info["last-delivered-id"] == last_id and info["pending"] == 0:
                    break
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            produced = await r.xlen(prefix + "signals")
            await r.aclose()
            return {"messages": n, "seconds": round(elapsed, 3), "msg_per_s": round(n / elapsed),
                    "signals": produced}

        detector = asyncio.run(run_detector())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        drop_prefix(url, prefix)
        drop_prefix(url, f"arbitrage:development:{session}:")

    raw_key = prefix + "raw.md.BTC"
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_raw_consumer, args=(url, raw_key, n, 256, ready, out))
    child.start()
    try:
        ready.wait(30)
        started = asyncio.run(_publish(url, raw_key, payloads))
        finished = out.get(timeout=120)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
        drop_prefix(url, prefix)
    elapsed = finished - started
    baseline = {"messages": n, "seconds": round(elapsed, 3), "msg_per_s": round(n / elapsed)}
    return {"detector_service": detector, "baseline_raw_xreadgroup_xack": baseline,
            "note": "the publisher pipelines 500 XADDs per round trip in both runs"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb bench detector")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--updates", type=int, default=20_000, help="book updates per core benchmark")
    parser.add_argument("--messages", type=int, default=20_000, help="book updates through Redis")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--redis-url", help="default: $REDIS_URL, else a private embedded Redis")
    parser.add_argument("--no-service", action="store_true", help="skip the Redis throughput part")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "spatial": bench_spatial(args.updates, args.seed),
        "triangular": bench_triangular(args.updates, args.seed),
    }
    if not args.no_service:
        with bench_redis(args.redis_url) as url:
            result["service"] = bench_service(url, args.messages, args.seed)
    emit(result, args.json)
    return 0


