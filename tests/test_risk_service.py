"""The risk service end to end: circuit breaker, kill switch CLI, reload, PostgreSQL outages, restore."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import redis
from risk_support import RiskHarness, StartRisk, execution, spatial, start_risk_fixture  # noqa: F401

from services.risk import reasons
from services.risk.redis_state import RedisRiskState
from services.risk.service import RiskService
from services.risk.state import StateDump
from shared.config import load_config
from shared.db import migrate, with_schema
from shared.runtime import Bus
from shared.streams import EXECUTIONS, KeySpace

ARB = str(Path(sys.executable).with_name("arb"))


async def test_circuit_breaker_halts_after_n_losses_alerts_and_resumes_after_the_period(
        start_risk: StartRisk) -> None:
    risk = await start_risk(circuit_breaker_losses=3, circuit_breaker_halt_s=1.5)
    arbs = []
    for _ in range(3):
        d = await risk.decide(spatial())
        assert d.approved
        arbs.append(risk.service.book.arb_id(d.signal_id))
    for arb in arbs[:2]:
        await risk.publish(EXECUTIONS, execution(arb, "-2"))
    assert (await risk.decide(spatial())).approved  # two losses: still trading
    await risk.publish(EXECUTIONS, execution(arbs[2], "-2"))
    await risk.until(lambda: _alerts(risk, "circuit_breaker"))
    [alert] = [a for a in await risk.alerts() if a.kind == "circuit_breaker"]
    assert alert.severity == "critical" and "3 losing arbitrages in a row" in alert.message
    halted = await risk.decide(spatial())
    assert halted.reason == reasons.CIRCUIT_BREAKER and not await risk.ordered(halted.signal_id)
    await asyncio.sleep(1.6)
    assert (await risk.decide(spatial())).approved  # the period is over


async def _alerts(risk: RiskHarness, kind: str) -> bool:
    return any(a.kind == kind for a in await risk.alerts())


def arb_cli(env: dict[str, str], *args: str) -> dict[str, object]:
    out = subprocess.run([ARB, *args], env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


async def test_arb_halt_stops_approvals_from_the_next_message_and_arb_resume_restores_them(
        start_risk: StartRisk, service_env: dict[str, str]) -> None:
    risk = await start_risk()
    assert (await risk.decide(spatial())).approved
    result = await asyncio.to_thread(arb_cli, service_env, "halt", "--reason", "exchange maintenance")
    assert result == {"halted": True, "was_halted": False, "reason": "exchange maintenance"}
    d = await risk.decide(spatial())
    assert (d.reason, d.detail) == (reasons.HALTED, "kill switch set (manual): exchange maintenance")
    assert not await risk.ordered(d.signal_id)
    assert any(a.kind == "kill_switch" for a in await risk.alerts())
    status = await asyncio.to_thread(arb_cli, service_env, "risk", "status", "--json")
    assert status["halted"]["reason"] == "exchange maintenance"  # type: ignore[index]
    assert status["open_arbitrages"] == 1
    result = await asyncio.to_thread(arb_cli, service_env, "resume")
    assert result == {"halted": False, "was_halted": True, "guards_reset": False}
    assert (await risk.decide(spatial())).approved


async def test_a_valid_reload_applies_new_limits_and_an_invalid_one_is_refused(
        service_env: dict[str, str], pg_url: str, redis_url: str, namespace: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("ARB_")]:
        monkeypatch.delenv(key)
    for key, value in {**service_env, "ARB_REDIS__BLOCK_MS": "100"}.items():
        monkeypatch.setenv(key, value)
    toml = tmp_path / "arb.toml"

    def write(max_notional: str) -> None:
        toml.write_text(f"[risk]\nmax_notional_per_trade = {max_notional}\nmax_open_arbitrages = 100\n"
                        "max_signal_age_ms = 60000\nverdict_retention_s = 600\n[trading]\nmax_notional = 400.0\n")

    write("1000.0")
    service = RiskService(load_config(toml), instance="risk-reload", config_path=str(toml))
    task = asyncio.create_task(service.main())
    await asyncio.wait_for(service.ready.wait(), 10)
    risk = RiskHarness(service, task, Bus.from_url(redis_url, prefix=f"{namespace}:",
                                                   keys=KeySpace("development", namespace)))
    try:
        assert (await risk.decide(spatial())).approved  # 600 USDT
        write("500.0")
        await asyncio.to_thread(arb_cli, service_env, "risk", "reload")
        await risk.until(lambda: _limit(service, 500.0), timeout=5)
        assert (await risk.decide(spatial())).reason == reasons.MAX_NOTIONAL
        write("-5")  # invalid: refused, the 500 limit stays
        await asyncio.to_thread(arb_cli, service_env, "risk", "reload")
        await risk.until(lambda: _alerts(risk, "config_reload_refused"), timeout=5)
        assert (await risk.decide(spatial(qty="0.008"))).approved  # 480
        assert (await risk.decide(spatial())).reason == reasons.MAX_NOTIONAL
        [refused] = [a for a in await risk.alerts() if a.kind == "config_reload_refused"]
        assert "risk.max_notional_per_trade" in refused.message
    finally:
        await risk.stop()


async def _limit(service: RiskService, value: float) -> bool:
    return service.limits.default_symbol.max_notional_per_trade == int(value * 1e8)


async def test_decisions_go_on_while_postgres_is_down_and_snapshots_catch_up(
        service_env: dict[str, str], database_url: str, redis_url: str, namespace: str) -> None:
    from risk_support import risk_config

    # A schema that does not exist yet: every snapshot fails until it is migrated.
    url = with_schema(database_url, namespace + "late")
    env = {**service_env, "DATABASE_URL": url, "ARB_REDIS__BLOCK_MS": "100"}
    cfg = risk_config(env, snapshot_interval_s=0.2, snapshot_min_interval_ms=50)
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
    state = RedisRiskState(bus)
    await state.restore(StateDump(ts_ms=0))  # Redis has the live state: PostgreSQL is only the backup
    await state.mark_initialised("test")
    service = RiskService(cfg, instance="risk-nopg", config_path=None)
    task = asyncio.create_task(service.main())
    risk = RiskHarness(service, task, bus)
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        for _ in range(3):
            assert (await risk.decide(spatial())).approved
        await risk.until(lambda: _degraded(service), timeout=5)
        await asyncio.to_thread(migrate, url)
        await risk.until(lambda: _snapshot_rows(url), timeout=10)
        await risk.until(lambda: _healthy(service), timeout=5)
    finally:
        await risk.stop()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}late" CASCADE')


async def _degraded(service: RiskService) -> bool:
    return (await service.health())["status"] == "degraded"


async def _healthy(service: RiskService) -> bool:
    return (await service.health())["status"] == "ok"


async def _snapshot_rows(url: str) -> bool:
    def count() -> int:
        with psycopg.connect(url) as conn:
            return int(conn.execute("SELECT count(*) FROM risk_guard_snapshots").fetchone()[0])  # type: ignore[index]
    return await asyncio.to_thread(count) > 0


async def test_state_lost_from_redis_is_rebuilt_exactly_from_postgres_and_the_streams(
        start_risk: StartRisk) -> None:
    risk = await start_risk(max_open_arbitrages=4, snapshot_interval_s=0.2, snapshot_min_interval_ms=50,
                            venue_pair_cooldown_ms=100, restore_margin_ms=200)
    arbs = []
    for buy, sell in (("binance", "okx"), ("okx", "bybit"), ("bybit", "binance")):
        d = await risk.decide(spatial(buy=(buy, 60_000), sell=(sell, 60_050)))
        assert d.approved, d.detail
        arbs.append(risk.service.book.arb_id(d.signal_id))
    await risk.publish(EXECUTIONS, execution(arbs[0], "-1.25"))
    await risk.until(lambda: _open(risk, "2"))
    await asyncio.sleep(0.5)  # a snapshot; then more changes only the streams know of
    await risk.publish(EXECUTIONS, execution(arbs[1], "3"))
    await risk.until(lambda: _open(risk, "1"))
    late = await risk.decide(spatial(buy=("bybit", 60_000), sell=("binance", 60_050)))
    assert late.approved
    before = (await risk.service.state.dump()).comparable()

    # Redis loses every risk key while the service runs: the next decision waits for the restore.
    await risk.bus.redis.delete(*risk.service.state.keys.all())
    assert not await risk.service.state.initialised()
    after_loss = await risk.decide(spatial(buy=("okx", 60_000), sell=("bybit", 60_050)))
    assert after_loss.approved
    restored = await risk.service.state.dump()
    [alert] = [a for a in await risk.alerts() if a.kind == "state_restored"]
    assert "from snapshot None" not in alert.message  # a PostgreSQL snapshot, rolled forward by the streams
    # Everything but the new approval is as it was.
    assert restored.state["open"] == "3" and restored.state["pnl:total"] == before.state["pnl:total"] == "175000000"
    assert set(before.reservations) < set(restored.reservations)
    # Verdicts are not in snapshots: the ones replayed from `decisions` are exactly as they were.
    assert {k: v for k, v in restored.verdicts.items() if k != after_loss.signal_id}.items() <= before.verdicts.items()
    assert late.signal_id in restored.verdicts
    assert restored.settled == before.settled and restored.cooldowns.keys() >= before.cooldowns.keys()


async def _open(risk: RiskHarness, n: str) -> bool:
    return await risk.bus.redis.hget(risk.service.state.keys.state, "open") == n.encode()


async def test_a_reservation_with_no_execution_lapses_after_its_intent_expired(start_risk: StartRisk) -> None:
    from prometheus_client import REGISTRY

    def expired() -> float:
        return REGISTRY.get_sample_value("arb_risk_reservations_expired_total") or 0.0

    before = expired()
    risk = await start_risk(intent_ttl_ms=200, reservation_grace_ms=100, max_open_arbitrages=1)
    first = await risk.decide(spatial())
    assert first.approved
    assert (await risk.decide(spatial())).reason == reasons.MAX_OPEN

    async def lapsed() -> bool:  # the sweeper counts it just after its script returns: wait for both
        return await _no_reservations(risk) and expired() - before >= 1

    await risk.until(lapsed, timeout=5)
    assert expired() - before == 1
    assert (await risk.decide(spatial())).approved


async def _no_reservations(risk: RiskHarness) -> bool:
    state = await risk.bus.redis.hgetall(risk.service.state.keys.state)
    return not [k for k in state if k.startswith((b"x:", b"open", b"rb:"))]


def test_arb_bench_risk_prints_its_figures_against_a_bare_hop(redis_url: str) -> None:
    out = subprocess.run([ARB, "bench", "risk", "--json", "--redis-url", redis_url, "--rounds", "1", "--warmup", "20",
                          "--messages", "150", "--rate", "300", "--throughput-messages", "300",
                          "--check-and-reserve", "100"], capture_output=True, text=True, timeout=180, check=True)
    doc = json.loads(out.stdout)
    hop = doc["hop_latency"]
    assert hop["bare_xreadgroup_xadd"]["p50_us"] > 0 and hop["risk_decision"]["p50_us"] > 0
    assert hop["added_p50_us"] == round(hop["risk_decision"]["p50_us"] - hop["bare_xreadgroup_xadd"]["p50_us"], 1)
    assert doc["throughput"]["risk_decisions_s"] > 0 and doc["throughput"]["bare_msg_s"] > 0
    direct = doc["check_and_reserve"]
    assert direct["decide_evalsha"]["count"] == direct["ping"]["count"] == 100
    client = redis.Redis.from_url(redis_url)
    try:  # it cleaned up after itself
        assert not list(client.scan_iter(match="bench:risk:*", count=1000))
    finally:
        client.close()


async def test_when_redis_loses_the_state_under_two_replicas_exactly_one_restores_it(start_risk: StartRisk) -> None:
    small = {"ARB_REDIS__BATCH_SIZE": "2"}  # so both replicas take signals
    a = await start_risk(instance="risk-a", env=small, snapshot_interval_s=0.2, snapshot_min_interval_ms=50)
    b = await start_risk(instance="risk-b", env=small, snapshot_interval_s=0.2, snapshot_min_interval_ms=50)
    approved = 0
    for i in range(6):
        approved += (await a.decide(spatial(signal_id=f"before-{i}"))).approved
    await asyncio.sleep(0.4)
    await a.bus.redis.delete(*a.service.state.keys.all())
    await a.send(*(spatial(signal_id=f"after-{i}") for i in range(20)))  # both replicas take some
    for i in range(20):
        approved += (await a.decision(f"after-{i}", timeout=15)).approved
    restored = [x for x in await a.alerts() if x.kind == "state_restored"]
    assert len(restored) == 1
    assert approved == 26
    assert await a.bus.redis.hget(a.service.state.keys.state, "open") == b"26"
    handled = [r.service.consumers[0].handled for r in (a, b)]
    assert sum(handled) == 26 and min(handled) > 0, handled
