"""Reason codes: every verdict carries exactly one of these (``Decision.reason``).

The stateless ones are decided by the core from the signal and market data alone; the
stateful ones are decided atomically against the shared state (``state.py``), in the order
listed here, so the first limit a signal breaks is the one it is rejected for.
"""

from __future__ import annotations

APPROVED = "approved"

# stateless: the signal and the market data it is checked against
INVALID = "invalid"
ERROR = "error"
"""Checking failed (a bug, or a state Redis cannot read): rejected, never approved, never fatal."""
STALE_SIGNAL = "stale_signal"
STALE_BOOK = "stale_book"
STALE_FX = "stale_fx"
MAX_NOTIONAL = "max_notional"
ANOMALY = "anomaly"

# stateful: checked and reserved atomically, in this order
HALTED = "halted"
CIRCUIT_BREAKER = "circuit_breaker"
DAILY_LOSS = "daily_loss"
DRAWDOWN = "drawdown"
COOLDOWN_SYMBOL = "cooldown_symbol"
COOLDOWN_VENUE = "cooldown_venue"
ORDER_RATE = "order_rate"
MAX_OPEN = "max_open"
EXPOSURE_TOTAL = "exposure_total"
EXPOSURE_COIN = "exposure_coin"
EXPOSURE_EXCHANGE = "exposure_exchange"
BALANCE = "balance"

STATELESS = frozenset({INVALID, ERROR, STALE_SIGNAL, STALE_BOOK, STALE_FX, MAX_NOTIONAL, ANOMALY})
STATEFUL = frozenset({
    HALTED, CIRCUIT_BREAKER, DAILY_LOSS, DRAWDOWN, COOLDOWN_SYMBOL, COOLDOWN_VENUE, ORDER_RATE,
    MAX_OPEN, EXPOSURE_TOTAL, EXPOSURE_COIN, EXPOSURE_EXCHANGE, BALANCE,
})
ALL = frozenset({APPROVED}) | STATELESS | STATEFUL

# Guard triggers: state transitions that halt or warn, each alerted once when it happens.
TRIGGER_KILL_SWITCH = "kill_switch"
TRIGGER_CIRCUIT_BREAKER = "circuit_breaker"
TRIGGER_DAILY_LOSS = "daily_loss"
TRIGGER_DRAWDOWN = "drawdown"
TRIGGERS = (TRIGGER_KILL_SWITCH, TRIGGER_CIRCUIT_BREAKER, TRIGGER_DAILY_LOSS, TRIGGER_DRAWDOWN)
