"""The Redis Streams runtime against real Redis (and PostgreSQL for the crash test)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from shared.models import Alert, encode
from shared.runtime import Bus, Consumer, Delivery, Lease, LeaseKeeper, Producer, Retryable, ensure_group
from shared.runtime.inspect import stream_stats
from shared.streams import KeySpace, dlq

ROOT = Path(__file__).resolve().parent.parent


def alert(i: int | str) -> Alert:
    return Alert(alert_id=str(i), severity="info", source="test", kind="test", message=f"m{i}", ts_ns=time.time_ns())


async def run_until(consumer: Consumer, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + timeout
        while not predicate():
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0.02)
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


# ----------------------------------------------------------------------------- producer


async def test_producer_pipelines_a_loop_turn_into_one_round_trip(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(500):
        producer.publish("signals", alert(i))
    assert producer.buffered == 500
    await producer.flush()
    assert producer.buffered == 0
    assert await bus.redis.xlen(bus.stream("signals")) == 500


async def test_market_data_streams_are_trimmed_by_maxlen(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(25_000):
        producer.publish("md.TEST", alert(i))
    await producer.flush()
    length = await bus.redis.xlen(bus.stream("md.TEST"))
    assert 20_000 <= length < 25_000  # MAXLEN ~ 20000: trimmed, approximately


async def test_producer_keeps_messages_while_redis_is_unreachable(bus: Bus) -> None:
    dead = Bus.from_url("redis://127.0.0.1:1/0", prefix=bus.prefix)
    producer = Producer(dead)
    producer.publish("signals", alert(1))
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        await producer.flush()
    assert producer.buffered == 1
    await dead.close()


async def test_obligation_streams_are_trimmed_only_below_what_every_group_acknowledged(bus: Bus) -> None:
    from shared.runtime.trim import trim_acknowledged

    producer = Producer(bus)
    for i in range(30):
        producer.publish("orders", alert(i))
    await producer.flush()
    assert await trim_acknowledged(bus, "orders") == 0  # no group yet: nobody has had them
    await ensure_group(bus, "orders", "executor")
    await ensure_group(bus, "orders", "audit")
    key = bus.stream("orders")
    got = await bus.redis.xreadgroup("executor", "c", {key: ">"}, count=20)
    ids = [eid for eid, _ in got[0][1]]
    await bus.redis.xack(key, "executor", *ids[:10])  # 10 acked, 10 pending, 10 undelivered
    assert await trim_acknowledged(bus, "orders") == 0  # the audit group has nothing yet
    got = await bus.redis.xreadgroup("audit", "c", {key: ">"}, count=30)
    await bus.redis.xack(key, "audit", *[eid for eid, _ in got[0][1]])
    assert await trim_acknowledged(bus, "orders") == 10  # up to executor's oldest pending entry
    assert (await bus.redis.xrange(key, count=1))[0][0] == ids[10]


# ----------------------------------------------------------------------------- consumer


async def test_consumer_acks_only_after_handling_and_before_ack_hook(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(300):
        producer.publish("signals", alert(i))
    await producer.flush()
    seen: list[str] = []
    committed: list[int] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.message.alert_id)

    async def before_ack() -> None:
        # Everything handled so far is still pending while the side effects are made durable.
        stats = await stream_stats(bus, "signals")
        assert stats is not None
        committed.append(stats.groups[0].pending)

    c = Consumer(bus, group="g", streams=["signals"], handler=handle, name="c1", before_ack=before_ack,
                 batch_size=100, block_ms=50)
    await run_until(c, lambda: len(seen) == 300)
    assert committed and all(p > 0 for p in committed)
    stats = await stream_stats(bus, "signals")
    assert stats is not None and stats.groups[0].pending == 0 and stats.groups[0].lag == 0


async def test_outputs_of_a_batch_are_stored_before_its_inputs_are_acked(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(50):
        producer.publish("signals", alert(i))
    await producer.flush()
    out = Producer(bus)

    async def handle(d: Delivery) -> None:
        out.publish("orders", alert(f"o{d.message.alert_id}"))

    c = Consumer(bus, group="risk", streams=["signals"], handler=handle, name="c1", producer=out, block_ms=50)
    await run_until(c, lambda: c.handled == 50)
    assert await bus.redis.xlen(bus.stream("orders")) == 50
    assert (await bus.redis.xpending(bus.stream("signals"), "risk"))["pending"] == 0


async def test_outputs_leave_as_they_are_published_not_after_the_rest_of_the_batch(bus: Bus, redis_url: str) -> None:
    import redis

    producer = Producer(bus)
    for i in range(20):
        producer.publish("md.TEST", alert(i))
    await producer.flush()
    out = Producer(bus)
    out.publish("warmup", alert("w"))
    await out.flush()  # its connection is open: a flush's first step puts the XADD on the wire
    sync = redis.Redis.from_url(redis_url)
    seen_during_batch: list[int] = []

    def handle_sync(d: Delivery) -> None:
        if d.message.alert_id == "0":
            out.publish("signals", alert("s0"))  # a signal from the first book of the batch
        if d.message.alert_id == "19":  # the last of the batch: never suspends, like a detector core
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not sync.xlen(bus.stream("signals")):
                time.sleep(0.005)
            seen_during_batch.append(sync.xlen(bus.stream("signals")))

    async def handle(d: Delivery) -> None:
        handle_sync(d)

    c = Consumer(bus, group="spatial", streams=["md.TEST"], handler=handle, name="c1", producer=out, block_ms=50,
                 batch_size=100)
    try:
        await run_until(c, lambda: c.handled == 20)
    finally:
        sync.close()
    assert seen_during_batch == [1]


async def test_failing_handler_moves_message_to_dlq_after_n_deliveries_and_goes_on(bus: Bus) -> None:
    producer = Producer(bus)
    producer.publish("orders", alert("poison"))
    for i in range(20):
        producer.publish("orders", alert(i))
    await producer.flush()
    good: list[str] = []
    calls: dict[str, int] = {}

    async def handle(d: Delivery) -> None:
        calls[d.message.alert_id] = calls.get(d.message.alert_id, 0) + 1
        if d.message.alert_id == "poison":
            raise ValueError("cannot price this order")
        good.append(d.message.alert_id)

    before = metric("arb_dlq_messages_total", stream="orders", group="executor", reason="deliveries")
    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="c1", max_deliveries=3,
                 claim_idle_ms=100, claim_interval_ms=50, block_ms=50)
    await run_until(c, lambda: len(good) == 20 and calls.get("poison", 0) >= 3)
    await asyncio.sleep(0)  # the consumer loop has returned; the DLQ write happened in the same commit
    entries = await bus.redis.xrange(bus.stream(dlq("orders")))
    assert len(entries) == 1
    fields = entries[0][1]
    assert b"cannot price this order" in fields[b"error"]
    assert fields[b"deliveries"] == b"3"
    assert fields[b"stream"] == b"orders"
    assert calls["poison"] == 3  # delivered N times, never again
    assert metric("arb_dlq_messages_total", stream="orders", group="executor", reason="deliveries") == before + 1
    assert (await bus.redis.xpending(bus.stream("orders"), "executor"))["pending"] == 0


async def test_payload_that_does_not_decode_goes_to_dlq_at_once(bus: Bus) -> None:
    await bus.redis.xadd(bus.stream("signals"), {b"d": b'{"type": "signal", "truncated'})
    await bus.redis.xadd(bus.stream("signals"), {b"d": b'{"type": "nonsense"}'})
    await bus.redis.xadd(bus.stream("signals"), {b"d": encode(alert("ok"))})
    handled: list[str] = []

    async def handle(d: Delivery) -> None:
        handled.append(d.message.alert_id)

    before = metric("arb_dlq_messages_total", stream="signals", group="risk", reason="decode")
    c = Consumer(bus, group="risk", streams=["signals"], handler=handle, name="c1", block_ms=50)
    await run_until(c, lambda: handled == ["ok"])
    entries = await bus.redis.xrange(bus.stream(dlq("signals")))
    assert len(entries) == 2
    assert all(e[1][b"error"].startswith(b"decode:") for e in entries)
    assert entries[0][1][b"d"] == b'{"type": "signal", "truncated'
    assert metric("arb_dlq_messages_total", stream="signals", group="risk", reason="decode") == before + 2


async def test_retryable_failure_is_retried_in_place_without_counting_a_delivery(bus: Bus) -> None:
    producer = Producer(bus)
    producer.publish("orders", alert(1))
    await producer.flush()
    attempts: list[int] = []

    async def handle(d: Delivery) -> None:
        attempts.append(d.deliveries)
        if len(attempts) < 5:
            raise Retryable("database unreachable")

    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="c1", max_deliveries=2,
                 block_ms=50)
    await run_until(c, lambda: c.handled == 1)
    assert len(attempts) == 5 and set(attempts) == {1}
    assert await bus.redis.xlen(bus.stream(dlq("orders"))) == 0


async def test_dead_consumers_pending_entries_are_claimed_after_idle_time(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(10):
        producer.publish("orders", alert(i))
    await producer.flush()
    await ensure_group(bus, "orders", "executor")
    # "dead" reads everything and dies before acknowledging.
    await bus.redis.xreadgroup("executor", "dead", {bus.stream("orders"): ">"}, count=100)
    got: list[tuple[str, int]] = []

    async def handle(d: Delivery) -> None:
        got.append((d.message.alert_id, d.deliveries))

    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="alive",
                 claim_idle_ms=300, claim_interval_ms=100, block_ms=50)
    t0 = time.monotonic()
    await run_until(c, lambda: len(got) == 10)
    assert time.monotonic() - t0 >= 0.25  # not before the idle time
    assert sorted(int(i) for i, _ in got) == list(range(10))
    assert all(n == 2 for _, n in got)  # second delivery, counted by Redis


async def test_stop_finishes_the_batch_in_hand(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(100):
        producer.publish("signals", alert(i))
    await producer.flush()
    c: Consumer
    handled: list[str] = []

    async def handle(d: Delivery) -> None:
        handled.append(d.message.alert_id)
        if len(handled) == 10:
            c.stop()  # SIGTERM arrives mid-batch
        await asyncio.sleep(0.001)

    c = Consumer(bus, group="risk", streams=["signals"], handler=handle, name="c1", batch_size=40, block_ms=50)
    await asyncio.wait_for(c.run(), 10)
    assert len(handled) == 40  # the whole first batch, and not one more
    info = await bus.redis.xpending(bus.stream("signals"), "risk")
    assert info["pending"] == 0


# ----------------------------------------------------------------------------- consumer: concurrency


async def test_concurrent_consumer_handles_and_acks_independent_entries_while_one_is_slow(bus: Bus) -> None:
    producer = Producer(bus)
    producer.publish("orders", alert("slow"))
    for i in range(10):
        producer.publish("orders", alert(i))
    await producer.flush()
    fast_acked = asyncio.Event()
    handled: list[str] = []
    key = bus.stream("orders")

    async def handle(d: Delivery) -> None:
        if d.message.alert_id == "slow":
            # released only once the entries read after it are handled and acknowledged
            await asyncio.wait_for(fast_acked.wait(), 10)
        handled.append(d.message.alert_id)

    async def watch() -> None:
        while True:
            pending = await bus.redis.xpending_range(key, "executor", "-", "+", 100)
            if len(handled) == 10 and [p["message_id"] for p in pending] == [slow_id]:
                fast_acked.set()
                return
            await asyncio.sleep(0.01)

    slow_id = (await bus.redis.xrange(key, count=1))[0][0]
    await ensure_group(bus, "orders", "executor")
    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="c1", block_ms=50, concurrency=4)
    watcher = asyncio.create_task(watch())
    await run_until(c, lambda: c.handled == 11)
    await watcher
    assert handled[-1] == "slow" and sorted(handled[:10], key=int) == [str(i) for i in range(10)]
    assert (await bus.redis.xpending(key, "executor"))["pending"] == 0


async def test_concurrent_consumer_handles_entries_of_one_key_in_read_order(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(24):
        producer.publish("orders", alert(f"{'abc'[i % 3]}{i}"))
    await producer.flush()
    running: set[str] = set()
    peak = 0
    order: dict[str, list[int]] = {}

    async def handle(d: Delivery) -> None:
        nonlocal peak
        k, n = d.message.alert_id[0], int(d.message.alert_id[1:])
        assert k not in running, f"two entries of key {k} handled at once"
        running.add(k)
        peak = max(peak, len(running))
        await asyncio.sleep(random.uniform(0.001, 0.02))  # later entries may be quicker
        order.setdefault(k, []).append(n)
        running.discard(k)

    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="c1", block_ms=50, concurrency=6,
                 key=lambda m: m.alert_id[0])
    await run_until(c, lambda: c.handled == 24)
    assert peak == 3  # the keys ran side by side
    assert all(ns == sorted(ns) and len(ns) == 8 for ns in order.values())


async def test_concurrent_consumer_stores_outputs_before_acking_each_entry(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(60):
        producer.publish("signals", alert(i))
    await producer.flush()
    out = Producer(bus)
    key = bus.stream("signals")

    async def handle(d: Delivery) -> None:
        # still pending while it is handled, and its output goes out before its ack
        pending = await bus.redis.xpending_range(key, "risk", d.entry_id, d.entry_id, 1)
        assert len(pending) == 1
        await asyncio.sleep(random.uniform(0, 0.01))
        out.publish("orders", alert(f"o{d.message.alert_id}"))

    c = Consumer(bus, group="risk", streams=["signals"], handler=handle, name="c1", producer=out, block_ms=50,
                 concurrency=8)
    await run_until(c, lambda: c.handled == 60)
    assert await bus.redis.xlen(bus.stream("orders")) == 60
    assert (await bus.redis.xpending(key, "risk"))["pending"] == 0


async def test_concurrent_entry_retried_in_place_is_not_claimed_nor_counted_again(bus: Bus) -> None:
    producer = Producer(bus)
    producer.publish("orders", alert(1))
    await producer.flush()
    attempts: list[int] = []
    started = time.monotonic()
    key = bus.stream("orders")
    counts: list[int] = []

    async def handle(d: Delivery) -> None:
        attempts.append(d.deliveries)
        pending = await bus.redis.xpending_range(key, "executor", "-", "+", 10)
        counts.extend(int(p["times_delivered"]) for p in pending)
        if time.monotonic() - started < 1.5:  # far longer than the claim idle time
            raise Retryable("database unreachable")

    c = Consumer(bus, group="executor", streams=["orders"], handler=handle, name="c1", max_deliveries=2,
                 claim_idle_ms=200, claim_interval_ms=50, block_ms=50, concurrency=4)
    await run_until(c, lambda: c.handled == 1)
    assert len(attempts) >= 3 and set(attempts) == {1}
    assert set(counts) == {1}  # never claimed again while in hand
    assert await bus.redis.xlen(bus.stream(dlq("orders"))) == 0


async def test_concurrent_consumer_stop_finishes_what_is_in_hand_and_reads_no_more(bus: Bus) -> None:
    producer = Producer(bus)
    for i in range(100):
        producer.publish("signals", alert(i))
    await producer.flush()
    c: Consumer
    handled: list[str] = []

    async def handle(d: Delivery) -> None:
        await asyncio.sleep(0.01)
        handled.append(d.message.alert_id)
        if len(handled) == 10:
            c.stop()

    c = Consumer(bus, group="risk", streams=["signals"], handler=handle, name="c1", block_ms=50, concurrency=8)
    await asyncio.wait_for(c.run(), 10)
    assert 10 <= len(handled) < 10 + 8  # what was in hand, and nothing read after the stop
    assert c.handled == len(handled)
    assert (await bus.redis.xpending(bus.stream("signals"), "risk"))["pending"] == 0


# ----------------------------------------------------------------------------- crash: SIGKILL


def _spawn(redis_url: str, prefix: str, pg_url: str, name: str) -> subprocess.Popen[bytes]:
    worker = ROOT / "tests" / "workers" / "consume_to_pg.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(worker), redis_url, prefix, pg_url, "work-group", name, "400"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
async def test_killed_consumers_lose_nothing_and_double_nothing(bus: Bus, redis_url: str, pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE handled (msg_id TEXT PRIMARY KEY, entry_id TEXT NOT NULL)")
        conn.execute("CREATE TABLE deliveries (msg_id TEXT NOT NULL, consumer TEXT NOT NULL)")
    total = 10_000
    producer = Producer(bus)
    for i in range(total):
        producer.publish("work", alert(i))
    await producer.flush()

    rng = random.Random(7)
    procs = [_spawn(redis_url, bus.prefix, pg_url, f"w{i}") for i in range(2)]
    kills = 0

    def handled() -> int:
        with psycopg.connect(pg_url) as conn:
            return conn.execute("SELECT count(*) FROM handled").fetchone()[0]  # type: ignore[index]

    try:
        deadline = time.monotonic() + 120
        while handled() < total:
            assert time.monotonic() < deadline, f"stuck at {handled()} rows"
            await asyncio.sleep(rng.uniform(0.2, 0.5))
            if kills < 8 and handled() < total * 0.95:
                victim = rng.randrange(len(procs))
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                kills += 1
                procs[victim] = _spawn(redis_url, bus.prefix, pg_url, f"w{len(procs)}-{kills}")
        # everything handled; now everything must also be acknowledged
        deadline = time.monotonic() + 30
        while (await bus.redis.xpending(bus.stream("work"), "work-group"))["pending"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
    assert kills >= 5
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT msg_id) FROM handled").fetchone()
        redelivered = conn.execute(
            "SELECT count(*) FROM (SELECT msg_id FROM deliveries GROUP BY msg_id HAVING count(*) > 1) x"
        ).fetchone()[0]  # type: ignore[index]
    assert rows == (total, total)  # none lost, none doubled
    assert redelivered > 0  # the kills really did leave un-acked work for others to take over


# ----------------------------------------------------------------------------- Redis restart


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 8])
async def test_consumer_survives_a_redis_restart_without_redoing_or_losing(tmp_path: Path, concurrency: int) -> None:
    from shared.embedded import start_redis

    server = start_redis(tmp_path / "redis", appendfsync="always")
    port = server.port
    bus = Bus.from_url(server.url, prefix="r:")
    counts: dict[str, int] = {}

    async def handle(d: Delivery) -> None:
        counts[d.message.alert_id] = counts.get(d.message.alert_id, 0) + 1
        await asyncio.sleep(0.001)

    consumer = Consumer(bus, group="g", streams=["work"], handler=handle, name="c1", batch_size=20, block_ms=50,
                        concurrency=concurrency)
    task = asyncio.create_task(consumer.run())
    try:
        writer = Producer(bus)
        for i in range(1000):
            writer.publish("work", alert(i))
        await writer.flush()
        while len(counts) < 300:
            await asyncio.sleep(0.01)
        server.stop()  # under the running consumer, with work pending
        await asyncio.sleep(1.0)
        server = start_redis(tmp_path / "redis", port=port, appendfsync="always")
        writer2 = Producer(Bus.from_url(server.url, prefix="r:"))
        for i in range(1000, 2000):
            writer2.publish("work", alert(i))
        await writer2.flush()
        deadline = time.monotonic() + 30
        while len(counts) < 2000:
            assert not task.done(), task
            assert time.monotonic() < deadline, f"only {len(counts)} handled"
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 10
        while (await writer2.bus.redis.xpending(bus.stream("work"), "g"))["pending"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await writer2.bus.close()
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
        await bus.close()
        server.stop()
    assert sorted(int(k) for k in counts) == list(range(2000))  # nothing unacknowledged was lost
    assert set(counts.values()) == {1}  # nothing acknowledged was redone


# ----------------------------------------------------------------------------- leases


async def test_lease_is_exclusive_renewable_and_released_only_by_its_owner(bus: Bus) -> None:
    key = bus.keys.lease("spatial", "md.BTC")
    a, b = Lease(bus, key, "a", 500), Lease(bus, key, "b", 500)
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.renew()
    assert not await b.renew()
    assert not await b.release()
    assert await a.holder() == "a"
    await asyncio.sleep(0.6)
    assert await b.acquire()  # a stopped renewing: its lease expired
    assert not await a.renew()


async def test_lease_keeper_takes_over_the_streams_of_a_dead_replica(redis_url: str) -> None:
    ns = f"t{uuid.uuid4().hex[:10]}"
    keys = KeySpace("test", ns)
    bus_a, bus_b = Bus.from_url(redis_url, keys=keys), Bus.from_url(redis_url, keys=keys)
    streams = [f"md.A{i}" for i in range(6)]
    a = LeaseKeeper(bus_a, group="spatial", owner="a", resources=streams, ttl_ms=600)
    b = LeaseKeeper(bus_b, group="spatial", owner="b", resources=streams, ttl_ms=600)
    try:
        await a.tick()
        assert len(a.held) == 6  # alone: takes everything
        await b.tick()
        await a.tick()  # sees b, gives back its excess
        await b.tick()
        assert len(a.held) == 3 and len(b.held) == 3
        assert not set(a.held) & set(b.held)
        # a dies (stops renewing); within one TTL b holds every stream
        t0 = time.monotonic()
        while len(b.held) < 6:
            await b.tick()
            await asyncio.sleep(0.1)
            assert time.monotonic() - t0 < 2.5
    finally:
        await b.stop()
        await bus_a.close()
        await bus_b.close()
        from conftest import drop_redis_namespace

        drop_redis_namespace(redis_url, ns)
