"""`arb streams`, `arb monitor` (dashboard and logs) and WARNING+ log shipping to PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import redis

from services.alerter.service import AlerterService
from shared import metrics
from shared.config import load_config
from shared.embedded import free_port
from shared.logs import Redactor
from shared.models import Alert, encode
from shared.ops.logstore import LogQuery, PostgresLogHandler, parse_since, read_files
from shared.ops.monitor import histogram_quantile
from shared.runtime import FIELD

ARB = [sys.executable, "-m", "shared.cli"]


def arb(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ARB + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def _alert(i: int) -> bytes:
    return encode(Alert(alert_id=str(i), severity="info", source="test", kind=f"k{i}", message="m",
                        ts_ns=time.time_ns()))


# ----------------------------------------------------------------------------- arb streams


def test_streams_shows_length_groups_lag_pending_idle_consumers_and_dead_letters(
        service_env: dict[str, str], redis_url: str) -> None:
    prefix = service_env["ARB_REDIS__STREAM_PREFIX"]
    r = redis.Redis.from_url(redis_url)
    try:
        for i in range(10):
            r.xadd(prefix + "signals", {FIELD: _alert(i)})
        r.xgroup_create(prefix + "signals", "risk", id="0")
        r.xgroup_create(prefix + "signals", "audit", id="$")
        r.xreadgroup("risk", "risk-dead", {prefix + "signals": ">"}, count=4)  # 4 pending, then silence
        r.xadd(prefix + "dlq.signals", {FIELD: b"{}", "stream": "signals", "group": "risk",
                                        "error": "ValueError: bad edge\ntraceback...", "deliveries": "5"})
        time.sleep(4.0)
        r.xreadgroup("risk", "risk-live", {prefix + "signals": ">"}, count=2)  # 2 more, just now
    finally:
        r.close()
    out = arb(service_env, "streams", "--json", "--idle", "3")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    [signals] = [s for s in report["streams"] if s["stream"] == "signals"]
    groups = {g["group"]: g for g in signals["groups"]}
    assert signals["length"] == 10 and signals["dlq_length"] == 1
    assert signals["last_entry_age_s"] is not None and signals["last_entry_age_s"] < 60
    assert (groups["risk"]["lag"], groups["risk"]["pending"], groups["risk"]["consumers"]) == (4, 6, 2)
    assert groups["risk"]["idle_consumers"] == ["risk-dead"]
    assert (groups["audit"]["lag"], groups["audit"]["pending"]) == (0, 0)
    [letters] = report["dead_letters"]
    assert letters["stream"] == "dlq.signals" and letters["length"] == 1 and letters["newest_group"] == "risk"
    assert letters["newest_error"].startswith("ValueError: bad edge")

    text = arb(service_env, "streams", "--idle", "3").stdout
    assert "signals" in text and "dlq.signals" in text and "ValueError: bad edge" in text
    assert "signals/risk: risk-dead" in text


# ----------------------------------------------------------------------------- arb monitor --metrics


def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = {0.001: 50.0, 0.01: 90.0, 0.1: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 0.9)
    assert histogram_quantile(0.5, {float("inf"): 0.0}) is None


async def test_monitor_metrics_shows_live_throughput_and_hop_latency(service_env: dict[str, str]) -> None:
    env = {**service_env, "ARB_OPS__LOG_TO_POSTGRES": "false"}
    svc = AlerterService(load_config(environ=env), instance="alerter-monitor")
    task = asyncio.create_task(svc.main())
    try:
        deadline = time.monotonic() + 10
        while not (svc.http and svc.http.port and svc.consumers):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # first heartbeat in Redis
        proc = await asyncio.create_subprocess_exec(
            *ARB, "monitor", "--metrics", "--once", "--interval", "2", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        # traffic for as long as the CLI runs, so both of its scrapes see some
        i = 0
        communicate = asyncio.create_task(proc.communicate())
        while not communicate.done():
            i += 1
            svc.producer.publish("alerts", Alert(alert_id=str(i), severity="info", source="t", kind=f"k{i}",
                                                 message="m", ts_ns=time.time_ns()))
            await asyncio.sleep(0.02)
        out, err = await asyncio.wait_for(communicate, 30)
    finally:
        svc.stop()
        await asyncio.wait_for(task, 20)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert "services     alerter 1" in text
    for label in ("trades/min", "errors/min", "PnL today", "open arbs", "guards"):
        assert label in text
    [row] = [line for line in text.splitlines() if line.startswith("alerts/alerter")]
    msg_s, p50, p99 = row.split()[1], row.split()[2], row.split()[4]
    assert float(msg_s) > 0, text
    assert p50 != "-" and p99 != "-", text


# ----------------------------------------------------------------------------- logs: files


def _write_logs(log_dir: Path, now: float) -> None:
    def line(age_s: float, level: str, service: str, msg: str, **extra: str) -> str:
        t = time.gmtime(now - age_s)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", t) + ".000Z"
        return json.dumps({"ts": ts, "level": level, "service": service, "session": "s", "logger": "x",
                           "msg": msg, **extra}) + "\n"

    log_dir.mkdir(parents=True)
    (log_dir / "risk.log").write_text(
        line(7200, "ERROR", "risk", "old failure")
        + line(120, "INFO", "risk", "signal approved", reason="approved")
        + line(60, "ERROR", "risk", "order rejected by guard", guard="max_notional")
        + "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
        + line(10, "WARNING", "risk", "redis unreachable, backing off"))
    (log_dir / "executor.log").write_text(
        line(90, "INFO", "executor", "order sent")
        + line(30, "ERROR", "executor", "exchange rejected order", code="-2010"))


def test_monitor_reads_tail_errors_and_search_from_the_log_files(
        service_env: dict[str, str], tmp_path: Path) -> None:
    log_dir = Path(service_env["ARB_VAR_DIR"]) / "log"
    _write_logs(log_dir, time.time())
    tail = arb(service_env, "monitor", "--tail", "3")
    assert tail.returncode == 0, tail.stderr
    # the last three records of both files, in time order; a traceback is one record
    first_lines = [line for line in tail.stdout.splitlines() if line[:4].isdigit()]
    assert [line.split()[1:3] for line in first_lines] == [["ERROR", "risk"], ["ERROR", "executor"],
                                                          ["WARNING", "risk"]], tail.stdout
    assert "Traceback (most recent call last):" in first_lines[0] and "ValueError: boom" in tail.stdout

    errors = arb(service_env, "monitor", "--errors", "--since", "1h").stdout
    assert "order rejected by guard" in errors and "exchange rejected order" in errors
    assert "ValueError: boom" in errors  # a crash's traceback counts as an error
    assert "old failure" not in errors and "signal approved" not in errors

    found = arb(service_env, "monitor", "--search", "rejected.*guard|code=-2010|-2010", "--since", "1h").stdout
    assert "order rejected by guard" in found and "exchange rejected order" in found
    assert "order sent" not in found

    only = arb(service_env, "monitor", "--errors", "--since", "1h", "--service", "executor").stdout
    assert "exchange rejected order" in only and "risk" not in only.split("exchange")[0]

    bad = arb(service_env, "monitor", "--errors", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_monitor_follow_prints_records_as_they_are_written(service_env: dict[str, str]) -> None:
    log_dir = Path(service_env["ARB_VAR_DIR"]) / "log"
    _write_logs(log_dir, time.time())
    proc = subprocess.Popen(ARB + ["monitor", "--tail", "1", "--follow"], env=service_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "redis unreachable, backing off" in first
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
        with open(log_dir / "risk.log", "a") as fh:
            fh.write(json.dumps({"ts": stamp, "level": "ERROR", "service": "risk", "msg": "fresh failure"}) + "\n")
        assert "fresh failure" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(10)


def test_since_understands_seconds_minutes_hours_days() -> None:
    from datetime import UTC, datetime

    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("90s", now).isoformat() == "2024-05-01T11:58:30+00:00"
    assert parse_since("1h", now).isoformat() == "2024-05-01T11:00:00+00:00"
    assert parse_since("2d", now).isoformat() == "2024-04-29T12:00:00+00:00"
    with pytest.raises(ValueError):
        parse_since("1 hour")


def test_plain_tail_reads_only_the_end_of_a_big_file(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    record = json.dumps({"ts": "2024-05-01T10:00:00.000Z", "level": "INFO", "service": "risk", "msg": "x" * 200})
    with open(log_dir / "risk.log", "w") as fh:
        for _ in range(100_000):  # ~22 MB: parsing all of it takes seconds
            fh.write(record + "\n")
        fh.write(json.dumps({"ts": "2024-05-01T10:00:01.000Z", "level": "INFO", "service": "risk",
                             "msg": "last"}) + "\n")
    t0 = time.perf_counter()
    lines = read_files(log_dir, LogQuery(limit=2))
    assert time.perf_counter() - t0 < 0.5
    assert [line.message for line in lines] == ["x" * 200, "last"]


# ----------------------------------------------------------------------------- logs: PostgreSQL


def test_warnings_and_errors_are_shipped_to_postgres_redacted_and_read_back(
        service_env: dict[str, str], pg_url: str, namespace: str) -> None:
    handler = PostgresLogHandler(pg_url, "executor", namespace, Redactor(["sk-live-secret-123"]),
                                 flush_interval_s=0.1)
    logger = logging.getLogger("test.shipping")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("routine, not shipped")
        logger.warning("slow fill", extra={"exchange": "binance"})
        logger.error("order failed with key sk-live-secret-123", extra={"client_order_id": "abc"})
    finally:
        logger.removeHandler(handler)
        handler.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT service, level, message, context FROM system_logs ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == [("executor", "WARNING"), ("executor", "ERROR")]
    assert rows[0][3]["exchange"] == "binance" and rows[1][3]["client_order_id"] == "abc"
    assert "sk-live-secret-123" not in rows[1][2] and "***" in rows[1][2]

    env = {**service_env, "DATABASE_URL": pg_url, "ARB_SESSION": namespace}
    out = arb(env, "monitor", "--errors", "--since", "1h", "--source", "postgres")
    assert out.returncode == 0, out.stderr
    assert "order failed with key ***" in out.stdout and "slow fill" not in out.stdout
    warn = arb(env, "monitor", "--level", "WARNING", "--search", "SLOW", "--source", "postgres").stdout
    assert "slow fill" in warn and "exchange=binance" in warn


def test_log_shipping_never_blocks_when_postgres_is_away() -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    handler = PostgresLogHandler(dead, "risk", "s", Redactor(), max_queue=1000, flush_interval_s=0.05)
    logger = logging.getLogger("test.shipping.dead")
    logger.addHandler(handler)
    logger.propagate = False
    dropped_before = metrics.LOG_RECORDS_DROPPED._value.get()
    try:
        t0 = time.perf_counter()
        for i in range(5000):
            logger.error("record %d", i)
        took = time.perf_counter() - t0
    finally:
        logger.removeHandler(handler)
        t1 = time.perf_counter()
        handler.close(timeout=2)
        closed_in = time.perf_counter() - t1
    assert took < 2.0, f"5000 records took {took:.2f}s to emit"
    assert closed_in < 3.0
    assert metrics.LOG_RECORDS_DROPPED._value.get() - dropped_before >= 3000


@pytest.mark.slow
def test_a_service_ships_its_errors_and_monitor_errors_finds_them_in_postgres(
        service_env: dict[str, str], pg_url: str, namespace: str, redis_url: str) -> None:
    env = {**service_env, "DATABASE_URL": pg_url}
    prefix = env["ARB_REDIS__STREAM_PREFIX"]
    proc = subprocess.Popen([sys.executable, "-m", "services.alerter"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis.from_url(redis_url)
    try:
        r.xadd(prefix + "alerts", {FIELD: b"this is not a message"})  # decode error -> ERROR record
        deadline = time.monotonic() + 20
        while True:
            out = arb(env, "monitor", "--errors", "--since", "5m", "--source", "postgres")
            if "moved to dead-letter stream" in out.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        r.close()
        proc.terminate()
        proc.wait(20)
    assert "alerter" in out.stdout and "moved to dead-letter stream" in out.stdout, out.stdout + out.stderr
