"""`arb health` against a running stack: exit 0 when everything is up, 1 when Redis is
stopped, when a service is killed, and when a consumer group lags beyond the limit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from arb_stack import ALL_SERVICES, running_stack

from shared.embedded import free_port, start_redis
from shared.models import Alert, encode
from shared.runtime import FIELD


def _checks(stdout: str) -> dict[str, list[dict[str, str]]]:
    by_name: dict[str, list[dict[str, str]]] = {}
    for check in json.loads(stdout)["checks"]:
        by_name.setdefault(check["name"], []).append(check)
    return by_name


def _statuses(stdout: str) -> dict[str, set[str]]:
    return {name: {c["status"] for c in checks} for name, checks in _checks(stdout).items()}


@pytest.mark.slow
def test_health_exits_0_with_every_check_ok_when_the_whole_stack_is_up(
        service_env: dict[str, str], tmp_path: Path) -> None:
    with running_stack(service_env, tmp_path) as stack:
        out = stack.arb("health")
        data = stack.arb("health", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert all(line.split()[0] in ("OK", "WARN", "SKIP", "DISABLED") for line in lines), out.stdout
    statuses = _statuses(data.stdout)
    assert statuses["redis"] <= {"OK", "WARN"}  # WARN only if a ping is above 30 ms on a busy machine
    assert statuses["postgresql"] == {"OK"}
    assert statuses["clickhouse"] == {"SKIP"}  # embedded chDB belongs to the collector process
    for service in ALL_SERVICES:
        assert statuses[f"service {service}"] == {"OK"}, data.stdout
    # the alerter reports its sinks: log works, telegram has no token here
    assert statuses["service alerter/sink log"] == {"OK"}
    assert statuses["service alerter/sink telegram"] == {"DISABLED"}
    assert statuses["lag alerts/alerter"] == {"OK"}
    assert "heartbeat" in _checks(data.stdout)["service risk"][0]["detail"]


@pytest.mark.slow
def test_health_exits_1_when_redis_is_stopped(service_env: dict[str, str], tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    env = {**service_env, "REDIS_URL": server.url}
    try:
        with running_stack(env, tmp_path, services=("risk", "alerter")) as stack:
            assert stack.arb("health").returncode == 0
            server.stop()
            t0 = time.monotonic()
            out = stack.arb("health", "--json")
            took = time.monotonic() - t0
    finally:
        server.stop()
    assert out.returncode == 1, out.stdout
    statuses = _statuses(out.stdout)
    assert statuses["redis"] == {"ERROR"}
    assert statuses["services"] == {"SKIP"} and statuses["lag"] == {"SKIP"}
    assert statuses["postgresql"] == {"OK"}
    assert took < 15, f"a stopped Redis must not hang the check ({took:.1f}s)"


@pytest.mark.slow
def test_health_exits_1_when_a_service_is_killed(service_env: dict[str, str], tmp_path: Path) -> None:
    env = {**service_env, "ARB_SERVICES__RESTART_BACKOFF_S": "60"}  # keep it dead while we look
    with running_stack(env, tmp_path, services=("risk", "executor", "alerter")) as stack:
        assert stack.arb("health").returncode == 0
        os.kill(stack.state()["services"]["executor"], signal.SIGKILL)
        out = stack.arb("health", "--json")
    assert out.returncode == 1, out.stdout
    statuses = _statuses(out.stdout)
    assert statuses["service executor"] == {"ERROR"}, out.stdout
    assert "/health unreachable" in _checks(out.stdout)["service executor"][0]["detail"]
    assert statuses["service risk"] == {"OK"} and statuses["service alerter"] == {"OK"}


@pytest.mark.slow
def test_health_exits_1_when_a_consumer_group_lags_beyond_the_limit(
        service_env: dict[str, str], tmp_path: Path, redis_url: str) -> None:
    env = {**service_env, "ARB_OPS__CONSUMER_LAG_WARN": "20", "ARB_OPS__CONSUMER_LAG_MAX": "100"}
    prefix = env["ARB_REDIS__STREAM_PREFIX"]
    client = redis.Redis.from_url(redis_url)
    with running_stack(env, tmp_path, services=("risk", "alerter")) as stack:
        assert stack.arb("health").returncode == 0
        # an audit group falls 150 entries behind on decisions (no service in this stack reads it)
        client.xgroup_create(prefix + "decisions", "audit", id="$", mkstream=True)
        payload = encode(Alert(alert_id="x", severity="info", source="t", kind="t", message="m", ts_ns=1))
        for _ in range(150):
            client.xadd(prefix + "decisions", {FIELD: payload})
        lagging = stack.arb("health", "--json")
        # 50 behind: a warning, not a failure
        client.xgroup_setid(prefix + "decisions", "audit", id="0")
        ids = [e[0] for e in client.xrange(prefix + "decisions", count=100)]
        client.xgroup_setid(prefix + "decisions", "audit", id=ids[-1])
        warning = stack.arb("health", "--json")
    client.close()
    assert lagging.returncode == 1, lagging.stdout
    check = _checks(lagging.stdout)["lag decisions/audit"][0]
    assert check["status"] == "ERROR" and check["detail"].startswith("lag 150 "), check
    assert _statuses(lagging.stdout)["lag alerts/alerter"] == {"OK"}
    assert warning.returncode == 0, warning.stdout
    assert _checks(warning.stdout)["lag decisions/audit"][0]["status"] == "WARN"


def test_the_container_healthcheck_is_the_service_own_health_endpoint(
        service_env: dict[str, str], tmp_path: Path) -> None:
    """`python -m shared.ops.probe` (the image's HEALTHCHECK, service from $ARB_SERVICE) and
    `arb health --service NAME` probe the service's fixed port on this machine."""
    import socket
    import subprocess
    import sys

    from arb_stack import ARB

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1] - 6  # alerter listens on base + 6
    env = {**service_env, "ARB_HTTP__BASE_PORT": str(base), "ARB_OPS__LOG_TO_POSTGRES": "false",
           "ARB_SERVICE": "alerter"}
    probe = [sys.executable, "-m", "shared.ops.probe"]
    down = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert down.returncode == 1 and "unreachable" in down.stdout
    proc = subprocess.Popen([sys.executable, "-m", "services.alerter"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            up = subprocess.run(probe, env=env, capture_output=True, text=True)
            if up.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        cli = subprocess.run(ARB + ["health", "--service", "alerter"], env=env, capture_output=True, text=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert up.returncode == 0, up.stdout
    assert up.stdout.startswith("OK") and "/health ok" in up.stdout
    assert cli.returncode == 0 and cli.stdout == up.stdout
    wrong = subprocess.run(probe, env={**env, "ARB_SERVICE": ""}, capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


async def test_postgres_check_fails_while_migrations_are_pending(database_url: str, namespace: str) -> None:
    import psycopg

    from shared.db import migrate, with_schema
    from shared.ops.health import check_postgres

    url = with_schema(database_url, namespace)
    try:
        before = await check_postgres(url, 2.0)
        migrate(url)
        after = await check_postgres(url, 2.0)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    assert before.status == "ERROR" and "arb db migrate" in before.detail
    assert after.status == "OK"
    unreachable = await check_postgres(f"postgresql://postgres@127.0.0.1:{free_port()}/x", 1.0)
    assert unreachable.status == "ERROR" and "unreachable" in unreachable.detail


async def test_clickhouse_check_is_disabled_skipped_or_failed_by_what_it_can_reach(
        service_env: dict[str, str], tmp_path: Path) -> None:
    import aiohttp

    from shared.config import load_config
    from shared.ops.health import check_clickhouse
    from shared.ops.targets import Targets

    def targets(url: str) -> Targets:
        return Targets("redis://x", "postgresql://x", url, ALL_SERVICES, tmp_path, embedded=False)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        off = await check_clickhouse(load_config(environ={**service_env, "ARB_CLICKHOUSE__ENABLED": "false"}),
                                     targets("http://127.0.0.1:8123"), http)
        cfg = load_config(environ=service_env)
        embedded = await check_clickhouse(cfg, targets(f"chdb://{tmp_path}/ch"), http)
        down = await check_clickhouse(cfg, targets(f"http://arb:secret-pw@127.0.0.1:{free_port()}/arb"), http)
    assert off.status == "DISABLED"
    assert embedded.status == "SKIP" and "collector" in embedded.detail
    assert down.status == "ERROR" and "secret-pw" not in down.detail
