"""Crash safety: risk killed with SIGKILL mid-stream and its Redis keys flushed decides, after a
restore from PostgreSQL, exactly as if nothing had happened."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
import redis
from conftest import drop_redis_namespace
from risk_support import RiskProcess, execution, risk_env, spatial

from shared.db import migrate, with_schema
from shared.models import Alert, Decision, Message, decode, encode
from shared.runtime import FIELD
from shared.streams import ALERTS, DECISIONS, EXECUTIONS, SIGNALS, Group, KeySpace

LIMITS = dict(
    max_open_arbitrages=3, daily_loss_limit=40.0, circuit_breaker_losses=6, circuit_breaker_halt_s=3600.0,
    snapshot_interval_s=0.2, snapshot_min_interval_ms=50, restore_margin_ms=500,
    portfolio={"max_total_exposure": 2_000.0, "max_exposure_per_coin": 1_500.0, "max_exposure_per_exchange": 2_000.0},
)
KILL_AT = 31
"""SIGKILL right after publishing this signal: it may be unread, decided, or decided and published."""
KILL_AFTER = 44
"""SIGKILL as soon as this signal's decision is on the stream: its acknowledgement may be lost."""


def script() -> list[tuple[str, Any]]:
    """Signals and executions (for the oldest open arbitrage) in a fixed order."""
    rng = random.Random(5)
    out: list[tuple[str, Any]] = []
    venues = ["binance", "okx", "bybit"]
    for i in range(64):
        if rng.random() < 0.62:
            asset = rng.choice(["BTC", "ETH"])
            a, b = rng.sample(venues, 2)
            base = 60_000 if asset == "BTC" else 3_000
            qty = rng.choice(["0.005", "0.01", "0.015"]) if asset == "BTC" else rng.choice(["0.1", "0.2", "0.3"])
            out.append(("signal", dict(asset=asset, buy=(a, base), sell=(b, base + base // 1000), qty=qty,
                                       signal_id=f"r{i}")))
        else:
            out.append(("execution", rng.choice(["-4", "-2", "1.5", "3", "-6", "0.5", "-1"])))
    return out


class Feed:
    """Plays the script into one namespace, one message at a time, and records the verdicts."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.ns = namespace
        self.open: list[str] = []
        self.verdicts: dict[str, list[str]] = defaultdict(list)
        self._seen = "0-0"

    def add(self, stream: str, msg: Message) -> bytes:
        return self.client.xadd(f"{self.ns}:{stream}", {FIELD: encode(msg)})  # type: ignore[return-value]

    def collect(self) -> None:
        for entry_id, fields in self.client.xrange(f"{self.ns}:{DECISIONS}", min=f"({self._seen}"):
            self._seen = entry_id.decode()
            d: Decision = decode(fields[FIELD])  # type: ignore[assignment]
            if not self.verdicts[d.signal_id] and d.approved:
                self.open.append(d.signal_id)
            self.verdicts[d.signal_id].append(d.reason)

    def wait_decision(self, signal_id: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.verdicts.get(signal_id):
            assert time.monotonic() < deadline, f"no decision for {signal_id}"
            time.sleep(0.005)
            self.collect()

    def wait_settled(self, entry_id: bytes, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            groups = self.client.xinfo_groups(f"{self.ns}:{EXECUTIONS}")
            g = next((g for g in groups if g["name"] == Group.RISK.encode()), None)
            if g is not None and g["last-delivered-id"] == entry_id and g["pending"] == 0:
                return
            assert time.monotonic() < deadline, "execution not settled"
            time.sleep(0.005)

    def step(self, kind: str, item: Any, arb_of: Any, wait: bool = True) -> None:
        if kind == "signal":
            s = spatial(**item)
            self.add(SIGNALS, s)
            if wait:
                self.wait_decision(s.signal_id)
        elif self.open:
            entry = self.add(EXECUTIONS, execution(arb_of(self.open.pop(0)), item))
            self.wait_settled(entry)


def flush_risk_keys(client: redis.Redis, namespace: str) -> int:
    keys = list(client.scan_iter(match=f"arbitrage:{{guard:development:{namespace}}}:*"))
    return client.delete(*keys) if keys else 0


@pytest.mark.slow
def test_sigkill_and_flushed_risk_keys_then_restore_gives_the_same_decisions(
        service_env: dict[str, str], pg_url: str, redis_url: str, database_url: str, namespace: str,
        tmp_path: Path) -> None:
    from services.risk.ids import arb_id

    client = redis.Redis.from_url(redis_url)
    other = namespace + "b"
    migrate(with_schema(database_url, other))
    events = script()
    runs: dict[str, Feed] = {}
    final_state: dict[str, dict[bytes, bytes]] = {}
    try:
        for ns in (namespace, other):
            env = risk_env({**service_env, "ARB_SESSION": ns, "ARB_REDIS__STREAM_PREFIX": f"{ns}:",
                            "DATABASE_URL": with_schema(database_url, ns), "ARB_REDIS__BLOCK_MS": "100"},
                           **LIMITS)  # type: ignore[arg-type]
            feed = runs[ns] = Feed(client, ns)
            hb_key = KeySpace("development", ns).heartbeats()
            proc = RiskProcess(env, "risk-a", tmp_path / f"{ns}.log").start()
            proc.wait_ready(client, hb_key)
            try:
                for i, (kind, item) in enumerate(events):
                    crash = ns == other and i in (KILL_AT, KILL_AFTER)
                    feed.step(kind, item, lambda sid, ns=ns: arb_id("development", ns, sid), wait=i != KILL_AT)
                    if crash:
                        assert kind == "signal"
                        proc.kill()
                        assert flush_risk_keys(client, ns) > 0
                        proc = RiskProcess(env, "risk-a", tmp_path / f"{ns}.log").start()
                        proc.wait_ready(client, hb_key)
                        feed.wait_decision(item["signal_id"])
            finally:
                proc.stop()
            feed.collect()
            state = client.hgetall(f"arbitrage:{{guard:development:{ns}}}:*:state")
            final_state[ns] = {k: v for k, v in state.items() if k not in (b"ver", b"init")}

        plain, crashed = runs[namespace], runs[other]
        assert set(plain.verdicts) == set(crashed.verdicts)
        for signal_id, reasons in plain.verdicts.items():
            assert len(reasons) == 1
            assert set(crashed.verdicts[signal_id]) == set(reasons), signal_id  # a redelivery says the same
        after_kill = {plain.verdicts[item["signal_id"]][0] for kind, item in events[KILL_AT:] if kind == "signal"}
        assert {"approved", "max_open", "exposure_coin"} <= after_kill  # the restored state mattered
        assert final_state[namespace] == final_state[other]
        restored = [a for _, f in client.xrange(f"{other}:{ALERTS}")
                    if isinstance(a := decode(f[FIELD]), Alert) and a.kind == "state_restored"]
        assert len(restored) == 2 and all("from snapshot None" not in a.message for a in restored)
        with psycopg.connect(with_schema(database_url, other)) as conn:
            row = conn.execute("SELECT count(*) FROM risk_guard_snapshots").fetchone()
            assert row is not None and row[0] > 0
    finally:
        client.close()
        drop_redis_namespace(redis_url, other)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


def test_script_reaches_the_kill_points_on_signals() -> None:
    assert script()[KILL_AT][0] == script()[KILL_AFTER][0] == "signal"
    assert msgspec.json.encode(script()) == msgspec.json.encode(script())
