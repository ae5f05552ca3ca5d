"""The executor's Prometheus metrics (the bus and process ones are in shared.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

EXECUTIONS = Counter("arb_executor_executions_total", "Arbitrages finished, by strategy and status",
                     ["strategy", "status"])
FILLS = Counter("arb_executor_fills_total", "Fills stored", ["exchange", "symbol", "side", "mode"])
RESIDUALS = Counter("arb_executor_residuals_total", "Arbitrages that left residual exposure")
RETRIES = Counter("arb_executor_retries_total", "Intents retried in place (database or exchange down)", ["reason"])
INTENT_SECONDS = Histogram("arb_executor_intent_seconds", "Time to execute one intent, storage included",
                           buckets=LATENCY_BUCKETS)
ORDER_SECONDS = Histogram(
    "arb_executor_order_latency_seconds",
    "Order sent to the venue's answer (paper: the simulated order latency plus reading the book)",
    ["exchange"], buckets=LATENCY_BUCKETS,
)
REALISED_PNL = Gauge("arb_executor_realised_pnl",
                     "Realised PnL of the session in the reference currency, summed from the trades ledger")
BALANCE = Gauge("arb_executor_balance", "Balance (free + locked) per venue and asset", ["exchange", "asset", "mode"])
TRANSFERS = Counter("arb_executor_transfers_total", "Live transfer state changes published, by state", ["state"])
