"""Risk metrics: one decisions counter labelled by reason (a series per guard), plus state gauges."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.risk.reasons import TRIGGERS
from shared.metrics import LATENCY_BUCKETS

DECISIONS = Counter("arb_risk_decisions_total", "Verdicts on signals, by reason (approved or the guard)",
                    ["reason"])
DECISION_SECONDS = Histogram("arb_risk_decision_seconds", "Time to decide one signal (checks and reservation)",
                             buckets=LATENCY_BUCKETS)
RESERVE_SECONDS = Histogram("arb_risk_reserve_seconds",
                            "Round trip of the atomic check-and-reserve of one consumer batch", buckets=LATENCY_BUCKETS)
INTERNAL_ERRORS = Counter("arb_risk_internal_errors_total", "Signals rejected because checking them failed")
GUARD_TRIGGERS = Counter("arb_risk_guard_triggers_total",
                         "Guard state changes (kill switch, circuit breaker, daily loss, drawdown)", ["guard"])
for _guard in TRIGGERS:  # a series per guard from the start: a dashboard shows 0, not "no data"
    GUARD_TRIGGERS.labels(_guard)
SETTLEMENTS = Counter("arb_risk_settlements_total", "Executions applied to the risk state", ["status"])
EXPIRED = Counter("arb_risk_reservations_expired_total", "Reservations released because no execution came")
SNAPSHOTS = Counter("arb_risk_snapshots_total", "Risk state snapshots to PostgreSQL", ["result"])
RESTORES = Counter("arb_risk_restores_total", "Risk state restored after Redis lost it")
RELOADS = Counter("arb_risk_config_reloads_total", "Risk limit reloads", ["result"])
BALANCE_UPDATES = Counter("arb_risk_balance_updates_total", "Balance reports", ["result"])

HALTED = Gauge("arb_risk_halted", "1 while the kill switch is set")
BREAKER_OPEN = Gauge("arb_risk_circuit_breaker_open", "1 while the circuit breaker halts approvals")
OPEN_ARBITRAGES = Gauge("arb_risk_open_arbitrages", "Approved arbitrages not yet released")
EXPOSURE = Gauge("arb_risk_exposure", "Reserved notional in the reference currency", ["scope", "name"])
DAILY_PNL = Gauge("arb_risk_daily_realised_pnl", "Realised PnL of the current trading day")
DAILY_LOSS_LIMIT = Gauge("arb_risk_daily_loss_limit", "risk.daily_loss_limit, as a positive amount")
EQUITY = Gauge("arb_risk_equity", "Starting equity plus realised PnL")
DRAWDOWN = Gauge("arb_risk_drawdown_ratio", "Drawdown from peak equity, as a fraction")
LOSS_STREAK = Gauge("arb_risk_loss_streak", "Losing arbitrages in a row")
