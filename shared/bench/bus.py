"""`arb bench bus --json`: one hop through the runtime against bare redis-py, same run.

Two measurements, each done twice (runtime, then raw), producer and consumer in separate
processes:
- latency: messages published at a steady rate (default 1,000/s); each carries its send
  time; the consumer records receive - send. Runtime = ``Producer.publish`` ->
  ``Consumer`` (decode into a ``BookSnapshot``, handler, XACK). Raw = one ``XADD`` per
  message -> ``XREADGROUP`` + ``XACK`` with the payload left undecoded.
- throughput: N messages as fast as possible; runtime pipelines per loop turn, raw
  pipelines the same number of XADDs per round trip; the consumer's batch size is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from typing import Any

from shared.bench.common import bench_redis, drop_prefix, emit, percentiles, unique_prefix
from shared.models import BookSnapshot, decoder_for, encode

STREAM = "bench.bus"
decode_book = decoder_for(BookSnapshot).decode
GROUP = "bench"


def _book(i: int) -> BookSnapshot:
    return BookSnapshot(
        exchange="binance",
        symbol="BTC/USDT",
        seq=i,
        bids=[(61837.63 - k * 0.01, 1.5 + k) for k in range(20)],
        asks=[(61837.64 + k * 0.01, 1.2 + k) for k in range(20)],
        ts_exchange_ns=0,
        ts_recv_ns=0,
        ts_pub_ns=0,
    )


# ------------------------------------------------------------------ consumers (child processes)


def _consume(kind: str, url: str, prefix: str, n: int, batch: int, ready: Any, out: Any) -> None:
    from shared.service import install_event_loop_policy

    install_event_loop_policy()
    out.put(asyncio.run(_consume_async(kind, url, prefix, n, batch, ready)))


async def _consume_async(kind: str, url: str, prefix: str, n: int, batch: int, ready: Any) -> dict[str, Any]:
    from shared.runtime import Bus, Consumer, Delivery, ensure_group

    bus = Bus.from_url(url, prefix=prefix)
    await ensure_group(bus, STREAM, GROUP, "$")
    lat: list[int] = []
    first = last = 0
    if kind == "runtime":
        consumer: Consumer

        async def handle(d: Delivery) -> None:
            nonlocal first, last
            now = time.time_ns()
            lat.append(now - d.message.ts_pub_ns)
            first = first or now
            last = now
            if len(lat) >= n:
                consumer.stop()

        consumer = Consumer(bus, group=GROUP, streams=[STREAM], handler=handle, name="c1",
                            batch_size=batch, block_ms=200, start_id="$")
        ready.set()
        await consumer.run()
    else:
        r = bus.redis
        key = bus.stream(STREAM)
        ready.set()
        while len(lat) < n:
            reply: Any = await r.xreadgroup(GROUP, "c1", {key: ">"}, count=batch, block=200)
            if not reply:
                continue
            ids = []
            for _, entries in reply:
                for eid, fields in entries:
                    now = time.time_ns()
                    sent = int(fields[b"t"]) if b"t" in fields else decode_book(fields[b"d"]).ts_pub_ns
                    lat.append(now - sent)
                    first = first or now
                    last = now
                    ids.append(eid)
            await r.xack(key, GROUP, *ids)
    await bus.close()
    return {"latencies": lat, "first_ns": first, "last_ns": last}


# ------------------------------------------------------------------ producers (this process)


async def _produce(kind: str, url: str, prefix: str, n: int, rate: float | None, burst: int) -> int:
    from shared.runtime import Bus, Producer

    bus = Bus.from_url(url, prefix=prefix)
    template = _book(0)
    start = time.time_ns()
    if kind == "runtime":
        producer = Producer(bus)
        for i in range(n):
            if rate:
                await _pace(start, i, rate)
            template.seq = i
            template.ts_pub_ns = time.time_ns()
            producer.publish(STREAM, template)
            if not rate and i % burst == burst - 1:
                await asyncio.sleep(0)
        await producer.flush()
    else:
        r = bus.redis
        key = bus.stream(STREAM)
        if rate:
            for i in range(n):
                await _pace(start, i, rate)
                template.seq = i
                now = time.time_ns()
                template.ts_pub_ns = now
                await r.xadd(key, {b"d": encode(template), b"t": str(now)})
        else:
            for lo in range(0, n, burst):
                pipe = r.pipeline(transaction=False)
                for i in range(lo, min(n, lo + burst)):
                    template.seq = i
                    now = time.time_ns()
                    template.ts_pub_ns = now
                    pipe.xadd(key, {b"d": encode(template), b"t": str(now)})
                await pipe.execute()
    await bus.close()
    return start


async def _pace(start_ns: int, i: int, rate: float) -> None:
    due = start_ns + int(i * 1e9 / rate)
    delay = (due - time.time_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


def _run_one(kind: str, url: str, n: int, rate: float | None, batch: int, burst: int) -> dict[str, Any]:
    from shared.service import install_event_loop_policy

    prefix = unique_prefix(f"bus-{kind}")
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_consume, args=(kind, url, prefix, n, batch, ready, out))
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("consumer did not start")
        time.sleep(0.3)  # let the first XREADGROUP block
        install_event_loop_policy()
        start_ns = asyncio.run(_produce(kind, url, prefix, n, rate, burst))
        res = out.get(timeout=120)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
        drop_prefix(url, prefix)
    elapsed = (res["last_ns"] - start_ns) / 1e9
    stats: dict[str, Any] = percentiles(res["latencies"])
    stats["throughput_msg_s"] = round(len(res["latencies"]) / elapsed) if elapsed > 0 else None
    return stats


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench bus")
    p.add_argument("--json", action="store_true")
    p.add_argument("--redis-url")
    p.add_argument("--rate", type=float, default=1000.0, help="latency test rate, msg/s")
    p.add_argument("--latency-messages", type=int, default=5000)
    p.add_argument("--throughput-messages", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256, help="consumer batch size (both sides)")
    p.add_argument("--burst", type=int, default=1000, help="producer messages per pipeline (both sides)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating runtime/raw rounds; medians are reported (shared machines are noisy)")
    args = p.parse_args(argv)
    rounds: dict[str, list[dict[str, Any]]] = {"runtime": [], "raw": []}
    throughput: dict[str, list[int]] = {"runtime": [], "raw": []}
    with bench_redis(args.redis_url) as url:
        for r in range(args.rounds):
            order = ("runtime", "raw") if r % 2 == 0 else ("raw", "runtime")
            for kind in order:
                rounds[kind].append(_run_one(kind, url, args.latency_messages, args.rate, args.batch, args.burst))
            for kind in order:
                thr = _run_one(kind, url, args.throughput_messages, None, args.batch, args.burst)
                throughput[kind].append(thr["throughput_msg_s"])
    result: dict[str, Any] = {}
    for kind in ("runtime", "raw"):
        result[kind] = {
            "latency": {
                "rate_msg_s": args.rate,
                "messages_per_round": args.latency_messages,
                "p50_us": _median([x["p50_us"] for x in rounds[kind]]),
                "p99_us": _median([x["p99_us"] for x in rounds[kind]]),
                "mean_us": _median([x["mean_us"] for x in rounds[kind]]),
                "rounds": [{k: x[k] for k in ("p50_us", "p90_us", "p99_us", "max_us")} for x in rounds[kind]],
            },
            "throughput_msg_s": _median(throughput[kind]),
            "throughput_rounds": throughput[kind],
            "throughput_messages": args.throughput_messages,
        }
    rt, raw = result["runtime"]["latency"], result["raw"]["latency"]
    result["ratio_p50"] = round(rt["p50_us"] / raw["p50_us"], 3)
    result["ratio_p99"] = round(rt["p99_us"] / raw["p99_us"], 3)
    result["payload"] = "BookSnapshot, 20 levels per side, JSON"
    result["batch"] = args.batch
    emit(result, args.json)
    return 0


def _median(values: list[Any]) -> Any:
    data = sorted(values)
    return data[len(data) // 2]
