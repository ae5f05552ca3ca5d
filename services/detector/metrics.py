"""The detector's own Prometheus metrics (the bus and process ones are in shared.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

SIGNALS = Counter("arb_detector_signals_total", "Signals published", ["strategy"])
REJECTED = Counter(
    "arb_detector_rejected_total",
    "Messages decoded but not usable (crossed or unsorted book, bad FX rate, bad instrument): counted and skipped",
    ["kind", "reason"],
)
UPDATE_SECONDS = Histogram(
    "arb_detector_update_seconds", "Core time per book update", ["strategy"], buckets=LATENCY_BUCKETS
)
TICK_TO_SIGNAL = Histogram(
    "arb_detector_tick_to_signal_seconds",
    "Collector receive time of the triggering book to the signal leaving the detector",
    ["strategy"],
    buckets=LATENCY_BUCKETS,
)
FX_AGE = Gauge("arb_detector_fx_age_seconds", "Age of the latest FX rate per pair when it arrived", ["pair"])
PREMIUM = Gauge(
    "arb_detector_premium_ratio",
    "A venue's mid in the reference currency over the median mid of the venues quoting it, minus one "
    "(the kimchi premium of a KRW venue)",
    ["asset", "exchange"],
)
SIGNAL_EDGE = Gauge("arb_detector_signal_edge_bps", "Net edge of the latest signal after fees, in basis points",
                    ["strategy", "asset"])
