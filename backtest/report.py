"""A backtest's results: a JSON document, and an HTML page with PNG plots next to it."""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from backtest.engine import RunResult
from backtest.execution import Outcome
from backtest.metrics import Annualisation, drawdown, equity_curve, finite, sharpe, simple_returns, sortino

_S = 1_000_000_000


@dataclass(frozen=True)
class Curve:
    times: list[int]
    equity: list[Decimal]


def venue_pair(outcome: Outcome) -> str:
    """``buy venue -> sell venue`` of the entry legs (one venue for a triangle)."""
    legs = outcome.intent.legs
    buys = sorted({leg.exchange for leg in legs if leg.side == "buy"})
    sells = sorted({leg.exchange for leg in legs if leg.side == "sell"})
    if buys == sells:
        return "+".join(buys)
    return f"{'+'.join(buys)}->{'+'.join(sells)}"


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / _S, UTC).isoformat(timespec="milliseconds")


def _num(value: Decimal | float) -> float:
    return float(value)


def _group(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    group = list(outcomes)
    traded = [o for o in group if o.fills]
    pnl = sum((o.execution.realised_pnl for o in group), Decimal(0))
    fees = sum((o.execution.fees for o in group), Decimal(0))
    expected = [o.intent.expected_profit for o in traded]
    realised = [o.execution.realised_pnl for o in traded]
    exp_bps = [o.intent.expected_profit / o.intent.notional * 1e4 for o in traded if o.intent.notional > 0]
    real_bps = [float(o.execution.realised_pnl / o.execution.notional) * 1e4 for o in traded
                if o.execution.notional > 0]
    wins = sum(1 for o in traded if o.execution.realised_pnl > 0)
    return {
        "arbitrages": len(group),
        "with_fills": len(traded),
        "by_status": dict(Counter(o.execution.status for o in group)),
        "realised_pnl": _num(pnl),
        "fees": _num(fees),
        "win_rate": finite(wins / len(traded)) if traded else None,
        "avg_expected_profit": sum(expected) / len(expected) if expected else None,
        "avg_realised_profit": _num(sum(realised, Decimal(0)) / len(realised)) if realised else None,
        "avg_expected_edge_bps": sum(exp_bps) / len(exp_bps) if exp_bps else None,
        "avg_realised_edge_bps": sum(real_bps) / len(real_bps) if real_bps else None,
    }


def build(result: RunResult, *, reference: str, starting_equity: Decimal, period_s: float = 1.0,
          context: dict[str, Any] | None = None) -> tuple[dict[str, Any], Curve]:
    """The report document and the equity curve it was computed from."""
    outcomes = result.outcomes
    start = result.trade_from_ns or result.first_event_ns or result.start_ns
    end = max(result.last_event_ns, start + 1)
    ann = Annualisation(period_s)
    times, equity = equity_curve(((o.execution.ts_ns, o.execution.realised_pnl) for o in outcomes),
                                 starting_equity, start, end, int(period_s * _S))
    returns = simple_returns(equity)
    dd = drawdown(times, equity)
    stats = result.stats
    summary = _group(outcomes)
    by_strategy: dict[str, list[Outcome]] = defaultdict(list)
    by_pair: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_strategy[o.intent.strategy].append(o)
        by_pair[venue_pair(o)].append(o)
    doc: dict[str, Any] = {
        **(context or {}),
        "period": {"start": _iso(start), "end": _iso(end), "start_ns": start, "end_ns": end,
                   "duration_s": round((end - start) / _S, 3)},
        "activity": {
            "batches": stats.batches, "books": stats.books, "book_statuses": stats.statuses, "bbos": stats.bbos,
            "trades": stats.trades, "fx_rates": stats.fx_rates, "rejected_inputs": dict(stats.rejected_inputs),
            "signals": dict(stats.signals), "decisions": dict(stats.decisions), "intents": stats.intents,
            "fills": stats.fills, "wall_s": round(stats.wall_s, 3),
        },
        "pnl": {
            "currency": reference,
            "realised": summary["realised_pnl"],
            "fees": summary["fees"],
            "starting_equity": _num(starting_equity),
            "final_equity": _num(equity[-1]),
        },
        "metrics": {
            "arbitrages": summary["arbitrages"],
            "arbitrages_with_fills": summary["with_fills"],
            "by_status": summary["by_status"],
            "win_rate": summary["win_rate"],
            "sharpe": finite(sharpe(returns, ann.periods_per_year)),
            "sortino": finite(sortino(returns, ann.periods_per_year)),
            "annualisation": ann.describe(),
            "periods_per_year": ann.periods_per_year,
            "returns": len(returns),
            "max_drawdown": dd.max_drawdown,
            "max_drawdown_peak": _iso(dd.peak_ns) if dd.max_drawdown < 0 else None,
            "max_drawdown_trough": _iso(dd.trough_ns) if dd.max_drawdown < 0 else None,
            "max_drawdown_duration_s": round(dd.duration_ns / _S, 3),
            "max_drawdown_recovered": dd.recovered_ns is not None if dd.max_drawdown < 0 else None,
            "longest_underwater_s": round(dd.longest_underwater_ns / _S, 3),
            "avg_expected_profit": summary["avg_expected_profit"],
            "avg_realised_profit": summary["avg_realised_profit"],
            "avg_expected_edge_bps": summary["avg_expected_edge_bps"],
            "avg_realised_edge_bps": summary["avg_realised_edge_bps"],
            "fees_paid": summary["fees"],
        },
        "by_strategy": {k: _group(v) for k, v in sorted(by_strategy.items())},
        "by_venue_pair": {k: _group(v) for k, v in sorted(by_pair.items())},
        "balances": {
            "start": {f"{ex}:{asset}": str(v) for (ex, asset), v in sorted(result.starting_balances.items())},
            "end": {f"{ex}:{asset}": str(v) for (ex, asset), v in sorted(result.final_balances.items())},
        },
        "equity_curve": [[round((t - start) / _S, 3), _num(e)] for t, e in _thin(times, equity, 2000)],
    }
    return doc, Curve(times, equity)


def _thin(times: list[int], equity: list[Decimal], most: int) -> list[tuple[int, Decimal]]:
    pairs = list(zip(times, equity, strict=True))
    if len(pairs) <= most:
        return pairs
    step = len(pairs) / most
    picked = [pairs[int(i * step)] for i in range(most)]
    return [*picked, pairs[-1]]


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))


# --------------------------------------------------------------------------- HTML + PNG


def _plots(result: RunResult, curve: Curve, doc: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    start = curve.times[0]
    xs = [(t - start) / _S for t in curve.times]
    ys = [float(e) for e in curve.equity]
    peak = ys[0]
    under = []
    for y in ys:
        peak = max(peak, y)
        under.append((y - peak) / peak * 100)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 1])
    top.step(xs, ys, where="post", color="#1f77b4")
    top.set_ylabel(f"equity ({doc['pnl']['currency']})")
    top.set_title("Equity: starting equity + realised PnL")
    top.grid(alpha=0.3)
    bottom.fill_between(xs, under, 0, step="post", color="#d62728", alpha=0.5)
    bottom.set_ylabel("drawdown %")
    bottom.set_xlabel("seconds since start")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "equity.png", dpi=100)
    plt.close(fig)
    made.append(("equity.png", "Equity and drawdown"))

    traded = [o for o in result.outcomes if o.fills]
    if traded:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        pnls = [float(o.execution.realised_pnl) for o in traded]
        left.hist(pnls, bins=min(40, max(5, len(pnls) // 3)), color="#2ca02c")
        left.set_title("Realised PnL per arbitrage")
        left.set_xlabel(doc["pnl"]["currency"])
        right.scatter([o.intent.expected_profit for o in traded], pnls, s=10)
        lo = min(min(pnls), min(o.intent.expected_profit for o in traded))
        hi = max(max(pnls), max(o.intent.expected_profit for o in traded))
        right.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        right.set_title("Expected vs realised profit")
        right.set_xlabel("expected")
        right.set_ylabel("realised")
        fig.tight_layout()
        fig.savefig(out / "trades.png", dpi=100)
        plt.close(fig)
        made.append(("trades.png", "Arbitrages"))

    decisions = doc["activity"]["decisions"]
    if decisions:
        fig, ax = plt.subplots(figsize=(10, 3))
        names = sorted(decisions, key=decisions.get, reverse=True)
        ax.barh(names, [decisions[n] for n in names], color="#9467bd")
        ax.invert_yaxis()
        ax.set_title("Risk decisions by reason")
        fig.tight_layout()
        fig.savefig(out / "decisions.png", dpi=100)
        plt.close(fig)
        made.append(("decisions.png", "Decisions"))
    return made


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def _breakdown(title: str, groups: dict[str, Any]) -> str:
    if not groups:
        return ""
    cols = ["arbitrages", "with_fills", "realised_pnl", "fees", "win_rate", "avg_expected_edge_bps",
            "avg_realised_edge_bps"]
    head = "".join(f"<th>{c}</th>" for c in ["", *cols])
    body = "".join("<tr><th>" + html.escape(name) + "</th>" + "".join(f"<td>{html.escape(_fmt(g[c]))}</td>"
                                                                        for c in cols) + "</tr>"
                   for name, g in groups.items())
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def write_html(result: RunResult, curve: Curve, doc: dict[str, Any], out: Path) -> Path:
    """``report.html`` and its PNGs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(result, curve, doc, out)
    note = doc.get("note")
    banner = f'<p class="note">{html.escape(note)}</p>' if note else ""
    images = "".join(f'<h2>{html.escape(t)}</h2><img src="{html.escape(f)}" alt="{html.escape(t)}">'
                     for f, t in plots)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>arb backtest</title>
<style>body{{font-family:sans-serif;max-width:1050px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
.note{{background:#fff3cd;padding:0.6em;border:1px solid #e0c36a}}img{{max-width:100%}}</style></head>
<body><h1>Backtest report</h1>{banner}
<h2>Run</h2>{_table({k: doc[k] for k in ("source", "latency", "config") if k in doc})}
{_table(doc["period"])}
<h2>PnL</h2>{_table(doc["pnl"])}
<h2>Performance</h2>{_table(doc["metrics"])}
<h2>Activity</h2>{_table(doc["activity"])}
{_breakdown("By strategy", doc["by_strategy"])}
{_breakdown("By venue pair (buy -> sell)", doc["by_venue_pair"])}
{images}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
