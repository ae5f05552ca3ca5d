"""Walk-forward and sweeps over the real engine.

The leak trap: a 60 s scenario whose premium pays a low threshold in the first half (a steady
25 bps) and punishes it in the second (spikes of 60 bps lasting 100 ms, gone by the time a
300 ms order arrives, so the Upbit leg misses and is hedged at the reverted price). A high
threshold never trades. Optimising on the first half must choose the low threshold for the
second, although the high one is better there, and better over both halves together: an
optimiser that saw the test window would choose it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from backtest.runner import RunSpec, load_cfg, run_summary, sweep, walk_forward, with_params
from backtest.scenario import Scenario, ScenarioParams, generate
from backtest.sources import CaptureSource

LOW, HIGH = "0.0005", "0.008"
GRID = {"trading.min_profit_threshold": [LOW, HIGH]}


def _premium(t: float) -> float:
    if t < 30:
        return -0.0025
    return -0.006 if t % 1.0 < 0.1 else 0.0


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    return generate(ScenarioParams(seed=3, duration_s=60.0), tmp_path_factory.mktemp("trap"), premium_path=_premium)


def _pnl(spec: RunSpec, threshold: str, **window: int) -> float:
    doc = run_summary(replace(with_params(spec, {"trading.min_profit_threshold": threshold}), **window))
    return float(doc["pnl"]["realised"])


def test_walk_forward_chooses_on_the_past_window_only_never_on_the_one_it_tests(trap: Scenario) -> None:
    spec = RunSpec(captures=trap.captures, order_latency={"*": "300"})
    source = CaptureSource.load(trap.captures, load_cfg(spec))
    doc = walk_forward(spec, GRID, windows=2, span=(source.start_ns, source.end_ns), workers=2)

    [step] = doc["steps"]
    test_from, test_to = step["test"]["from_ns"], step["test"]["to_ns"]
    in_sample = {r["params"]["trading.min_profit_threshold"]: r for r in step["in_sample"]}
    assert in_sample[LOW]["realised_pnl"] > 0 == in_sample[HIGH]["realised_pnl"]
    assert step["chosen"] == {"trading.min_profit_threshold": LOW}
    # The leak detector: no optimisation run read a message of the window it was choosing for.
    for row in step["in_sample"]:
        assert row["read"]["last_ns"] < test_from
    # The trap is real: on the test window, and over both windows, the other choice pays more.
    assert _pnl(spec, HIGH, trade_from_ns=test_from, until_ns=test_to) > \
        _pnl(spec, LOW, trade_from_ns=test_from, until_ns=test_to)
    assert _pnl(spec, HIGH) > _pnl(spec, LOW)
    # Out-of-sample results are reported apart, and are the chosen threshold's run on the test window.
    oos = step["out_of_sample"]
    assert oos["realised_pnl"] == pytest.approx(_pnl(spec, LOW, trade_from_ns=test_from, until_ns=test_to), abs=0)
    assert oos["realised_pnl"] < 0
    assert doc["out_of_sample"]["realised_pnl"] == oos["realised_pnl"]
    assert doc["out_of_sample"]["per_step_pnl"] == [oos["realised_pnl"]]


def test_a_sweep_in_worker_processes_equals_the_same_runs_one_by_one(tmp_path: Path) -> None:
    scenario = generate(ScenarioParams(seed=2, duration_s=90.0, premium_start=-0.004), tmp_path)
    spec = RunSpec(captures=scenario.captures)
    grid = {"trading.min_profit_threshold": ["0.0003", "0.004"], "latency.order": ["5", "binance=200"]}
    parallel = sweep(spec, grid, workers=2)
    assert parallel["runs"] == 4
    objectives = [r["objective"] for r in parallel["results"]]
    assert objectives == sorted(objectives, reverse=True)
    for row in parallel["results"]:
        alone = run_summary(with_params(spec, row["params"]))
        assert row["realised_pnl"] == alone["pnl"]["realised"]
        assert row["decisions"] == alone["activity"]["decisions"]
    # the grid values did reach the runs: a 40 bps threshold trades less than a 3 bps one
    by = {(r["params"]["trading.min_profit_threshold"], r["params"]["latency.order"]): r for r in parallel["results"]}
    assert by[("0.004", "5")]["arbitrages"] < by[("0.0003", "5")]["arbitrages"]
    assert by[("0.0003", "binance=200")]["realised_pnl"] != by[("0.0003", "5")]["realised_pnl"]


def test_arb_backtest_sweep_and_walk_forward_write_their_results(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "shared.cli", "backtest", "--duration", "60", "--quiet", "--workers", "2",
            "--grid", "trading.min_profit_threshold=0.0005,0.004"]
    done = subprocess.run([*base, "--sweep", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    swept = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert swept["runs"] == 2 and swept["note"].startswith("SYNTHETIC")
    done = subprocess.run([*base, "--walk-forward", "3", "--out", str(tmp_path / "w")], capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    walked = json.loads((tmp_path / "w" / "walk_forward.json").read_text())
    assert len(walked["steps"]) == 2 and "out_of_sample" in walked
    assert "out-of-sample total" in done.stdout
