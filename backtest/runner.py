"""One backtest run from a plain description, and the runs built from many: sweeps and walk-forward.

A ``RunSpec`` is picklable, so a sweep hands each grid point to a worker process
(``concurrent.futures``: local processes; a cluster engine when one machine is not enough).

**Walk-forward**: the data's span is cut into ``n`` equal windows. For each step k, every
grid point is run trading only inside window k (the *optimisation*), the best by the
objective is chosen, and that choice is run trading only inside window k+1 (the
*out-of-sample test*); then the windows roll. Runs start reading at the beginning of the data
so books are synced when trading starts (the Binance book needs the recording's REST
snapshot), evaluate nothing before their window and stop reading at its end: an
optimisation run for window k never reads a message of window k+1 (each run reports the
first and last message it read, and ``tests/test_backtest_walkforward.py`` checks it).
Out-of-sample results are reported apart from the in-sample ones.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from backtest.engine import Engine, Progress, RunResult
from backtest.latency import LatencyModel
from backtest.report import build
from backtest.sources import CaptureSource, ClickHouseSource, ClickHouseWindow, MarketSource
from shared.config import Config, load_config

SCENARIO_CONFIG = Path(__file__).resolve().parent / "scenario.toml"
LATENCY_KEYS = ("latency.feed", "latency.order")


@dataclass(frozen=True)
class RunSpec:
    captures: Mapping[str, Sequence[str]] | None = None
    clickhouse_url: str | None = None
    clickhouse_window: ClickHouseWindow = field(default_factory=ClickHouseWindow)
    metadata: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Exchange -> files with recorded instrument lists (trading rules) for a ClickHouse run."""
    config_path: str | None = str(SCENARIO_CONFIG)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    feed_latency: Mapping[str, str] = field(default_factory=dict)
    order_latency: Mapping[str, str] | None = None
    """None: ``executor.order_latency_ms`` of the configuration, every venue."""
    seed: int = 0
    trade_from_ns: int | None = None
    until_ns: int | None = None
    start_ns: int | None = None
    speed: float = 1.0
    period_s: float = 1.0
    note: str | None = None
    record: bool = False


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """``0.001`` -> float, ``5`` -> int, ``true`` -> bool, ``["a"]`` -> list, anything else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_cfg(spec: RunSpec) -> Config:
    return load_config(spec.config_path, overrides=dict(spec.overrides) or None)


def latency_model(spec: RunSpec, cfg: Config) -> LatencyModel:
    order = dict(spec.order_latency) if spec.order_latency is not None else {"*": str(cfg.executor.order_latency_ms)}
    return LatencyModel.build(dict(spec.feed_latency), order, spec.seed)


def build_source(spec: RunSpec, cfg: Config) -> MarketSource:
    if spec.captures:
        return CaptureSource.load({k: list(v) for k, v in spec.captures.items()}, cfg, start_ns=spec.start_ns,
                                  speed=spec.speed)
    if spec.clickhouse_url:
        instruments = {}
        if spec.metadata:
            import asyncio

            from services.collector.replay import ReplaySource

            instruments = asyncio.run(ReplaySource.load({k: list(v) for k, v in spec.metadata.items()},
                                                        cfg)).instruments
        return ClickHouseSource(spec.clickhouse_url, spec.clickhouse_window, instruments)
    raise ValueError("a run needs captures or a ClickHouse URL")


def run(spec: RunSpec, progress: Progress | None = None) -> tuple[RunResult, Config, LatencyModel]:
    cfg = load_cfg(spec)
    source = build_source(spec, cfg)
    latency = latency_model(spec, cfg)
    engine = Engine(cfg, source, latency=latency, trade_from_ns=spec.trade_from_ns, until_ns=spec.until_ns,
                    record=spec.record)
    return engine.run(progress), cfg, latency


def report(spec: RunSpec, result: RunResult, cfg: Config, latency: LatencyModel,
           source: dict[str, Any] | None = None) -> dict[str, Any]:
    context: dict[str, Any] = {
        "source": source or ({"captures": {k: list(v) for k, v in spec.captures.items()}} if spec.captures
                             else {"clickhouse": spec.clickhouse_url}),
        "config": {
            "file": spec.config_path, "overrides": dict(spec.overrides), "env": cfg.env, "session": cfg.session,
            "strategies": list(cfg.detector.strategies), "min_profit_threshold": cfg.trading.min_profit_threshold,
            "max_notional": cfg.trading.max_notional, "start_balances": cfg.executor.start_balances,
        },
        "latency": {**latency.describe(), "seed": latency.seed},
    }
    if spec.note:
        context["note"] = spec.note
    doc, _ = build(result, reference=cfg.trading.reference_currency,
                   starting_equity=Decimal(repr(cfg.risk.starting_equity)), period_s=spec.period_s, context=context)
    return doc


# --------------------------------------------------------------------------- grids


def expand_grid(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def with_params(spec: RunSpec, params: Mapping[str, str]) -> RunSpec:
    """The spec with grid values applied: config paths go to the overrides, ``latency.feed`` /
    ``latency.order`` (``[VENUE=]DIST``) to the latency model."""
    overrides = json.loads(json.dumps(spec.overrides))
    feed = dict(spec.feed_latency)
    order = dict(spec.order_latency) if spec.order_latency is not None else None
    for key, value in params.items():
        if key in LATENCY_KEYS:
            venue, sep, dist = value.partition("=")
            target = feed if key == "latency.feed" else (order if order is not None else {})
            if key == "latency.order" and order is None:
                order = target
            target[venue if sep else "*"] = dist if sep else value
        else:
            set_path(overrides, key, parse_value(value))
    return replace(spec, overrides=overrides, feed_latency=feed, order_latency=order)


def _objective(doc: Mapping[str, Any], name: str) -> float:
    value = doc["pnl"]["realised"] if name == "pnl" else doc["metrics"].get(name)
    return float(value) if value is not None and math.isfinite(float(value)) else -math.inf


def run_summary(spec: RunSpec) -> dict[str, Any]:
    """A worker's job: one run, its figures without the equity curve."""
    result, cfg, latency = run(spec)
    doc = report(spec, result, cfg, latency)
    doc.pop("equity_curve", None)
    doc["read"] = {"first_ns": result.first_event_ns, "last_ns": result.last_event_ns}
    return doc


class _Counted:
    """Progress over several batches of runs: ``done`` of ``total`` so far."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def _map(fn: Callable[[RunSpec], dict[str, Any]], specs: list[RunSpec], workers: int,
         counted: _Counted | None = None) -> list[dict[str, Any]]:
    if workers <= 1 or len(specs) <= 1:
        out = []
        for s in specs:
            out.append(fn(s))
            if counted is not None:
                counted.tick()
        return out
    with ProcessPoolExecutor(max_workers=min(workers, len(specs))) as pool:
        futures = [pool.submit(fn, s) for s in specs]
        for _ in as_completed(futures):
            if counted is not None:
                counted.tick()
        return [f.result() for f in futures]


def _brief(doc: Mapping[str, Any], objective: str) -> dict[str, Any]:
    m = doc["metrics"]
    return {"objective": _objective(doc, objective), "realised_pnl": doc["pnl"]["realised"],
            "fees": doc["pnl"]["fees"], "arbitrages": m["arbitrages"], "with_fills": m["arbitrages_with_fills"],
            "win_rate": m["win_rate"],
            "sharpe": m["sharpe"], "sortino": m["sortino"], "max_drawdown": m["max_drawdown"],
            "decisions": doc["activity"]["decisions"], "read": doc.get("read")}


def sweep(spec: RunSpec, grid: Mapping[str, Sequence[str]], *, workers: int = os.cpu_count() or 1,
          objective: str = "pnl", run_one: Callable[[RunSpec], dict[str, Any]] = run_summary,
          progress: Progress | None = None) -> dict[str, Any]:
    points = expand_grid(grid)
    docs = _map(run_one, [with_params(spec, p) for p in points], workers, _Counted(len(points), progress))
    rows = [{"params": p, **_brief(d, objective)} for p, d in zip(points, docs, strict=True)]
    ranked = sorted(range(len(rows)), key=lambda i: (-rows[i]["objective"], i))
    return {"objective": objective, "grid": {k: list(v) for k, v in grid.items()}, "runs": len(rows),
            "best": rows[ranked[0]] if rows else None, "results": [rows[i] for i in ranked]}


def windows_of(start_ns: int, end_ns: int, n: int) -> list[tuple[int, int]]:
    edges = [start_ns + (end_ns - start_ns) * k // n for k in range(n + 1)]
    return [(edges[k], edges[k + 1]) for k in range(n)]


def walk_forward(spec: RunSpec, grid: Mapping[str, Sequence[str]], *, windows: int, span: tuple[int, int],
                 workers: int = os.cpu_count() or 1, objective: str = "pnl",
                 run_one: Callable[[RunSpec], dict[str, Any]] = run_summary,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Optimise on window k, test the choice on window k+1, for k = 0 .. windows-2."""
    if windows < 2:
        raise ValueError("walk-forward needs at least two windows")
    points = expand_grid(grid)
    counted = _Counted((windows - 1) * (len(points) + 1), progress)
    cuts = windows_of(span[0], span[1], windows)
    steps: list[dict[str, Any]] = []
    oos_pnl = 0.0
    oos_arbs = oos_traded = oos_wins = 0
    for k in range(windows - 1):
        (train_from, train_to), (test_from, test_to) = cuts[k], cuts[k + 1]
        train = [replace(with_params(spec, p), trade_from_ns=train_from, until_ns=train_to) for p in points]
        docs = _map(run_one, train, workers, counted)
        scores = [_objective(d, objective) for d in docs]
        best = max(range(len(points)), key=lambda i: (scores[i], -i))
        test_doc = run_one(replace(with_params(spec, points[best]), trade_from_ns=test_from, until_ns=test_to))
        counted.tick()
        test = _brief(test_doc, objective)
        oos_pnl += test["realised_pnl"]
        oos_arbs += test["arbitrages"]
        oos_traded += test["with_fills"]
        oos_wins += round((test["win_rate"] or 0.0) * test["with_fills"])
        steps.append({
            "train": {"from_ns": train_from, "to_ns": train_to},
            "test": {"from_ns": test_from, "to_ns": test_to},
            "chosen": points[best],
            "in_sample": [{"params": p, **_brief(d, objective)} for p, d in zip(points, docs, strict=True)],
            "out_of_sample": test,
        })
    return {"objective": objective, "windows": windows, "grid": {k: list(v) for k, v in grid.items()},
            "steps": steps,
            "out_of_sample": {"realised_pnl": oos_pnl, "arbitrages": oos_arbs,
                              "win_rate": oos_wins / oos_traded if oos_traded else None,
                              "per_step_pnl": [s["out_of_sample"]["realised_pnl"] for s in steps]}}
