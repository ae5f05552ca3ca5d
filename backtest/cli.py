"""`arb backtest`: the services' cores over recorded data on a simulated clock.

    arb backtest                                  # the bundled scenario (Binance recorded, Upbit synthetic)
    arb backtest --capture binance=btc.gz,info.txt --capture upbit=krw.gz --config my.toml
    arb backtest --clickhouse chdb://./var/clickhouse --from 2026-11-21T10:00:00 --to 2026-11-21T11:00:00 \\
                 --metadata binance=info.txt
    arb backtest --set trading.min_profit_threshold=0.001 --order-latency binance=30 --feed-latency lognormal:5,0.5
    arb backtest --sweep --grid trading.min_profit_threshold=0.0003,0.0005,0.001 --grid latency.order=5,50
    arb backtest --walk-forward 4 --grid trading.min_profit_threshold=0.0003,0.0005,0.001

Writes ``report.json``, ``report.html`` and its PNGs under ``--out`` (default
``var/backtest/<time>``) and prints a summary (``--json``: the JSON document). Latencies are
``[VENUE=]DIST`` with DIST ``5`` (ms), ``uniform:2,8``, ``normal:5,1``, ``lognormal:5,0.5``
or ``empirical:1,2,3``; the order latency defaults to ``executor.order_latency_ms``.
Exit codes: 0 done, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backtest.latency import LatencyError, parse_venue_map
from backtest.runner import RunSpec, parse_value, report, run, set_path, sweep, walk_forward
from backtest.sources import ClickHouseWindow
from shared.capture import CaptureError
from shared.config import ConfigError


class ProgressBar:
    """One line on stderr, redrawn at most every 0.2 s."""

    def __init__(self, label: str, stream: Any = sys.stderr, width: int = 30) -> None:
        self.label = label
        self.stream = stream
        self.width = width
        self.started = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        share = done / total if total else 1.0
        filled = int(share * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {share:4.0%} {done:,}/{total:,} {now - self.started:5.1f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _time_ns(text: str) -> int:
    if text.isdigit():
        return int(text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000) * 1000


def _files(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        exchange, sep, files = item.partition("=")
        if not sep or not files:
            raise ValueError(f"expected EXCHANGE=FILE[,FILE], got {item!r}")
        out.setdefault(exchange.strip(), []).extend(f for f in files.split(",") if f)
    return out


def _grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid expects KEY=V1,V2,..., got {item!r}")
        if key in ("latency.feed", "latency.order"):
            grid[key] = values.split(";") if ";" in values else values.split(",")
        else:
            grid[key] = values.split(",")
    return grid


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arb backtest", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="TOML config (default: backtest/scenario.toml with the bundled scenario)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. "
                   "trading.max_notional=300 (repeatable)")
    p.add_argument("--capture", action="append", default=[], metavar="EXCHANGE=FILE[,FILE]")
    p.add_argument("--clickhouse", nargs="?", const="", default=None, metavar="URL",
                   help="read orderbook_snapshots/tick_trades (default URL: clickhouse.url)")
    p.add_argument("--from", dest="from_", metavar="TIME", help="ClickHouse window start (ISO UTC or ns)")
    p.add_argument("--to", metavar="TIME", help="ClickHouse window end (ISO UTC or ns)")
    p.add_argument("--exchanges", help="ClickHouse: comma-separated exchanges (default: all)")
    p.add_argument("--metadata", action="append", default=[], metavar="EXCHANGE=FILE",
                   help="ClickHouse: recorded instrument lists for the trading rules")
    p.add_argument("--duration", type=float, help="bundled scenario: seconds of it (default: all)")
    p.add_argument("--scenario-seed", type=int, default=7)
    p.add_argument("--feed-latency", action="append", default=[], metavar="[VENUE=]DIST")
    p.add_argument("--order-latency", action="append", default=[], metavar="[VENUE=]DIST")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled latencies")
    p.add_argument("--start-ns", type=int, help="deliver the first record at this time (paced replays)")
    p.add_argument("--speed", type=float, default=1.0, help="with --start-ns: the replay's speed")
    p.add_argument("--period-s", type=float, default=1.0, help="equity sampling interval for returns (s)")
    p.add_argument("--out", help="output directory (default var/backtest/<time>)")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    p.add_argument("--no-html", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sweep", action="store_true", help="run every combination of --grid")
    p.add_argument("--walk-forward", type=int, metavar="WINDOWS", help="optimise on window k, test on k+1")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="config path or latency.feed / latency.order ([VENUE=]DIST values, ';'-separated)")
    p.add_argument("--objective", default="pnl", choices=("pnl", "sharpe", "sortino", "win_rate"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return p


def cmd_backtest(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        spec, source_doc = _spec(args)
        if args.sweep or args.walk_forward:
            return _grid_runs(args, spec)
        progress = ProgressBar("backtest") if args.progress or (sys.stderr.isatty() and not args.quiet) else None
        result, cfg, latency = run(spec, progress)
    except (ConfigError, LatencyError, CaptureError, ValueError, OSError) as exc:
        print(f"arb backtest: {exc}", file=sys.stderr)
        return 2
    doc = report(spec, result, cfg, latency, source_doc)
    out = Path(args.out or Path(cfg.var_dir) / "backtest" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    from backtest.report import build, write_html, write_json

    write_json(doc, out / "report.json")
    if not args.no_html:
        _, curve = build(result, reference=cfg.trading.reference_currency,
                         starting_equity=_decimal(cfg.risk.starting_equity), period_s=spec.period_s)
        write_html(result, curve, doc, out)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _summary(doc, out, not args.no_html)
    return 0


def _decimal(value: float) -> Any:
    from decimal import Decimal

    return Decimal(repr(value))


def _spec(args: argparse.Namespace) -> tuple[RunSpec, dict[str, Any]]:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        set_path(overrides, key, parse_value(value))
    common: dict[str, Any] = dict(
        overrides=overrides, feed_latency=parse_venue_map(args.feed_latency),
        order_latency=parse_venue_map(args.order_latency) or None, seed=args.seed, period_s=args.period_s,
        start_ns=args.start_ns, speed=args.speed)
    if args.capture:
        captures = _files(args.capture)
        spec = RunSpec(captures=captures, config_path=args.config, **common)
        return spec, {"captures": captures}
    if args.clickhouse is not None:
        from shared.config import load_config

        url = args.clickhouse or load_config(args.config).clickhouse.url
        window = ClickHouseWindow(
            exchanges=tuple(e for e in (args.exchanges or "").split(",") if e),
            start_ns=_time_ns(args.from_) if args.from_ else 0, end_ns=_time_ns(args.to) if args.to else 0)
        spec = RunSpec(clickhouse_url=url, clickhouse_window=window, metadata=_files(args.metadata),
                       config_path=args.config, **common)
        return spec, {"clickhouse": url, "from": args.from_, "to": args.to}
    from backtest.runner import SCENARIO_CONFIG
    from backtest.scenario import ScenarioParams, ensure
    from shared.config import load_config

    var = Path(load_config(args.config or str(SCENARIO_CONFIG)).var_dir)
    scenario = ensure(ScenarioParams(seed=args.scenario_seed, duration_s=args.duration), var / "scenarios")
    spec = RunSpec(captures=scenario.captures, config_path=args.config or str(SCENARIO_CONFIG), note=scenario.note,
                   **common)
    return spec, {"scenario": {"seed": args.scenario_seed, "duration_s": round(scenario.duration_s, 3),
                               "captures": scenario.captures, "premium_model": scenario.to_json()["model"]}}


def _grid_runs(args: argparse.Namespace, spec: RunSpec) -> int:
    grid = _grid(args.grid)
    if not grid:
        print("arb backtest: --sweep and --walk-forward need at least one --grid", file=sys.stderr)
        return 2
    from backtest.runner import build_source, load_cfg

    cfg = load_cfg(spec)
    out = Path(args.out or Path(cfg.var_dir) / "backtest" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = ProgressBar("runs") if args.progress or (sys.stderr.isatty() and not args.quiet) else None
    if args.walk_forward:
        source = build_source(spec, cfg)
        doc = walk_forward(spec, grid, windows=args.walk_forward, span=(source.start_ns, source.end_ns),
                           workers=args.workers, objective=args.objective, progress=progress)
        name = "walk_forward.json"
    else:
        doc = sweep(spec, grid, workers=args.workers, objective=args.objective, progress=progress)
        name = "sweep.json"
    doc["wall_s"] = round(time.perf_counter() - started, 2)
    if spec.note:
        doc["note"] = spec.note
    (out / name).write_text(json.dumps(doc, indent=2, default=str))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    elif args.walk_forward:
        for i, step in enumerate(doc["steps"]):
            oos = step["out_of_sample"]
            print(f"step {i}: chose {step['chosen']} -> out-of-sample PnL {oos['realised_pnl']:.4f}, "
                  f"{oos['arbitrages']} arbitrages")
        total = doc["out_of_sample"]
        print(f"out-of-sample total: PnL {total['realised_pnl']:.4f}, {total['arbitrages']} arbitrages "
              f"({doc['wall_s']} s); {out / name}")
    else:
        for row in doc["results"]:
            print(f"{row['objective']:>12.4f}  pnl {row['realised_pnl']:>10.4f}  arbs {row['arbitrages']:>4}  "
                  f"{row['params']}")
        print(f"{doc['runs']} runs in {doc['wall_s']} s; {out / name}")
    return 0


def _summary(doc: dict[str, Any], out: Path, html: bool) -> None:
    m, pnl = doc["metrics"], doc["pnl"]
    if doc.get("note"):
        print(doc["note"])
    print(f"period       {doc['period']['start']} .. {doc['period']['end']} ({doc['period']['duration_s']} s)")
    print(f"activity     {doc['activity']['books']:,} books, signals {doc['activity']['signals']}, "
          f"decisions {doc['activity']['decisions']}")
    print(f"arbitrages   {m['arbitrages']} {m['by_status']}, win rate {_pct(m['win_rate'])}")
    print(f"PnL          {pnl['realised']:.6f} {pnl['currency']} after {pnl['fees']:.6f} fees "
          f"(expected per trade {_f(m['avg_expected_profit'])}, realised {_f(m['avg_realised_profit'])})")
    print(f"risk         Sharpe {_f(m['sharpe'])}, Sortino {_f(m['sortino'])}, max drawdown "
          f"{m['max_drawdown']:.4%} over {m['max_drawdown_duration_s']} s")
    print(f"             ({m['annualisation']})")
    print(f"report       {out / 'report.json'}" + (f", {out / 'report.html'}" if html else ""))


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
