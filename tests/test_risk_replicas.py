"""Three risk replicas (separate processes) share one set of limits and never pass them together."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path

import aiohttp
import msgspec
import pytest
import redis
from risk_support import RiskProcess, risk_env, spatial

from services.risk import reasons
from services.risk.units import units_up
from shared.models import Decision, OrderIntent, Signal, decode, encode
from shared.runtime import FIELD
from shared.streams import DECISIONS, ORDERS, SIGNALS, KeySpace

N_SIGNALS = 10_000
REPLICAS = 3
LIMITS = dict(
    max_open_arbitrages=200,
    portfolio={"max_total_exposure": 20_500.0, "max_exposure_per_coin": 20_500.0,
               "max_exposure_per_exchange": 20_500.0, "exchanges": {"bybit": 2_000.0}},
    symbols={"BTC": {"max_exposure": 3_000.0}},
)
CAPS_UNITS = {"x:total": 20_500, "x:coin:BTC": 3_000, "x:coin:ETH": 20_500, "x:ex:binance": 20_500,
              "x:ex:okx": 20_500, "x:ex:bybit": 2_000}


def signals() -> list[Signal]:
    """Every signal fits every limit alone; together they exceed each one many times over.

    Big ones are worth exactly 1,000 USDT (the sell leg), tiny ones 1 USDT: after 20 big
    ones the total has room only for tiny ones, which fill up the open-arbitrage count.
    """
    out = []
    now = time.time_ns()
    for i in range(N_SIGNALS):
        kind = i % 10
        if kind < 3:  # BTC, 1,000: the BTC cap (3,000) binds
            s = spatial(asset="BTC", buy=("binance", "99900"), sell=("okx", "100000"), qty="0.01", notional=1000.0)
        elif kind < 5:  # ETH through bybit, 1,000: bybit's cap (2,000) binds
            s = spatial(asset="ETH", buy=("bybit", "3996"), sell=("okx", "4000"), qty="0.25", notional=1000.0)
        elif kind < 7:  # ETH, 1,000: the total (20,500) binds
            s = spatial(asset="ETH", buy=("okx", "3996"), sell=("binance", "4000"), qty="0.25", notional=1000.0)
        else:  # ETH, 1: the open-arbitrage count (200) binds
            s = spatial(asset="ETH", buy=("binance", "3996"), sell=("okx", "4000"), qty="0.00025", notional=1.0)
        out.append(msgspec.structs.replace(s, signal_id=f"c{i}", ts_ns=now))
    return out


@pytest.mark.slow
async def test_three_replicas_never_pass_a_limit_together(
        service_env: dict[str, str], pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = risk_env(service_env, **LIMITS)  # type: ignore[arg-type]
    env.update({"ARB_REDIS__BATCH_SIZE": "8", "ARB_REDIS__BLOCK_MS": "200", "ARB_LOG__LEVEL": "WARNING"})
    client = redis.Redis.from_url(redis_url)
    keys = KeySpace("development", namespace)
    procs = [RiskProcess(env, f"risk-{i}", tmp_path / f"risk-{i}.log").start() for i in range(REPLICAS)]
    try:
        beats = [p.wait_ready(client, keys.heartbeats()) for p in procs]
        batch = signals()
        stream = f"{namespace}:{SIGNALS}"
        for lo in range(0, len(batch), 500):
            pipe = client.pipeline(transaction=False)
            for s in batch[lo:lo + 500]:
                pipe.xadd(stream, {FIELD: encode(s)})
            pipe.execute()
        deadline = time.monotonic() + 120
        while client.xlen(f"{namespace}:{DECISIONS}") < N_SIGNALS:
            assert time.monotonic() < deadline, "replicas did not decide every signal in time"
            assert all(p.proc is not None and p.proc.poll() is None for p in procs)
            time.sleep(0.1)
        per_replica = await asyncio.gather(*(_decided_by(hb.http_port) for hb in beats))
    finally:
        for p in procs:
            p.stop()

    decisions: list[Decision] = [decode(f[FIELD]) for _, f in client.xrange(f"{namespace}:{DECISIONS}")]  # type: ignore
    intents: list[OrderIntent] = [decode(f[FIELD]) for _, f in client.xrange(f"{namespace}:{ORDERS}")]  # type: ignore

    # One verdict per signal; the approved ones are exactly the intents on `orders`.
    assert Counter(d.signal_id for d in decisions) == Counter(s.signal_id for s in batch)
    approved = {d.signal_id: d for d in decisions if d.approved}
    assert sorted(approved) == sorted(i.signal_id for i in intents)
    assert len({i.arb_id for i in intents}) == len(intents)
    assert len({leg.client_order_id for i in intents for leg in i.legs}) == 2 * len(intents)
    by_reason = Counter(d.reason for d in decisions)
    for reason in (reasons.MAX_OPEN, reasons.EXPOSURE_TOTAL, reasons.EXPOSURE_COIN, reasons.EXPOSURE_EXCHANGE):
        assert by_reason[reason] > 0, by_reason
    assert all(n > 0 for n in per_replica), per_replica

    # Nothing is ever released in this run, so the reserved amounts only grow: their final values
    # are their peaks. Rebuild them from the intents alone (prices x quantities, rounded up like
    # the core), and check every limit.
    reserved: dict[str, int] = defaultdict(int)
    for intent in intents:
        legs = [units_up(leg.price * leg.quantity) for leg in intent.legs]
        notional = max(max(legs), units_up(Decimal(repr(intent.notional))))
        asset = intent.legs[0].symbol.split("/")[0]
        reserved["open"] += 1
        reserved["x:total"] += notional
        reserved[f"x:coin:{asset}"] += notional
        for leg, units in zip(intent.legs, legs, strict=True):
            reserved[f"x:ex:{leg.exchange}"] += units
    assert reserved["open"] <= 200
    for name, cap in CAPS_UNITS.items():
        assert reserved[name] <= cap * 10**8, (name, reserved[name])

    # What Redis holds is exactly the sum of the approved, unreleased reservations.
    held = client.hgetall(f"arbitrage:{{guard:development:{namespace}}}:*:state")
    state = {k.decode(): int(v) for k, v in held.items() if k.startswith((b"x:", b"open"))}
    assert state == dict(reserved)
    from_decisions: dict[str, int] = defaultdict(int)
    for d in approved.values():
        assert d.reservation is not None
        for name, units in d.reservation.counters.items():
            if not name.startswith("rb:"):
                from_decisions[name] += units
    assert from_decisions == state
    client.close()


async def _decided_by(port: int) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("arb_risk_decisions_total{"))
