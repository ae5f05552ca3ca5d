"""Parity: a recording through `arb backtest` and through the live services (paper) gives the
same signals, decisions and fills.

The live side is the real pipeline: collector (replay mode, paced on the wall clock at a
fifth of the recorded speed), detector, risk and executor as separate processes over Redis
and PostgreSQL. The backtest reads the same files with the same start and speed, so both see
the same times. At this pace every book change is at least 125 ms from the next, far more
than the pipeline takes from a signal to its fills and its balances, so the order of events
is the same on both sides: that is what parity needs (at full speed a live executor can meet
a book that moved while the order travelled, which the backtest's latency model only
approximates).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from backtest.engine import Engine
from backtest.latency import LatencyModel
from backtest.runner import SCENARIO_CONFIG
from backtest.scenario import ScenarioParams, generate
from backtest.sources import CaptureSource
from backtest.stack import services
from services.collector.replay import ReplaySource
from shared.config import load_config
from shared.models import Decision, Execution, Fill, OrderIntent, Signal
from shared.streams import KeySpace

SPEED = 0.2
# Follow mode: Upbit answers each Binance depth update 50 ms later and the FX book moves 25 ms
# after one, so no two books change within 25 ms of recorded time (125 ms here); the premium
# starts 40 bps below the FX rate, so the detector signals on most updates.
PARAMS = ScenarioParams(seed=11, duration_s=3.0, follow_depth=True, lag_ms=50.0, lag_sigma=0.0, premium_start=-0.004)


def _env(service_env: dict[str, str], captures: dict[str, list[str]]) -> dict[str, str]:
    return {
        **service_env,
        "ARB_CONFIG": str(SCENARIO_CONFIG),
        "ARB_CLICKHOUSE__ENABLED": "false",
        "ARB_DETECTOR__COOLDOWN_MS": "0",  # a signal on every update while the premium lasts
        # Risk values the legs at their limit prices: some of these signals are just over this cap and
        # some just under, so the decisions hold approvals and rejections alike.
        "ARB_RISK__MAX_NOTIONAL_PER_TRADE": "501.45",
        "ARB_EXECUTOR__ORDER_LATENCY_MS": "5",
        "ARB_COLLECTOR__REPLAY": json.dumps(captures),
        "ARB_COLLECTOR__REPLAY_SPEED": str(SPEED),
    }


def _store_instruments(url: str, keys: KeySpace, replay: ReplaySource) -> None:
    """The trading rules in Redis before any service starts, exactly as the collector stores them."""
    client = redis.Redis.from_url(url)
    for found in replay.instruments.values():
        client.hset(keys.instruments(found[0].exchange), mapping={i.symbol: msgspec.json.encode(i) for i in found})
    client.close()


def _signals(items: list[Signal]) -> list[tuple[Any, ...]]:
    return [(s.signal_id, s.asset, tuple((leg.exchange, leg.symbol, leg.side, leg.price, leg.quantity, leg.book_seq)
                                         for leg in s.legs)) for s in items]


def _decisions(items: list[Decision]) -> list[tuple[Any, ...]]:
    return [(d.decision_id, d.signal_id, d.approved, d.reason) for d in items]


def _intents(items: list[OrderIntent]) -> list[tuple[Any, ...]]:
    return [(i.arb_id, i.signal_id, tuple((leg.client_order_id, leg.exchange, leg.side, leg.price, leg.quantity)
                                          for leg in i.legs)) for i in items]


def _fills(items: list[Fill]) -> list[tuple[Any, ...]]:
    return sorted((f.fill_id, f.client_order_id, f.arb_id, f.exchange, f.side, f.price, f.quantity, f.fee,
                   f.fee_asset) for f in items)


def _pnl(items: list[Execution]) -> dict[str, Any]:
    return {e.arb_id: (e.status, e.realised_pnl) for e in items}


@pytest.mark.slow
def test_a_recording_through_the_live_pipeline_and_the_backtest_gives_the_same_signals_decisions_and_fills(
        service_env: dict[str, str], pg_url: str, tmp_path: Path) -> None:
    scenario = generate(PARAMS, tmp_path / "scenario")  # pg_url: the schema is migrated
    env = _env(service_env, scenario.captures)
    cfg = load_config(environ=env)
    import asyncio

    _store_instruments(cfg.redis.url, KeySpace(cfg.env, cfg.session), asyncio.run(
        ReplaySource.load(scenario.captures, cfg)))
    with services(cfg, env, tmp_path / "logs") as stack:
        for name in ("detector", "risk", "executor"):
            stack.start(name)
        stack.ready(["detector", "risk", "executor"], timeout=90)
        start_ns = time.time_ns() + 6_000_000_000  # the collector loads its captures meanwhile
        stack.start("collector", {"ARB_COLLECTOR__REPLAY_START_NS": str(start_ns)})
        deadline = time.monotonic() + 6 + scenario.duration_s / SPEED + cfg.collector.stale_after_ms / 1000 + 40
        while not stack.health("collector").get("replay", {}).get("done"):
            assert time.monotonic() < deadline, "the replay did not finish"
            assert stack.procs["collector"].poll() is None, (tmp_path / "logs" / "collector.log").read_text()[-3000:]
            time.sleep(0.5)
        while len(stack.read("executions")) < len(stack.read("orders")):
            assert time.monotonic() < deadline, "executions missing"
            time.sleep(0.2)
        assert start_ns > 0
        live_signals = stack.read("signals")
        live_decisions = stack.read("decisions")
        live_intents = stack.read("orders")
        live_fills = stack.read("fills")
        live_executions = stack.read("executions")

    source = CaptureSource.load(scenario.captures, cfg, start_ns=start_ns, speed=SPEED)
    result = Engine(cfg, source, latency=LatencyModel.build(order={"*": "5"}), record=True).run()

    assert len(live_signals) >= 20 and len(live_fills) >= 10, "the scenario should give plenty of both"
    assert {d.reason for d in live_decisions} == {"approved", "max_notional"}
    assert _signals(result.signals) == _signals(live_signals)
    assert _decisions(result.decisions) == _decisions(live_decisions)
    assert _intents(result.intents) == _intents(live_intents)
    assert _fills(result.fills) == _fills(live_fills)
    assert _pnl([o.execution for o in result.outcomes]) == _pnl(live_executions)
