"""Prometheus metrics of the rebalancer."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PLANS = Counter("arb_rebalancer_plans_total", "Transfer plans recorded", ["reason", "state"])
PLANNING_ERRORS = Counter("arb_rebalancer_planning_errors_total", "Rounds refused for bad input (nothing planned)")
SHORTFALLS = Gauge("arb_rebalancer_shortfalls", "Venues below their low threshold that no route can restore")
TRANSFERS = Counter("arb_rebalancer_transfers_total", "Transfer state changes published, by asset and new state",
                    ["asset", "state"])
OPEN_TRANSFERS = Gauge("arb_rebalancer_open_transfers", "Transfers planned, awaiting approval, approved or sent")
IN_FLIGHT_VALUE = Gauge("arb_rebalancer_in_flight_value", "Value on its way to venues, in the reference currency")
ROUND_SECONDS = Histogram(
    "arb_rebalancer_round_seconds", "Duration of one rebalancing round",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
REFRESHES = Counter("arb_rebalancer_network_refresh_total", "Wallet endpoint reads", ["exchange", "outcome"])
