"""`arb monitor`: a refreshing terminal dashboard, and the logs.

``--metrics`` scrapes every live instance's /metrics directly (found through heartbeats),
so it works on the embedded stack and inside docker compose alike, and keeps working when
Prometheus does not. Rates are the difference between two scrapes ``--interval`` apart;
counters are summed over instances, gauges take the highest instance (replicas report
the same shared figure).

``--tail``, ``--errors``, ``--search`` read the log files of the embedded stack when they
exist and PostgreSQL ``system_logs`` otherwise (WARNING+ from every replica); see
``shared.ops.logstore`` for why.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from shared.config import Config, ConfigError, load_config
from shared.ops import logstore
from shared.ops.targets import Instance, Targets, instances, resolve
from shared.runtime import Bus

Labels = tuple[tuple[str, str], ...]

# --------------------------------------------------------------------------- scraping


@dataclass
class Snapshot:
    """Every sample of every live instance, labelled with its service and instance."""

    at: float
    counters: dict[tuple[str, Labels], float] = field(default_factory=dict)
    gauges: dict[tuple[str, Labels], float] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)

    def gauge(self, name: str) -> float | None:
        values = [v for (n, _), v in self.gauges.items() if n == name]
        return max(values) if values else None

    def gauges_by(self, name: str, *labels: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for (n, lbl), v in self.gauges.items():
            if n == name:
                key = tuple(dict(lbl).get(x, "") for x in labels)
                out[key] = max(out.get(key, v), v)
        return out


async def _scrape_one(http: aiohttp.ClientSession, inst: Instance) -> str | None:
    try:
        async with http.get(inst.base_url + "/metrics") as resp:
            return await resp.text() if resp.status == 200 else None
    except Exception:
        return None


async def scrape(bus: Bus, http: aiohttp.ClientSession) -> Snapshot:
    live = await instances(bus)
    texts = await asyncio.gather(*(_scrape_one(http, i) for i in live))
    snap = Snapshot(at=time.monotonic())
    for inst, text in zip(live, texts, strict=True):
        service = inst.beat.service
        if text is None:
            snap.unreachable.append(inst.beat.instance)
            continue
        snap.replicas[service] = snap.replicas.get(service, 0) + 1
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                # Per instance: a restarted replica resets only its own counters.
                labels = {**s.labels, "service": service, "instance": inst.beat.instance}
                key = (s.name, tuple(sorted(labels.items())))
                if family.type in ("counter", "histogram", "summary"):
                    snap.counters[key] = s.value
                else:
                    snap.gauges[key] = s.value
    return snap


# --------------------------------------------------------------------------- arithmetic


def increases(prev: Snapshot, cur: Snapshot, name: str) -> dict[Labels, float]:
    """Per series (instance included), how much counter ``name`` grew between the snapshots;
    a series that went down was reset (its process restarted) and counts from 0."""
    out: dict[Labels, float] = {}
    for (n, labels), value in cur.counters.items():
        if n != name:
            continue
        before = prev.counters.get((n, labels), 0.0)
        out[labels] = value - before if value >= before else value
    return out


def total_increase(prev: Snapshot, cur: Snapshot, name: str, **match: str) -> float | None:
    grown = increases(prev, cur, name)
    if not grown:
        return None
    return sum(v for labels, v in grown.items() if all(dict(labels).get(k) == want for k, want in match.items()))


def increase_by(prev: Snapshot, cur: Snapshot, name: str, *by: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, v in increases(prev, cur, name).items():
        out[tuple(dict(labels).get(x, "") for x in by)] += v
    return dict(out)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Like PromQL's: linear interpolation inside the bucket holding the q-th observation."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


def latency_by(prev: Snapshot, cur: Snapshot, name: str, *by: str) -> dict[tuple[str, ...], dict[float, float]]:
    """Bucket increases of histogram ``name``, per label combination ``by``."""
    out: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, v in increases(prev, cur, f"{name}_bucket").items():
        d = dict(labels)
        out[tuple(d.get(x, "") for x in by)][float(d["le"])] += v
    return {k: dict(v) for k, v in out.items()}


# --------------------------------------------------------------------------- dashboard


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def render_dashboard(prev: Snapshot, cur: Snapshot, cfg: Config) -> str:
    dt = max(cur.at - prev.at, 1e-9)
    scale = 60.0 / dt
    ccy = cfg.trading.reference_currency

    def rate(name: str, **match: str) -> float | None:
        grown = total_increase(prev, cur, name, **match)
        return None if grown is None else grown * scale

    def per_min(name: str, **match: str) -> str:
        return _num(rate(name, **match), "{:.1f}")

    errors = sum(rate("arb_log_records_total", level=lv) or 0.0 for lv in ("ERROR", "CRITICAL"))
    replicas = ", ".join(f"{s} {n}" for s, n in sorted(cur.replicas.items())) or "none"
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    unreachable = f"   UNREACHABLE: {', '.join(cur.unreachable)}" if cur.unreachable else ""
    lines = [
        f"arb monitor  {now}  every {dt:.1f}s  session {cfg.session}",
        f"services     {replicas}{unreachable}",
        "",
        f"trades/min   {per_min('arb_executor_executions_total'):>8}"
        f"    fills/min    {per_min('arb_executor_fills_total'):>6}"
        f"    signals/min {per_min('arb_detector_signals_total'):>8}",
        f"errors/min   {errors:>8.1f}    warnings/min {per_min('arb_log_records_total', level='WARNING'):>6}"
        f"    handler errors/min {per_min('arb_handler_errors_total')}",
    ]
    pnl_today, limit = cur.gauge("arb_risk_daily_realised_pnl"), cur.gauge("arb_risk_daily_loss_limit")
    used = ""
    if pnl_today is not None and limit and pnl_today < 0:
        used = f"  ({-pnl_today / limit:.0%} of the daily loss limit)"
    cumulative = _num(cur.gauge("arb_executor_realised_pnl"))
    lines.append(f"PnL today    {_num(pnl_today)} {ccy}{used}    cumulative {cumulative} {ccy}")
    breaker, halted = cur.gauge("arb_risk_circuit_breaker_open"), cur.gauge("arb_risk_halted")
    lines.append(
        f"open arbs    {_num(cur.gauge('arb_risk_open_arbitrages'), '{:.0f}')}    circuit breaker "
        f"{'-' if breaker is None else 'OPEN' if breaker else 'closed'}    halted "
        f"{'-' if halted is None else 'YES' if halted else 'no'}")
    exposure = sorted(cur.gauges_by("arb_risk_exposure", "scope", "name").items(), key=lambda kv: -abs(kv[1]))[:5]
    if exposure:
        lines.append("exposure     " + "   ".join(f"{s}:{n} {v:,.2f}" for (s, n), v in exposure))
    guards = increase_by(prev, cur, "arb_risk_guard_triggers_total", "guard")
    lines.append("guards       " + ("   ".join(f"{g} +{v:.0f}" for (g,), v in sorted(guards.items()) if v)
                                    or ("none triggered" if guards else "-")))
    lines += ["", f"{'HOP (stream/group)':<34} {'msg/s':>9} {'p50':>10} {'p99':>10} {'handle p99':>11} {'lag':>7}"]
    hops = latency_by(prev, cur, "arb_hop_latency_seconds", "stream", "group")
    handles = latency_by(prev, cur, "arb_handle_seconds", "stream", "group")
    inflow = increase_by(prev, cur, "arb_stream_messages_in_total", "stream", "group")
    lag = cur.gauges_by("arb_consumer_group_lag", "stream", "group")
    for key in sorted(set(hops) | set(lag)):
        buckets = hops.get(key, {})
        lines.append(
            f"{'/'.join(key):<34} {inflow.get(key, 0.0) / dt:>9.1f} {_ms(histogram_quantile(0.5, buckets)):>10} "
            f"{_ms(histogram_quantile(0.99, buckets)):>10} {_ms(histogram_quantile(0.99, handles.get(key, {}))):>11} "
            f"{lag.get(key, 0):>7.0f}")
    if not hops and not lag:
        lines.append("(no consumers yet)")
    return "\n".join(lines)


async def run_dashboard(cfg: Config, targets: Targets, interval: float, frames: int | None) -> None:
    bus = targets.bus(cfg)
    shown = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.ops.check_timeout_s)) as http:
            prev = await scrape(bus, http)
            while frames is None or shown < frames:
                await asyncio.sleep(interval)
                cur = await scrape(bus, http)
                text = render_dashboard(prev, cur, cfg)
                # A live screen redraws in place; a counted run (--once) just prints.
                print(text if frames is not None else "\x1b[H\x1b[2J" + text, flush=True)
                prev = cur
                shown += 1
    finally:
        await bus.close()


# --------------------------------------------------------------------------- logs


def _log_source(choice: str, targets: Targets) -> str:
    if choice != "auto":
        return choice
    return "files" if logstore.log_files(targets.log_dir) else "postgres"


def show_logs(args: argparse.Namespace, cfg: Config, targets: Targets) -> int:
    level = args.level or ("ERROR" if args.errors else "DEBUG")
    try:
        since = logstore.parse_since(args.since) if args.since else None
        query = logstore.LogQuery(since=since, min_level=level, service=args.service, pattern=args.search,
                                  limit=args.tail if args.tail else (None if args.follow else 1000))
        query.regex()
    except Exception as exc:  # a bad --since or --search pattern
        print(f"arb monitor: {exc}", file=sys.stderr)
        return 2
    source = _log_source(args.source, targets)
    if source == "postgres" and logstore.LEVELS[level] < logstore.LEVELS[cfg.ops.log_to_postgres_level]:
        print(f"(PostgreSQL keeps {cfg.ops.log_to_postgres_level} and above; every level is in the service's "
              "stdout: `docker compose logs SERVICE`)", file=sys.stderr)
    try:
        # Remember where "now" is first: the history is read up to it and following starts
        # there, so no record is missed or printed twice.
        if source == "files":
            ends = logstore.file_ends(targets.log_dir)
            history = logstore.read_files(targets.log_dir, query, ends)
            follow: Iterator[logstore.LogLine] = logstore.follow_files(targets.log_dir, query, start=ends)
        else:
            last_id = logstore.last_log_id(targets.database_url)
            history = logstore.read_postgres(targets.database_url, cfg.session, query, up_to_id=last_id)
            follow = logstore.follow_postgres(targets.database_url, cfg.session, query, after_id=last_id)
        for line in history:
            print(line.render(), flush=True)
        if args.follow:
            for line in follow:
                print(line.render(), flush=True)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        print(f"arb monitor: cannot read logs from {source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_monitor(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="arb monitor",
        description="A live terminal dashboard (--metrics) or the logs (--tail, --errors, --search).",
        epilog="examples: arb monitor --metrics | arb monitor --tail 100 --follow | "
               "arb monitor --errors --since 1h | arb monitor --search 'order.*rejected' --since 30m")
    p.add_argument("--config")
    p.add_argument("--metrics", action="store_true", help="refreshing dashboard from every instance's /metrics")
    p.add_argument("--interval", type=float, default=2.0, help="dashboard refresh, seconds (default 2)")
    p.add_argument("--once", action="store_true", help="print one dashboard frame and exit")
    p.add_argument("--tail", type=int, nargs="?", const=50, metavar="N", help="the last N log records (default 50)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    p.add_argument("--errors", action="store_true", help="only ERROR and above")
    p.add_argument("--level", choices=list(logstore.LEVELS), help="only this level and above")
    p.add_argument("--since", help="only records this recent: 30s, 15m, 1h, 2d")
    p.add_argument("--search", metavar="PATTERN", help="case-insensitive regular expression")
    p.add_argument("--service", help="only this service's records")
    p.add_argument("--source", choices=("auto", "files", "postgres"), default="auto",
                   help="auto: the embedded stack's log files when present, else PostgreSQL")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    targets = resolve(cfg)
    if args.metrics:
        try:
            asyncio.run(run_dashboard(cfg, targets, args.interval, 1 if args.once else None))
        except KeyboardInterrupt:
            return 0
        except Exception as exc:
            print(f"arb monitor: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.tail is None and not (args.errors or args.search or args.since or args.follow or args.level):
        p.print_usage(sys.stderr)
        print("arb monitor: choose --metrics, or logs with --tail / --errors / --search / --since", file=sys.stderr)
        return 2
    return show_logs(args, cfg, targets)
