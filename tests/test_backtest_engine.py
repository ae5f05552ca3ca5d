"""The backtest engine over the bundled scenario: deterministic, exact money, the latency model
applied where it says, and ClickHouse as a source giving what the captures give."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from backtest.engine import Engine, RunResult
from backtest.latency import LatencyModel
from backtest.runner import RunSpec, load_cfg, run
from backtest.scenario import Scenario, ScenarioParams, ensure
from backtest.sources import CaptureSource, ClickHouseSource, ClickHouseWindow
from services.collector.clickhouse_sink import ClickHouseSink
from services.executor.fills import fill_deltas
from services.executor.pnl import realised_pnl
from shared.models import BookSnapshot, Trade

MS = 1_000_000


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return ensure(ScenarioParams(), tmp_path_factory.mktemp("scenarios"))


def _run(scenario: Scenario, **spec: object) -> RunResult:
    result, _, _ = run(RunSpec(captures=scenario.captures, record=True, **spec))  # type: ignore[arg-type]
    return result


def _fingerprint(result: RunResult) -> tuple[object, ...]:
    return ([s.signal_id for s in result.signals], [(d.signal_id, d.reason) for d in result.decisions],
            [(f.fill_id, f.price, f.quantity, f.fee, f.ts_ns) for f in result.fills],
            [(o.execution.arb_id, o.execution.status, o.execution.realised_pnl) for o in result.outcomes])


def test_two_runs_with_the_same_seed_are_identical_and_another_seed_samples_other_latencies(
        scenario: Scenario) -> None:
    sampled = dict(feed_latency={"upbit": "lognormal:20,0.5", "binance": "uniform:1,5"},
                   order_latency={"*": "normal:40,15"})
    first = _run(scenario, seed=4, **sampled)
    assert len(first.outcomes) >= 20
    assert _fingerprint(first) == _fingerprint(_run(scenario, seed=4, **sampled))
    assert _fingerprint(first) != _fingerprint(_run(scenario, seed=5, **sampled))


def test_every_arbitrages_pnl_and_the_final_balances_reconcile_exactly_with_the_fills(scenario: Scenario) -> None:
    result = _run(scenario, order_latency={"*": "300"})  # late orders: hedges and failures as well
    statuses = {o.execution.status for o in result.outcomes}
    assert {"completed", "hedged"} <= statuses
    balances: dict[tuple[str, str], Decimal] = defaultdict(Decimal, result.starting_balances)
    for o in result.outcomes:
        e = o.execution
        again = realised_pnl(o.fills, "USDT", e.fx_rates)
        assert (e.realised_pnl, e.fees, e.notional) == (again.realised, again.fees, again.bought)
        assert e.pnl_by_currency == again.by_currency
        for f in o.fills:
            for d in fill_deltas(f.exchange, f.symbol, f.side, f):
                balances[(d.exchange, d.asset)] += d.amount
    assert {k: v for k, v in balances.items() if v} == {k: v for k, v in result.final_balances.items() if v}


def test_orders_meet_the_book_their_venues_latency_after_they_are_sent_and_books_reach_the_detector_late(
        scenario: Scenario) -> None:
    result = _run(scenario, feed_latency={"upbit": "25", "binance": "3"}, order_latency={"binance": "7", "upbit": "13"})
    order_ms = {"binance": 7, "upbit": 13}
    assert result.outcomes
    for o in result.outcomes:
        for record in o.orders:
            if record.order.role == "entry" and record.fills:
                assert record.ts_ns - o.started_ns == order_ms[record.leg.exchange] * MS
    feed_ms = {"binance": 3, "upbit": 25}
    for s in result.signals:
        for leg in s.legs:
            assert leg.book_age_ns >= feed_ms[leg.exchange] * MS


def test_intents_are_executed_one_at_a_time_as_one_executor_replica_does(scenario: Scenario) -> None:
    result = _run(scenario, order_latency={"*": "150"})
    previous_end = 0
    waited = 0
    for o in sorted(result.outcomes, key=lambda o: o.started_ns):
        assert o.started_ns >= previous_end
        waited += o.started_ns > o.intent.ts_ns
        previous_end = o.execution.ts_ns
    assert waited, "with 150 ms per arbitrage some intents should have queued"


def test_nothing_trades_before_trade_from_and_nothing_is_read_from_until_on(scenario: Scenario) -> None:
    middle = (scenario.start_ns + scenario.end_ns) // 2
    result = _run(scenario, trade_from_ns=scenario.start_ns + 60_000 * MS, until_ns=middle)
    assert result.signals and min(s.ts_ns for s in result.signals) >= scenario.start_ns + 60_000 * MS
    assert result.last_event_ns < middle


def test_the_clickhouse_tables_give_the_signals_and_fills_of_the_capture_they_were_written_from(
        scenario: Scenario, tmp_path: Path) -> None:
    spec = RunSpec(captures=scenario.captures)
    cfg = load_cfg(spec)
    # Moved to now: the tables expire rows by their receive time (90 days), so 2024's would be dropped.
    start = time.time_ns() - 3_600_000 * MS
    capture = CaptureSource.load(scenario.captures, cfg, start_ns=start)
    url = f"chdb://{tmp_path / 'ch'}"
    sink = ClickHouseSink(url, batch_rows=1_000_000, spill_dir=tmp_path / "spill")
    for _, _, outputs in capture.batches():  # what the collector writes: every book and trade it publishes
        for msg in outputs:
            if type(msg) is BookSnapshot:
                sink.add_book(msg)
            elif type(msg) is Trade:
                sink.add_trade(msg)
    asyncio.run(sink.close())
    assert sink.written["orderbook_snapshots"] > 5_000

    from_capture = Engine(cfg, CaptureSource.load(scenario.captures, cfg, start_ns=start), record=True,
                          latency=LatencyModel.build(order={"*": "20"})).run()
    source = ClickHouseSource(url, ClickHouseWindow(), capture.instruments)
    assert (source.books, source.trades) == (sink.written["orderbook_snapshots"], sink.written["tick_trades"])
    from_tables = Engine(cfg, source, record=True, latency=LatencyModel.build(order={"*": "20"})).run()
    assert len(from_capture.signals) >= 20
    assert [s.signal_id for s in from_tables.signals] == [s.signal_id for s in from_capture.signals]
    assert [(f.fill_id, f.price, f.quantity) for f in from_tables.fills] == \
        [(f.fill_id, f.price, f.quantity) for f in from_capture.fills]


def test_arb_backtest_writes_the_json_and_html_report_with_its_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "shared.cli", "backtest", "--duration", "120", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SYNTHETIC" in done.stdout and "Sharpe" in done.stdout
    import json

    doc = json.loads((out / "report.json").read_text())
    for key in ("sharpe", "sortino", "max_drawdown", "max_drawdown_duration_s", "win_rate", "arbitrages",
                "avg_expected_edge_bps", "avg_realised_edge_bps", "fees_paid", "annualisation"):
        assert key in doc["metrics"]
    assert "binance->upbit" in doc["by_venue_pair"] or "upbit->binance" in doc["by_venue_pair"]
    assert "spatial" in doc["by_strategy"] and doc["note"].startswith("SYNTHETIC")
    page = (out / "report.html").read_text()
    assert "equity.png" in page and (out / "equity.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "shared.cli", "backtest", "--order-latency", "gamma:1"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "latency" in bad.stderr
