"""A readable view of the risk state, for `arb risk status`, /health and the gauges.

Built from the small parts of the state only (the counters hash, the kill switch, the
cooldowns, how many reservations), never from a full dump: the verdict store grows with
traffic and must not be read on a timer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.risk.limits import RiskLimits
from services.risk.units import to_float


@dataclass(frozen=True, slots=True)
class Overview:
    state: dict[str, str]
    halt: str | None
    cooldowns: dict[str, str]
    reservations: int


def summarize(o: Overview, limits: RiskLimits, now_ms: int) -> dict[str, Any]:
    s = o.state
    start = to_float(limits.starting_equity)
    equity = start + to_float(int(s.get("pnl:total", "0")))
    peak = start + to_float(int(s.get("pnl:peak", "0")))
    breaker_until = int(s.get("breaker:until", "0"))
    halt: Any = None
    if o.halt:
        try:
            halt = json.loads(o.halt)
        except ValueError:
            halt = {"reason": o.halt}
    return {
        "initialised": "init" in s,
        "version": int(s.get("ver", "0")),
        "halted": halt,
        "circuit_breaker_until_ms": breaker_until if breaker_until > now_ms else None,
        "open_arbitrages": int(s.get("open", "0")),
        "exposure": {
            "total": to_float(int(s.get("x:total", "0"))),
            "coins": {k[7:]: to_float(int(v)) for k, v in s.items() if k.startswith("x:coin:")},
            "exchanges": {k[5:]: to_float(int(v)) for k, v in s.items() if k.startswith("x:ex:")},
        },
        "reserved_balances": {k[3:]: to_float(int(v)) for k, v in s.items() if k.startswith("rb:")},
        "pnl": {
            "day": s.get("pnl:day"),
            "daily_realised": to_float(int(s.get("pnl:daily", "0"))),
            "total_realised": equity - start,
        },
        "equity": equity,
        "peak_equity": peak,
        "drawdown": (peak - equity) / peak if peak > 0 else 0.0,
        "loss_streak": int(s.get("loss:streak", "0")),
        "cooldowns": {k: int(v) for k, v in o.cooldowns.items() if int(v) > now_ms},
        "reservations": o.reservations,
        "reference_currency": limits.reference_currency,
    }
