"""`make demo` (`arb demo`): the whole system trading in paper mode, in about a minute, offline.

1. The embedded stack, as `arb up` starts it: a private Redis, PostgreSQL and chDB under
   ``./var`` (or the servers named by ``REDIS_URL`` / ``DATABASE_URL`` / ``CLICKHOUSE_URL``),
   migrations applied.
2. The bundled scenario (``backtest/scenario.py``): Binance BTCUSDT as recorded, and a
   SYNTHETIC Upbit (KRW-BTC, KRW-USDT) generated from it.
3. The services as separate processes (collector, detector, risk, executor) in paper mode.
   The collector plays the scenario in replay mode at ``--speed`` times the recorded pace
   (346 s in about a minute), through the same decoding and book code as live.
4. A live view: books per venue, the premium, signals, decisions by reason, fills, PnL,
   balances. Then a summary whose PnL is ``SELECT sum(realised_pnl) FROM trades`` for the
   demo's session, and the stack is stopped: no process is left behind.

``--live`` does the same on the exchanges' public feeds instead of the recording (paper
trading, nothing is sent to an exchange); it first checks that the exchanges can be reached
and stops at once, saying so, when they cannot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

from backtest.runner import SCENARIO_CONFIG
from backtest.scenario import SYNTHETIC_NOTE, ScenarioParams, ensure

DEMO_SERVICES = ("collector", "detector", "risk", "executor")
MARKETS = (("binance", "BTC/USDT"), ("upbit", "BTC/KRW"), ("upbit", "USDT/KRW"))


# --------------------------------------------------------------------------- the view


class View:
    """Reads what the services wrote (Redis keys and streams, PostgreSQL) and draws it."""

    def __init__(self, cfg: Any, redis_url: str, database_url: str, session: str) -> None:
        import psycopg
        import redis

        from shared.streams import KeySpace

        self.cfg = cfg
        self.session = session
        self.redis = redis.Redis.from_url(redis_url)
        self.db = psycopg.connect(database_url, autocommit=True)
        self.keys = KeySpace(cfg.env, cfg.session)
        self.prefix = cfg.redis.stream_prefix
        self.decisions: Counter[str] = Counter()
        self._decisions_from = "0-0"
        self.started = time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.redis.close()
        with contextlib.suppress(Exception):
            self.db.close()

    def snapshot(self, collector: dict[str, Any]) -> dict[str, Any]:
        from shared.models import BookSnapshot, Decision, decode
        from shared.runtime.producer import FIELD

        books: dict[str, dict[str, Any]] = {}
        now = time.time_ns()
        for exchange, symbol in MARKETS:
            raw: Any = self.redis.get(self.keys.latest_book(exchange, symbol))
            if raw is None:
                continue
            book = decode(raw)
            if isinstance(book, BookSnapshot) and book.bids and book.asks:
                books[f"{exchange} {symbol}"] = {"bid": book.bids[0][0], "ask": book.asks[0][0],
                                                 "status": book.status, "age_ms": (now - book.ts_recv_ns) / 1e6}
        premium = None
        b, u, fx = (books.get("binance BTC/USDT"), books.get("upbit BTC/KRW"), books.get("upbit USDT/KRW"))
        if b and u and fx:
            mid = lambda x: (x["bid"] + x["ask"]) / 2  # noqa: E731
            premium = (mid(u) / mid(fx) / mid(b) - 1) * 1e4
        entries: Any = self.redis.xrange(self.prefix + "decisions", min=f"({self._decisions_from}", max="+",
                                         count=10_000) if self._decisions_from != "0-0" else \
            self.redis.xrange(self.prefix + "decisions", min="-", max="+", count=10_000)
        for entry_id, fields in entries:
            self._decisions_from = entry_id.decode()
            msg = decode(fields[FIELD])
            if isinstance(msg, Decision):
                self.decisions[msg.reason] += 1
        trades = self.db.execute(
            "SELECT count(*), coalesce(sum(realised_pnl), 0), coalesce(sum(fees), 0) FROM trades WHERE session = %s",
            (self.session,)).fetchone()
        statuses: dict[str, int] = dict(self.db.execute(
            "SELECT status, count(*) FROM trades WHERE session = %s GROUP BY status", (self.session,)).fetchall())
        fills = self.db.execute("SELECT count(*) FROM fills WHERE session = %s", (self.session,)).fetchone()
        balances = self.db.execute(
            "SELECT exchange, asset, free FROM balances WHERE session = %s AND mode = 'paper' ORDER BY 1, 2",
            (self.session,)).fetchall()
        assert trades is not None and fills is not None
        return {
            # every signal gets exactly one decision (the signals stream itself is trimmed once risk has read it)
            "elapsed_s": time.monotonic() - self.started, "books": books, "premium_bps": premium,
            "signals": sum(self.decisions.values()), "decisions": dict(self.decisions), "fills": int(fills[0]),
            "arbitrages": int(trades[0]), "statuses": statuses, "pnl": Decimal(trades[1]), "fees": Decimal(trades[2]),
            "balances": [(ex, asset, Decimal(free)) for ex, asset, free in balances],
            "replay": collector.get("replay"),
        }


def render(s: dict[str, Any], title: str, ref: str) -> str:
    lines = [title, ""]
    replay = s.get("replay")
    progress = f"  replay {replay['played']:,}/{replay['frames']:,} frames" if replay else ""
    lines.append(f"elapsed {s['elapsed_s']:5.1f} s{progress}")
    lines.append("")
    lines.append(f"{'book':<20}{'bid':>16}{'ask':>16}{'age ms':>9}  status")
    for name, b in s["books"].items():
        lines.append(f"{name:<20}{b['bid']:>16,.2f}{b['ask']:>16,.2f}{b['age_ms']:>9.0f}  {b['status']}")
    premium = s["premium_bps"]
    lines.append("")
    lines.append("premium (Upbit BTC/KRW over Binance BTC/USDT x USDT/KRW): "
                 + (f"{premium:+.1f} bps" if premium is not None else "-"))
    lines.append(f"signals {s['signals']:,}   decisions {s['decisions'] or '-'}")
    lines.append(f"arbitrages {s['arbitrages']:,} {s['statuses'] or ''}   fills {s['fills']:,}")
    lines.append(f"realised PnL {s['pnl']:.6f} {ref}   fees {s['fees']:.6f} {ref}")
    if s["balances"]:
        lines.append("balances: " + ", ".join(f"{ex} {asset} {free:,.8f}".rstrip("0").rstrip(".")
                                                for ex, asset, free in s["balances"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arb demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--live", action="store_true", help="the exchanges' live public feeds instead of the recording")
    p.add_argument("--speed", type=float, default=6.0, help="replay pace, times the recorded one (default 6)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of the recording to play (default: all 346 s)")
    p.add_argument("--seconds", type=float, default=60.0, help="--live: how long to run")
    p.add_argument("--no-view", action="store_true", help="progress lines instead of the live terminal view")
    p.add_argument("--config", default=str(SCENARIO_CONFIG))
    return p


def cmd_demo(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from shared.config import ConfigError, load_config
    from shared.launcher import Launcher, Stack, _alive, live_feeds_unreachable

    session = f"demo{time.strftime('%Y%m%d%H%M%S')}"
    env = {"ARB_CONFIG": args.config, "ARB_SESSION": session, "ARB_TRADING__MODE": "paper",
           "ARB_SERVICES__ENABLED": json.dumps(list(DEMO_SERVICES)),
           # one signal per route per second at most (the default 5 s is long at 6x the recorded pace)
           "ARB_DETECTOR__COOLDOWN_MS": os.environ.get("ARB_DETECTOR__COOLDOWN_MS", "1000")}
    scenario = None
    if not args.live:
        scenario = ensure(ScenarioParams(duration_s=args.duration), Path(load_var()) / "scenarios")
        env["ARB_COLLECTOR__REPLAY"] = json.dumps(scenario.captures)
        env["ARB_COLLECTOR__REPLAY_SPEED"] = repr(args.speed)
    os.environ.update(env)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.live and live_feeds_unreachable(cfg, "arb demo --live"):
        return 1
    var = Path(cfg.var_dir).resolve()
    running = Stack.read(var)
    if running is not None and _alive(running.launcher_pid):
        print(f"a stack is already running here (launcher pid {running.launcher_pid}): `arb down` first",
              file=sys.stderr)
        return 1
    title = ("arb demo: LIVE public feeds, paper trading" if args.live else
             f"arb demo: paper trading over the bundled scenario at {args.speed:g}x\n{SYNTHETIC_NOTE}")
    print(title, flush=True)
    launcher = Launcher(cfg, list(DEMO_SERVICES))
    stop = False

    def interrupt(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    started = time.monotonic()
    view: View | None = None
    summary: dict[str, Any] = {}
    code = 0
    try:
        urls = launcher.start_backends()
        launcher.start_services(urls)
        launcher.write_state(urls)
        view = View(cfg, urls["REDIS_URL"], urls["DATABASE_URL"], session)
        summary = _watch(launcher, view, cfg, args, title, scenario, lambda: stop)
    except Exception as exc:
        print(f"arb demo: {type(exc).__name__}: {exc} (service logs: {var / 'log'})", file=sys.stderr)
        code = 1
    finally:
        if view is not None:
            view.close()
        launcher.shutdown()
    if summary:
        _print_summary(summary, cfg, session, time.monotonic() - started, var, scenario)
        if summary.get("unreconciled"):
            code = 1
    return code


def load_var() -> str:
    from shared.config import load_config

    with contextlib.suppress(Exception):
        return load_config().var_dir
    return "./var"


def _collector_health(launcher: Any, cfg: Any, redis_url: str) -> dict[str, Any]:
    import urllib.request

    import redis

    from shared.models import Heartbeat, decode
    from shared.streams import KeySpace

    client = redis.Redis.from_url(redis_url)
    try:
        raw: Any = client.hgetall(KeySpace(cfg.env, cfg.session).heartbeats())
    finally:
        client.close()
    for value in (raw or {}).values():
        hb = decode(value)
        if isinstance(hb, Heartbeat) and hb.service == "collector" and hb.http_port:
            with contextlib.suppress(Exception), urllib.request.urlopen(
                    f"http://127.0.0.1:{hb.http_port}/health", timeout=1) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
    return {}


def _metrics_urls(cfg: Any, redis_url: str) -> dict[str, str]:
    import redis

    from shared.models import Heartbeat, decode
    from shared.streams import KeySpace

    client = redis.Redis.from_url(redis_url)
    try:
        raw: Any = client.hgetall(KeySpace(cfg.env, cfg.session).heartbeats())
    finally:
        client.close()
    out = {}
    for value in (raw or {}).values():
        hb = decode(value)
        if isinstance(hb, Heartbeat) and hb.http_port:
            out[hb.service] = f"http://127.0.0.1:{hb.http_port}/metrics"
    return dict(sorted(out.items()))


def _watch(launcher: Any, view: View, cfg: Any, args: argparse.Namespace, title: str, scenario: Any,
           stopped: Any) -> dict[str, Any]:
    redis_url = launcher.stack.redis_url
    tty = sys.stdout.isatty() and not args.no_view
    ref = cfg.trading.reference_currency
    deadline = time.monotonic() + (args.seconds if args.live else 120 + (scenario.duration_s / args.speed))
    last_line = 0.0
    metrics: dict[str, str] = {}
    done_at: float | None = None
    state: dict[str, Any] = {}
    while not stopped():
        for child in launcher.children:
            if not child.running():
                raise RuntimeError(f"{child.name} exited with {child.process.returncode if child.process else '?'}")
        health = _collector_health(launcher, cfg, redis_url)
        state = view.snapshot(health)
        if len(metrics) < len(DEMO_SERVICES):
            metrics = _metrics_urls(cfg, redis_url)
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J" + render(state, title, ref) + "\n")
            sys.stdout.flush()
        elif time.monotonic() - last_line >= 5:
            last_line = time.monotonic()
            replay = state.get("replay") or {}
            print(f"{state['elapsed_s']:5.1f} s  frames {replay.get('played', '-')}  signals {state['signals']}  "
                  f"arbitrages {state['arbitrages']}  PnL {state['pnl']:.6f} {ref}", flush=True)
        replay = state.get("replay") or {}
        finished = (not args.live and replay.get("done")) or (args.live and time.monotonic() >= deadline)
        if finished and done_at is None:
            done_at = time.monotonic()
        # After the last frame: let the arbitrages in flight finish (every approval has its trade row).
        if done_at is not None and (state["arbitrages"] >= state["decisions"].get("approved", 0)
                                    or time.monotonic() - done_at > 15):
            break
        if time.monotonic() > deadline + 30:
            raise RuntimeError("the replay did not finish in time")
        time.sleep(0.5)
    state = view.snapshot(_collector_health(launcher, cfg, redis_url))
    state["unreconciled"] = _reconcile(view, cfg.trading.reference_currency)
    state["metrics"] = metrics
    return state


def _reconcile(view: View, reference: str) -> list[str]:
    """Arbitrages whose stored PnL is not exactly what their stored fills and FX rates give."""
    from services.executor.ledger import FillRow
    from services.executor.pnl import realised_pnl

    rows = view.db.execute(
        "SELECT exchange, fill_id, client_order_id, arb_id, symbol, side, price, quantity, fee, fee_asset, liquidity, "
        "mode, 0 FROM fills WHERE session = %s", (view.session,)).fetchall()
    fills: dict[str, list[FillRow]] = {}
    for row in rows:
        fills.setdefault(row[3], []).append(FillRow(*row))
    bad = []
    for arb_id, pnl, rates in view.db.execute(
            "SELECT arb_id, realised_pnl, fx_rates FROM trades WHERE session = %s", (view.session,)).fetchall():
        fx = {k: Decimal(v) for k, v in rates.items() if k != "missing"}
        if realised_pnl(fills.get(arb_id, []), reference, fx, strict=False).realised != pnl:
            bad.append(arb_id)
    return bad


def _print_summary(s: dict[str, Any], cfg: Any, session: str, wall_s: float, var: Path, scenario: Any) -> None:
    ref = cfg.trading.reference_currency
    print()
    print(f"demo finished in {wall_s:.0f} s (session {session})")
    replay = s.get("replay") or {}
    if replay:
        print(f"  market data    {replay.get('played', 0):,} recorded frames replayed through the collector")
    print(f"  signals        {s['signals']:,}")
    print(f"  decisions      {dict(sorted(s['decisions'].items(), key=lambda kv: -kv[1]))}")
    print(f"  arbitrages     {s['arbitrages']:,} {s['statuses']}, fills {s['fills']:,}")
    print(f"  realised PnL   {s['pnl']} {ref} (after {s['fees']} {ref} fees)")
    print(f"                 = SELECT sum(realised_pnl) FROM trades WHERE session = '{session}'")
    if s.get("unreconciled"):
        print(f"  NOT RECONCILED with their fills: {s['unreconciled']}", file=sys.stderr)
    else:
        print("                 every arbitrage's PnL reconciles exactly with its fills, fees and FX rates")
    for ex, asset, free in s["balances"]:
        print(f"  balance        {ex:<8} {asset:<5} {free}")
    print()
    print("where to look next:")
    print("  make run / arb up       the same services on the live exchange feeds; then `arb status`,")
    print("                          `arb monitor --metrics`, `arb down`")
    print(f"  PostgreSQL (embedded under {var / 'pg'}, started by `arb up`): trades, fills, orders, order_events,")
    print(f"                          balances WHERE session = '{session}'")
    if scenario is not None:
        from shared.clickhouse import normalise_url

        print("  arb backtest            the same scenario through the backtest engine (report under var/backtest/)")
        print(f"  ClickHouse ticks        this demo's books and trades, in {normalise_url(cfg.clickhouse.url)}:")
        metadata = " ".join(f"--metadata {ex}={files[-1]}" for ex, files in sorted(scenario.captures.items()))
        print(f"    arb backtest --clickhouse --config {SCENARIO_CONFIG} {metadata}")
    for name, url in (s.get("metrics") or {}).items():
        print(f"  metrics while running   {name:<10} {url}")
