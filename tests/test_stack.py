"""`arb up` / `arb status` / `arb down` on the embedded stack, and the service shell."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from shared.config import load_config
from shared.logs import setup_logging
from shared.models import Heartbeat, decode
from shared.runtime import Delivery
from shared.service import Service

ARB = [sys.executable, "-m", "shared.cli"]


def _fresh_env() -> dict[str, str]:
    drop = ("REDIS_URL", "DATABASE_URL", "CLICKHOUSE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ARB_")}
    env["ARB_HTTP__BASE_PORT"] = "0"  # several stacks may run on one machine
    return env


def _stack_processes(root: psutil.Process, var: Path) -> set[int]:
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    try:
        pg = psutil.Process(int((var / "pg" / "postmaster.pid").read_text().split()[0]))
        pids |= {pg.pid} | {p.pid for p in pg.children(recursive=True)}
    except (OSError, ValueError, psutil.Error):
        pass
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_arb_up_from_scratch_is_healthy_within_20s_and_down_leaves_no_process(tmp_path: Path) -> None:
    env = _fresh_env()
    t0 = time.monotonic()
    up = subprocess.Popen(ARB + ["up"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    report: dict = {}
    try:
        while time.monotonic() - t0 < 60:
            st = subprocess.run(ARB + ["status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
            if st.stdout.strip().startswith("{"):
                report = json.loads(st.stdout)
                if report.get("healthy"):
                    break
            assert up.poll() is None, up.stdout.read().decode() if up.stdout else ""
            time.sleep(0.3)
        healthy_after = time.monotonic() - t0
        assert report.get("healthy"), report
        assert healthy_after < 20, f"healthy only after {healthy_after:.1f}s"
        names = sorted(s["service"] for s in report["services"])
        assert names == ["collector", "detector", "executor", "rebalancer", "risk"]
        assert report["redis"].startswith("redis://127.0.0.1:") and not report["redis"].endswith(":6379/0")
        assert (tmp_path / "var" / "pg" / "PG_VERSION").exists()
        pids = _stack_processes(psutil.Process(up.pid), tmp_path / "var")
        assert len(pids) >= 8  # launcher, redis, 5 services, postgres (+ its workers)
    finally:
        down = subprocess.run(ARB + ["down"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        up.wait(30)
    assert down.returncode == 0, down.stderr
    leftover = [pid for pid in pids if _alive(pid)]
    assert leftover == [], [psutil.Process(p).cmdline() for p in leftover if _alive(p)]
    # status now reports the stack down
    st = subprocess.run(ARB + ["status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert st.returncode == 1


@pytest.mark.slow
def test_launcher_restarts_a_crashed_service(tmp_path: Path, redis_url: str, database_url: str, namespace: str) -> None:
    from shared.db import with_schema

    env = {**_fresh_env(), "REDIS_URL": redis_url, "DATABASE_URL": with_schema(database_url, namespace),
           "ARB_SESSION": namespace, "ARB_REDIS__STREAM_PREFIX": f"{namespace}:",
           "ARB_SERVICES__RESTART_BACKOFF_S": "0.2"}
    up = subprocess.Popen(ARB + ["up", "--services", "risk"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        state = tmp_path / "var" / "run" / "stack.json"
        deadline = time.monotonic() + 30
        while not state.exists():
            assert time.monotonic() < deadline and up.poll() is None
            time.sleep(0.1)
        first = json.loads(state.read_text())["services"]["risk"]
        psutil.Process(first).kill()
        deadline = time.monotonic() + 20
        while json.loads(state.read_text())["services"]["risk"] == first:
            assert time.monotonic() < deadline, "not restarted"
            time.sleep(0.1)
        second = json.loads(state.read_text())["services"]["risk"]
        assert _alive(second)
    finally:
        subprocess.run(ARB + ["down"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
        up.wait(30)
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


class EchoService(Service):
    name = "risk"

    async def setup(self) -> None:
        self.seen: list[str] = []
        self.consumer("risk", ["signals"], self.handle)

    async def handle(self, d: Delivery) -> None:
        self.seen.append(d.message.alert_id)


async def test_service_serves_health_and_metrics_and_heartbeats(service_env: dict[str, str]) -> None:
    cfg = load_config(environ=service_env)
    svc = EchoService(cfg)
    task = asyncio.create_task(svc.main())
    try:
        deadline = time.monotonic() + 10
        while svc.http is None or svc.http.port == 0 or not svc.consumers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        port = svc.http.port
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    health = await resp.json()
                if health.get("consumers"):
                    break
                await asyncio.sleep(0.1)
            assert resp.status == 200 and health["status"] == "ok"
            assert health["redis"]["reachable"] is True
            assert health["consumers"][0]["stream"] == "signals" and "lag" in health["consumers"][0]
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
        assert "arb_service_up" in text and "arb_hop_latency_seconds" in text
        raw = await svc.bus.redis.hget(svc.bus.keys.heartbeats(), svc.instance)
        beat = decode(raw)
        assert isinstance(beat, Heartbeat) and beat.http_port == port and beat.service == "risk"
    finally:
        svc.stop()
        await asyncio.wait_for(task, 15)
    from shared.runtime import Bus
    from shared.streams import KeySpace

    check = Bus.from_url(service_env["REDIS_URL"], keys=KeySpace("development", service_env["ARB_SESSION"]))
    assert await check.redis.hget(check.keys.heartbeats(), svc.instance) is None  # gone on clean stop
    await check.close()


def test_logs_are_json_lines_with_secrets_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("executor", "s1", "INFO", secrets=["sk-live-123456"])
    log = logging.getLogger("test")
    log.info("order sent", extra={"query": "symbol=BTCUSDT&signature=abcdef0123", "key": "sk-live-123456"})
    log.warning("auth header Authorization: Bearer eyJhbGciOi.payload.sig")
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["service"] == "executor" and lines[0]["session"] == "s1" and lines[0]["msg"] == "order sent"
    text = json.dumps(lines)
    assert "sk-live-123456" not in text and "abcdef0123" not in text and "eyJhbGciOi" not in text
    assert lines[0]["query"] == "symbol=BTCUSDT&signature=***"
    logging.getLogger().handlers[:] = [logging.StreamHandler(io.StringIO())]


def test_bus_benchmark_prints_runtime_and_raw_figures(redis_url: str) -> None:
    proc = subprocess.run(
        ARB + ["bench", "bus", "--json", "--latency-messages", "200", "--throughput-messages", "2000",
               "--rounds", "1", "--rate", "2000", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for side in ("runtime", "raw"):
        assert result[side]["latency"]["p50_us"] > 0 and result[side]["throughput_msg_s"] > 0
    assert result["ratio_p50"] > 0
