"""Prometheus metrics shared by every service (named by Prometheus conventions).

Service-specific metrics live next to their service; the ones here are about the bus and
the process, so that every dashboard panel about the pipeline works for every service.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 50 us to 10 s: hops on one host are sub-millisecond.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

MESSAGES_IN = Counter(
    "arb_stream_messages_in_total", "Messages read from a stream by a consumer group", ["stream", "group"]
)
MESSAGES_OUT = Counter("arb_stream_messages_out_total", "Messages written to a stream", ["stream"])
HANDLER_ERRORS = Counter(
    "arb_handler_errors_total", "Handler failures (the message stays pending and is retried)", ["stream", "group"]
)
DLQ_MESSAGES = Counter(
    "arb_dlq_messages_total", "Messages moved to dlq.<stream>", ["stream", "group", "reason"]
)
CLAIMED = Counter(
    "arb_stream_claimed_total", "Pending entries taken over from idle consumers (XAUTOCLAIM)", ["stream", "group"]
)
HOP_LATENCY = Histogram(
    "arb_hop_latency_seconds",
    "Publish-to-handle latency of one hop (message publish time to handler start)",
    ["stream", "group"],
    buckets=LATENCY_BUCKETS,
)
HANDLE_SECONDS = Histogram(
    "arb_handle_seconds", "Time spent in a handler per message", ["stream", "group"], buckets=LATENCY_BUCKETS
)
REDIS_RECONNECTS = Counter("arb_redis_reconnects_total", "Times a service lost and regained Redis", ["service"])
CONSUMER_LAG = Gauge(
    "arb_consumer_group_lag", "Entries in the stream not yet delivered to the group", ["stream", "group"]
)
CONSUMER_PENDING = Gauge(
    "arb_consumer_group_pending", "Entries delivered to the group but not yet acknowledged", ["stream", "group"]
)
SERVICE_UP = Gauge("arb_service_up", "1 while the service runs", ["service"])
SERVICE_START_TIME = Gauge("arb_service_start_time_seconds", "Unix time the service started", ["service"])
LEASES_HELD = Gauge("arb_leases_held", "Stream leases held by this replica", ["group"])
STREAM_LENGTH = Gauge("arb_stream_length", "Entries in a stream this service reads (XLEN)", ["stream"])
DLQ_LENGTH = Gauge("arb_dlq_length", "Entries in dlq.<stream>, by the stream they came from", ["stream"])
LOG_RECORDS = Counter("arb_log_records_total", "Log records at WARNING or above, by level", ["level"])
LOG_RECORDS_DROPPED = Counter(
    "arb_log_records_dropped_total", "WARNING+ log records not stored in PostgreSQL (queue full or database away)"
)
