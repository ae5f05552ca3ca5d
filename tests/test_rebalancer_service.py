"""The service as the launcher runs it: `python -m services.rebalancer` in its own process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import psycopg
import redis

from shared.models import Heartbeat
from shared.streams import KeySpace
from tests.conftest import ROOT
from tests.rebalancer_scenarios import prepare, write_config


def test_service_process_plans_reports_health_and_stops_cleanly(
    pg_url: str, service_env: dict[str, str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    prepare(pg_url, redis_url, namespace)
    env = {**service_env, "ARB_CONFIG": str(write_config(tmp_path / "arb.toml", interval_s=0.2))}
    proc = subprocess.Popen([sys.executable, "-m", "services.rebalancer"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = redis.Redis.from_url(redis_url)
    try:
        heartbeat = None
        planned = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (heartbeat is None or planned < 2):
            time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            raw = client.hgetall(KeySpace("development", namespace).heartbeats())
            beats = [msgspec.json.decode(v, type=Heartbeat) for v in raw.values()]
            heartbeat = next((b for b in beats if b.service == "rebalancer"), None)
            with psycopg.connect(pg_url) as conn:
                row = conn.execute("SELECT count(*) FROM transfers WHERE session = %s", (namespace,)).fetchone()
                planned = row[0] if row else 0
        assert heartbeat is not None and planned == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{heartbeat.http_port}/health", timeout=5) as resp:
            health = json.loads(resp.read())
        assert health["service"] == "rebalancer" and health["rebalancer"]["mode"] == "paper"
        assert health["rebalancer"]["rounds"] >= 1 and health["rebalancer"]["networks"] == 6
        with urllib.request.urlopen(f"http://127.0.0.1:{heartbeat.http_port}/metrics", timeout=5) as resp:
            assert b'arb_rebalancer_plans_total{reason="below_low",state="approved"} 2.0' in resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        client.close()
    assert proc.returncode == 0, out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "transfer planned" for entry in logs)
    assert logs[-1]["msg"] == "service stopped"
