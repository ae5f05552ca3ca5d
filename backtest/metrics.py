"""Performance figures of a backtest, from its executions.

**Equity** is the risk manager's: ``starting equity + cumulative realised PnL`` in the
reference currency, a step at each execution's finish time (not a mark-to-market of the
inventory). It is sampled at the end of every ``period_s`` interval from the start of the
run; **returns** are the simple returns between consecutive samples.

**Annualisation**: crypto trades around the clock, so a year has ``365 x 86,400 / period_s``
periods; Sharpe = ``mean(r) / std(r, ddof=1) x sqrt(periods per year)`` and Sortino =
``mean(r) x periods / (sqrt(mean(min(r, 0)^2)) x sqrt(periods))``, with a zero risk-free rate
and a zero required return: the conventions of empyrical (``annualization=periods per year``),
against which ``tests/test_backtest_metrics.py`` checks them to 1e-9. A figure that cannot be
computed (fewer than two returns, no dispersion) is NaN, and ``null`` in JSON.

**Max drawdown** is the largest fall from a running peak of the sampled equity, as a
negative fraction of that peak (the starting equity counts as the first peak); its
**duration** is from that peak to the sample where equity first regains it (or the end of
the run if it never does). **Underwater** is the longest time spent below a previous peak.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

SECONDS_PER_YEAR = 365 * 86_400
_S = 1_000_000_000


@dataclass(frozen=True)
class Annualisation:
    period_s: float = 1.0

    @property
    def periods_per_year(self) -> float:
        return SECONDS_PER_YEAR / self.period_s

    def describe(self) -> str:
        return (f"simple returns of equity sampled every {self.period_s:g} s, annualised with "
                f"sqrt({self.periods_per_year:,.0f}) periods per year (365 days x 24 h: a 24/7 market), "
                "zero risk-free rate")


def equity_curve(pnl_events: Iterable[tuple[int, Decimal]], starting_equity: Decimal, start_ns: int, end_ns: int,
                 period_ns: int) -> tuple[list[int], list[Decimal]]:
    """Equity at the end of each interval: ``(times, equity)``, the first sample at ``start_ns``."""
    events = sorted(pnl_events)
    n = max(1, math.ceil((end_ns - start_ns) / period_ns))
    times = [start_ns + k * period_ns for k in range(n + 1)]
    equity: list[Decimal] = []
    total = Decimal(0)
    i = 0
    for t in times:
        while i < len(events) and events[i][0] <= t:
            total += events[i][1]
            i += 1
        equity.append(starting_equity + total)
    if i < len(events):  # executions finishing after the last sample close the curve
        for _, pnl in events[i:]:
            total += pnl
        times.append(max(times[-1] + period_ns, events[-1][0]))
        equity.append(starting_equity + total)
    return times, equity


def simple_returns(equity: Sequence[Decimal | float]) -> np.ndarray:
    values = np.array([float(e) for e in equity], dtype=float)
    if len(values) < 2:
        return np.array([], dtype=float)
    return values[1:] / values[:-1] - 1.0


def sharpe(returns: np.ndarray, periods_per_year: float) -> float:
    if len(returns) < 2:
        return math.nan
    std = float(np.std(returns, ddof=1))
    if float(np.max(returns)) == float(np.min(returns)):
        std = 0.0  # a constant series has no dispersion, whatever the rounding residue says
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.divide(np.mean(returns), std) * math.sqrt(periods_per_year))


def sortino(returns: np.ndarray, periods_per_year: float) -> float:
    if len(returns) < 2:
        return math.nan
    downside = np.clip(returns, -np.inf, 0.0)
    risk = math.sqrt(float(np.mean(downside * downside))) * math.sqrt(periods_per_year)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.divide(float(np.mean(returns)) * periods_per_year, risk))


@dataclass(frozen=True)
class Drawdown:
    max_drawdown: float
    """Negative fraction of the peak (0 when equity never fell)."""
    peak_ns: int
    trough_ns: int
    recovered_ns: int | None
    duration_ns: int
    """Peak to recovery, or to the end of the run when not recovered."""
    longest_underwater_ns: int


def drawdown(times: Sequence[int], equity: Sequence[Decimal | float]) -> Drawdown:
    values = [float(e) for e in equity]
    if not values:
        return Drawdown(0.0, 0, 0, None, 0, 0)
    peak_value, peak_i = values[0], 0
    worst, worst_peak_i, worst_trough_i = 0.0, 0, 0
    underwater_from: int | None = None
    longest = 0
    for i, v in enumerate(values):
        if v >= peak_value:
            if underwater_from is not None:
                longest = max(longest, times[i] - times[underwater_from])
                underwater_from = None
            peak_value, peak_i = v, i
            continue
        if underwater_from is None:
            underwater_from = peak_i
        dd = (v - peak_value) / peak_value
        if dd < worst:
            worst, worst_peak_i, worst_trough_i = dd, peak_i, i
    if underwater_from is not None:
        longest = max(longest, times[-1] - times[underwater_from])
    recovered: int | None = None
    if worst < 0:
        target = values[worst_peak_i]
        recovered = next((times[j] for j in range(worst_trough_i, len(values)) if values[j] >= target), None)
    end = recovered if recovered is not None else times[-1]
    duration = end - times[worst_peak_i] if worst < 0 else 0
    return Drawdown(worst, times[worst_peak_i], times[worst_trough_i], recovered, duration, longest)


def finite(value: float) -> float | None:
    """A number JSON can carry: NaN and infinities become null."""
    return value if math.isfinite(value) else None
