"""The alerter's own metrics (bus metrics come from the shared runtime)."""

from __future__ import annotations

from prometheus_client import Counter

ALERTS_RECEIVED = Counter("arb_alerts_received_total", "Alerts read from the alerts stream", ["severity"])
ALERTS_SENT = Counter("arb_alerts_sent_total", "Alerts delivered by a sink", ["sink"])
ALERTS_SUPPRESSED = Counter(
    "arb_alerts_suppressed_total", "Alerts not sent: duplicate within the window, or below alerter.min_severity",
    ["sink", "reason"],
)
SEND_ERRORS = Counter("arb_alert_send_errors_total", "Failed attempts to deliver an alert", ["sink"])
RATE_LIMIT_WAIT = Counter(
    "arb_alert_rate_limit_wait_seconds_total", "Time spent waiting for the sink's rate limit", ["sink"]
)
