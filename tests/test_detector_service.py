"""The detector service against real Redis: md streams in, signals out, FX from the fx stream
and keys, leases between replicas, unusable input counted and skipped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from services.detector.service import DetectorService
from shared.config import Config, load_config
from shared.models import BookSnapshot, BookStatus, FxRate, Instrument, Signal, decoder_for, encode
from shared.runtime import FIELD, Bus
from shared.streams import FX, SIGNALS, md

decode_signal = decoder_for(Signal).decode
S = 1_000_000_000


def config(env: dict[str, str], **detector: Any) -> Config:
    return load_config(environ=env, overrides={
        "redis": {"block_ms": 100, "claim_interval_ms": 500},
        "trading": {"max_notional": 1000.0},
        "detector": {"strategies": ["spatial"], "lease_ttl_ms": 1200, "cooldown_ms": 0, **detector},
        "exchanges": {
            "binance": {"enabled": True, "symbols": ["BTC/USDT", "ETH/USDT"]},
            "okx": {"enabled": True, "symbols": ["BTC/USDT", "ETH/USDT"]},
            "upbit": {"enabled": True, "symbols": ["BTC/KRW", "USDT/KRW"]},
            "bybit": {"enabled": False},
        },
    })


def book(exchange: str, symbol: str, bid: float, ask: float, seq: int = 1, *, age_s: float = 0.0,
         size: float = 1.0) -> BookSnapshot:
    now = time.time_ns() - int(age_s * S)
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=seq, bids=[(bid, size)], asks=[(ask, size)],
                        ts_exchange_ns=now, ts_recv_ns=now, ts_pub_ns=time.time_ns())


async def publish(bus: Bus, stream: str, *payloads: bytes) -> None:
    for payload in payloads:
        await bus.redis.xadd(bus.stream(stream), {FIELD: payload})


async def signals(bus: Bus) -> list[Signal]:
    entries: Any = await bus.redis.xrange(bus.stream(SIGNALS))
    return [decode_signal(fields[FIELD]) for _, fields in entries]


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def running(cfg: Config, instance: str = "d1") -> AsyncIterator[DetectorService]:
    svc = DetectorService(cfg, instance=instance)
    task = asyncio.create_task(svc.main())
    try:
        await until(lambda: getattr(svc, "runners", None) and all(r.held for r in svc.runners), what="leases")

        async def groups_exist() -> bool:  # the groups start at "$": publish only once they exist
            for runner in svc.runners:
                for stream in runner.held:
                    try:
                        groups: Any = await svc.bus.redis.xinfo_groups(svc.bus.stream(stream))
                    except Exception:
                        return False
                    if runner.strategy.encode() not in {g["name"] for g in groups}:
                        return False
            return True

        await until(groups_exist, what="consumer groups")
        yield svc
    finally:
        svc.stop()
        await asyncio.wait_for(task, 10)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_books_on_the_md_stream_become_a_signal_with_fx_from_the_fx_stream(service_env: dict[str, str]) -> None:
    cfg = config(service_env)
    bus = Bus.from_config(cfg)
    async with running(cfg) as svc:
        assert sorted(svc.runners[0].held) == [md("BTC"), md("ETH"), md("USDT")]
        now = time.time_ns()
        await publish(bus, FX, encode(FxRate(pair="USDT/KRW", rate=1380.0, source="upbit", ts_source_ns=now)))
        await until(lambda: svc.cores["spatial"].fx.latest("USDT/KRW"), what="fx rate")  # type: ignore[attr-defined]
        # Upbit's BTC at 140,000,000 KRW is 101,449 USDT: 1.4% above Binance's ask.
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 99_990.0, 100_000.0)),
                      encode(book("upbit", "BTC/KRW", 140_000_000.0, 140_100_000.0, size=0.5)))
        [sig] = await until(lambda: signals(bus), what="a signal")
    assert sig.strategy == "spatial" and sig.asset == "BTC"
    assert [(leg.exchange, leg.side, leg.quantity) for leg in sig.legs] == [
        ("binance", "buy", Decimal("0.01")), ("upbit", "sell", Decimal("0.01"))]  # 1,000 USDT max notional
    assert sig.fx_rate == 1380.0 and sig.fx_age_ns is not None and sig.fx_age_ns >= 0
    assert sig.net_edge_bps > 100 and sig.ts_origin_ns > 0
    await bus.close()


async def test_fx_and_instruments_are_read_from_their_keys_at_start(service_env: dict[str, str]) -> None:
    cfg = config(service_env)
    bus = Bus.from_config(cfg)
    now = time.time_ns()
    await bus.redis.set(bus.keys.fx_latest("USDT/KRW"),
                        encode(FxRate(pair="USDT/KRW", rate=1390.0, source="upbit", ts_source_ns=now)))
    lot = Instrument(exchange="upbit", symbol="BTC/KRW", native="KRW-BTC", base="BTC", quote="KRW",
                     tick_size=Decimal("1000"), lot_size=Decimal("0.001"), taker_fee=Decimal("0.0005"))
    await bus.redis.hset(bus.keys.instruments("upbit"), "BTC/KRW", msgspec.json.encode(lot))
    async with running(cfg) as svc:
        core: Any = svc.cores["spatial"]
        await until(lambda: core.fx.latest("USDT/KRW"), what="fx from the key")
        await until(lambda: core.instruments.published("upbit", "BTC/KRW"), what="instrument from the hash")
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 100_090.0, 100_100.0)),
                      encode(book("upbit", "BTC/KRW", 141_000_000.0, 141_100_000.0, size=0.5)))
        [sig] = await until(lambda: signals(bus), what="a signal")
    assert sig.fx_rate == 1390.0
    # 1,000 USDT of notional buys 0.00999 BTC at 100,100; Upbit's published lot (0.001) floors it.
    assert sig.legs[0].quantity == Decimal("0.009")
    await bus.close()


async def test_unusable_messages_are_counted_and_skipped_and_later_ones_still_signal(
        service_env: dict[str, str]) -> None:
    cfg = config(service_env)
    bus = Bus.from_config(cfg)
    crossed_before = counter("arb_detector_rejected_total", kind="book", reason="crossed")
    bad_fx_before = counter("arb_detector_rejected_total", kind="fx", reason="rate")
    async with running(cfg):
        now = time.time_ns()
        crossed = book("okx", "BTC/USDT", 101.0, 100.0)
        await publish(bus, md("BTC"), b"{not json", encode(crossed))
        await publish(bus, FX, encode(FxRate(pair="USDT/KRW", rate=-1.0, source="x", ts_source_ns=now)))
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 99.0, 100.0)),
                      encode(book("okx", "BTC/USDT", 101.0, 102.0)))
        await until(lambda: signals(bus), what="a signal after the bad input")
        dead: Any = await until(lambda: bus.redis.xrange(bus.stream("dlq.md.BTC")), what="dead letter")
    assert b"decode" in dead[0][1][b"error"]
    assert counter("arb_detector_rejected_total", kind="book", reason="crossed") == crossed_before + 1
    assert counter("arb_detector_rejected_total", kind="fx", reason="rate") == bad_fx_before + 1
    await bus.close()


async def test_a_stale_status_drops_the_book_until_it_is_synced_again(service_env: dict[str, str]) -> None:
    cfg = config(service_env)
    bus = Bus.from_config(cfg)
    async with running(cfg) as svc:
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 99.0, 100.0)),
                      encode(BookStatus(exchange="binance", symbol="BTC/USDT", status="stale", reason="gap",
                                        ts_ns=time.time_ns())),
                      encode(book("okx", "BTC/USDT", 101.0, 102.0)))
        core: Any = svc.cores["spatial"]
        await until(lambda: core.books.get("okx", "BTC/USDT"), what="okx book")
        await asyncio.sleep(0.3)
        assert await signals(bus) == []
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 99.0, 100.0, seq=2)))
        await until(lambda: signals(bus), what="a signal once binance is synced again")
    await bus.close()


# ------------------------------------------------------------------ replicas


async def test_a_triangle_split_across_two_replicas_streams_is_still_seen_whole(service_env: dict[str, str]) -> None:
    cfg = load_config(environ=service_env, overrides={
        "redis": {"block_ms": 100},
        "detector": {"strategies": ["triangular"], "lease_ttl_ms": 1200, "cooldown_ms": 0},
        "exchanges": {"binance": {"enabled": True, "symbols": ["BTC/USDT", "ETH/USDT", "ETH/BTC"], "taker_fee": 0.0002},
                      "okx": {"enabled": False}, "upbit": {"enabled": False}, "bybit": {"enabled": False}},
    })
    bus = Bus.from_config(cfg)
    async with running(cfg, "r1") as r1, running(cfg, "r2") as r2:
        async def split() -> bool:
            return sorted(r1.runners[0].held + r2.runners[0].held) == [md("BTC"), md("ETH")] \
                and len(r1.runners[0].held) == 1
        await until(split, what="one stream each")
        eth_reader = r1 if r1.runners[0].held == [md("ETH")] else r2
        # BTC/USDT lives on md.BTC, which the ETH reader does not hold: it follows it without a group.
        await publish(bus, md("BTC"), encode(book("binance", "BTC/USDT", 100_000.0, 100_010.0, size=0.01)))
        core: Any = eth_reader.cores["triangular"]
        await until(lambda: core._index.get(("binance", "BTC/USDT")) is not None
                    and core._markets[core._index[("binance", "BTC/USDT")]].book is not None,
                    what="the other stream's book mirrored")
        await publish(bus, md("ETH"), encode(book("binance", "ETH/USDT", 4_010.0, 4_011.0)),
                      encode(book("binance", "ETH/BTC", 0.0399, 0.04, size=0.2)))
        [sig] = await until(lambda: signals(bus), what="a triangular signal")
    assert sig.strategy == "triangular" and sig.meta["cycle"] == ["USDT", "BTC", "ETH"]
    await bus.close()


def spawn(env: dict[str, str], instance: str, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "services.detector", "--instance", instance],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
async def test_killing_one_of_two_replicas_under_load_moves_its_streams_to_the_other_within_the_lease_time(
        service_env: dict[str, str], tmp_path: Any) -> None:
    ttl_ms = 1500
    env = dict(service_env)
    env.update({
        "ARB_DETECTOR__STRATEGIES": '["spatial"]',
        "ARB_DETECTOR__LEASE_TTL_MS": str(ttl_ms),
        "ARB_DETECTOR__COOLDOWN_MS": "0",
        "ARB_REDIS__BLOCK_MS": "100",
        "ARB_EXCHANGES__BINANCE__ENABLED": "true",
        "ARB_EXCHANGES__BINANCE__SYMBOLS": '["BTC/USDT","ETH/USDT","SOL/USDT","XRP/USDT"]',
        "ARB_EXCHANGES__OKX__ENABLED": "true",
        "ARB_EXCHANGES__OKX__SYMBOLS": '["BTC/USDT","ETH/USDT","SOL/USDT","XRP/USDT"]',
        "ARB_EXCHANGES__UPBIT__ENABLED": "false",
        "ARB_EXCHANGES__BYBIT__ENABLED": "false",
    })
    cfg = load_config(environ=env)
    bus = Bus.from_config(cfg)
    streams = [md(b) for b in ("BTC", "ETH", "SOL", "XRP")]

    async def holders() -> dict[str, str | None]:
        out = {}
        for s in streams:
            raw = await bus.redis.get(bus.keys.lease("spatial", s))
            out[s] = raw.decode() if raw else None
        return out

    log = open(tmp_path / "replicas.log", "wb")  # noqa: SIM115
    replicas = {name: spawn(env, name, log) for name in ("r1", "r2")}
    stop_load = asyncio.Event()
    seq = 0

    async def load() -> None:  # quiet books on every stream, ~400 updates/s
        nonlocal seq
        while not stop_load.is_set():
            pipe = bus.redis.pipeline(transaction=False)
            for s in streams:
                seq += 1
                base = s.removeprefix("md.")
                pipe.xadd(bus.stream(s), {FIELD: encode(book("binance", f"{base}/USDT", 99.0, 100.0, seq))})
            await pipe.execute()
            await asyncio.sleep(0.01)

    loader = asyncio.create_task(load())
    try:
        async def split() -> bool:
            h = await holders()
            return None not in h.values() and set(h.values()) == {"r1", "r2"}

        await until(split, timeout=20, what="both replicas holding leases")
        victim = (await holders())[streams[0]]
        assert victim is not None
        survivor = "r2" if victim == "r1" else "r1"
        replicas[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        replicas[victim].wait(5)

        async def taken_over() -> bool:
            return set((await holders()).values()) == {survivor}

        await until(taken_over, timeout=10, what="the survivor holding every stream")
        takeover_s = time.monotonic() - killed_at
        # One lease TTL for the victim's leases to expire, plus one renewal round (ttl / 3).
        assert takeover_s <= ttl_ms / 1000 * (1 + 1 / 3) + 0.5, takeover_s

        # No stream goes unread: a crossing pair on every stream yields one signal per asset.
        before = {s.asset for s in await signals(bus)}
        assert before == set()
        for s in streams:
            base = s.removeprefix("md.")
            await publish(bus, s, encode(book("okx", f"{base}/USDT", 101.0, 102.0, seq=10**6)))

        async def every_asset() -> bool:
            return {s.asset for s in await signals(bus)} >= {"BTC", "ETH", "SOL", "XRP"}

        await until(every_asset, timeout=10, what="a signal on every stream")
        stop_load.set()
        await loader

        async def drained() -> bool:
            for s in streams:
                groups: Any = await bus.redis.xinfo_groups(bus.stream(s))
                group = next(g for g in groups if g["name"] == b"spatial")
                if group.get("lag") not in (0, None):
                    return False
            return True

        await until(drained, timeout=10, what="every stream read to its end")
        print(f"\nreplica takeover: {takeover_s:.2f} s after SIGKILL (lease ttl {ttl_ms} ms)")
    finally:
        stop_load.set()
        loader.cancel()
        for proc in replicas.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in replicas.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
        log.close()
        await bus.close()
    assert os.path.getsize(tmp_path / "replicas.log") > 0
