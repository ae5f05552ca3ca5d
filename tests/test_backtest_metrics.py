"""The backtest's performance figures: equal to empyrical's on the same returns, and right on a
curve whose numbers are known by hand."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

import empyrical
import numpy as np
import pytest

from backtest.metrics import Annualisation, drawdown, equity_curve, sharpe, simple_returns, sortino
from backtest.report import build
from backtest.runner import RunSpec, run
from backtest.scenario import ScenarioParams, ensure

DAY = 86_400_000_000_000


def test_a_hand_made_equity_curve_gives_the_known_sharpe_sortino_and_drawdown() -> None:
    # Daily equity 100, 110, 99, 99, 118.8: returns +10%, -10%, 0, +20%.
    times = [k * DAY for k in range(5)]
    equity = [Decimal(100), Decimal(110), Decimal(99), Decimal(99), Decimal("118.8")]
    returns = simple_returns(equity)
    assert returns.tolist() == pytest.approx([0.1, -0.1, 0.0, 0.2], abs=1e-15)
    days = Annualisation(86_400).periods_per_year
    assert days == 365
    # mean 0.05, sample variance 0.05 / 3: Sharpe = 0.05 / sqrt(0.05 / 3) * sqrt(365) = 0.05 * sqrt(21,900)
    assert sharpe(returns, days) == pytest.approx(0.05 * math.sqrt(21_900), abs=1e-12)
    # downside deviation sqrt(0.01 / 4) = 0.05 = the mean: Sortino = 0.05 * 365 / (0.05 * sqrt(365)) = sqrt(365)
    assert sortino(returns, days) == pytest.approx(math.sqrt(365), abs=1e-12)
    dd = drawdown(times, equity)
    assert dd.max_drawdown == pytest.approx(-0.1, abs=1e-15)  # 110 -> 99
    assert (dd.peak_ns, dd.trough_ns, dd.recovered_ns) == (DAY, 2 * DAY, 4 * DAY)
    assert dd.duration_ns == 3 * DAY  # from the peak until 118.8 regains it
    assert dd.longest_underwater_ns == 3 * DAY


def test_the_equity_curve_steps_at_each_execution_and_samples_each_interval_end() -> None:
    s = 1_000_000_000
    times, equity = equity_curve([(int(1.5 * s), Decimal(10)), (int(2.5 * s), Decimal(-11)), (3 * s, Decimal(1))],
                                 Decimal(100), 0, 4 * s, s)
    assert times == [0, s, 2 * s, 3 * s, 4 * s]
    assert equity == [100, 100, 110, 100, 100]
    # an execution finishing after the run's last sample still counts, on a sample of its own
    times, equity = equity_curve([(int(4.5 * s), Decimal(5))], Decimal(100), 0, 2 * s, s)
    assert times[-1] == int(4.5 * s) and equity[-1] == 105


def test_no_returns_or_no_dispersion_gives_nan_or_infinity_as_empyrical_does() -> None:
    ppy = Annualisation(1).periods_per_year
    for returns in (np.array([]), np.array([0.01]), np.array([0.0, 0.0, 0.0]), np.array([0.01, 0.01])):
        for mine, theirs in ((sharpe(returns, ppy), empyrical.sharpe_ratio(returns, annualization=ppy)),
                             (sortino(returns, ppy), empyrical.sortino_ratio(returns, annualization=ppy))):
            assert (math.isnan(mine) and math.isnan(theirs)) or mine == theirs


def test_random_returns_give_empyricals_figures_to_1e_9() -> None:
    rng = np.random.default_rng(5)
    for period_s in (1.0, 60.0, 86_400.0):
        ppy = Annualisation(period_s).periods_per_year
        returns = rng.normal(0.0002, 0.003, size=500)
        equity = [Decimal(10_000)]
        for r in returns:
            equity.append(equity[-1] * Decimal(repr(float(1 + r))))
        derived = simple_returns(equity)
        assert sharpe(derived, ppy) == pytest.approx(empyrical.sharpe_ratio(derived, annualization=ppy), abs=1e-9)
        assert sortino(derived, ppy) == pytest.approx(empyrical.sortino_ratio(derived, annualization=ppy), abs=1e-9)
        times = list(range(len(equity)))
        assert drawdown(times, equity).max_drawdown == pytest.approx(empyrical.max_drawdown(derived), abs=1e-9)


def test_a_backtests_sharpe_sortino_and_max_drawdown_equal_empyricals_on_its_returns(tmp_path: Path) -> None:
    # A 300 ms order latency: books move while orders travel, so some arbitrages lose.
    scenario = ensure(ScenarioParams(), tmp_path)
    spec = RunSpec(captures=scenario.captures, order_latency={"*": "300"})
    result, cfg, _ = run(spec)
    doc, curve = build(result, reference="USDT", starting_equity=Decimal(repr(cfg.risk.starting_equity)),
                       period_s=1.0)
    returns = simple_returns(curve.equity)
    assert (returns < 0).sum() >= 3 and (returns > 0).sum() >= 10, "the run should both win and lose"
    ppy = Annualisation(1.0).periods_per_year
    m = doc["metrics"]
    assert m["sharpe"] == pytest.approx(empyrical.sharpe_ratio(returns, annualization=ppy), abs=1e-9)
    assert m["sortino"] == pytest.approx(empyrical.sortino_ratio(returns, annualization=ppy), abs=1e-9)
    assert m["max_drawdown"] == pytest.approx(empyrical.max_drawdown(returns), abs=1e-9)
    assert m["max_drawdown"] < 0 and m["max_drawdown_duration_s"] > 0
    # the curve ends where the executions' PnL says it does, to the cent and beyond
    pnl = sum((o.execution.realised_pnl for o in result.outcomes), Decimal(0))
    assert curve.equity[-1] == Decimal(repr(cfg.risk.starting_equity)) + pnl
    assert doc["pnl"]["realised"] == float(pnl)
