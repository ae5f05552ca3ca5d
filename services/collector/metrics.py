"""The collector's Prometheus metrics (bus and process metrics live in ``shared.metrics``)."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BookTimes = Callable[[], Iterable[tuple[str, str, int]]]

FRAMES = Counter("arb_collector_frames_total", "WebSocket frames received", ["exchange"])
MALFORMED = Counter(
    "arb_collector_malformed_total",
    "Frames or REST bodies rejected and skipped (decode error, wrong types, unknown symbol, crossed, ...)",
    ["exchange", "reason"],
)
RESYNCS = Counter(
    "arb_collector_resyncs_total", "Books that lost sync (gap, checksum, crossed, disconnect)", ["exchange", "reason"]
)
RECONNECTS = Counter("arb_collector_reconnects_total", "WebSocket sessions that ended", ["exchange", "reason"])
BOOK_STALE = Gauge("arb_collector_book_stale", "1 while a book is stale, 0 while synced", ["exchange", "symbol"])
RESYNC_SECONDS = Histogram(
    "arb_collector_resync_seconds",
    "Time from a book turning stale to synced again",
    ["exchange"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
REST_REQUESTS = Counter("arb_collector_rest_requests_total", "REST requests by outcome", ["exchange", "outcome"])
PUBLISH_DROPPED = Counter(
    "arb_collector_publish_dropped_total", "Market-data messages dropped because the bus buffer was full", ["kind"]
)
FX_RATE = Gauge("arb_collector_fx_rate", "Latest FX rate by pair and source", ["pair", "source"])
FX_DIVERGENCE = Gauge(
    "arb_collector_fx_divergence_ratio", "|USDT/KRW / USD/KRW - 1| between the two FX sources", ["pair_a", "pair_b"]
)
FX_ALERTS = Counter("arb_collector_fx_divergence_alerts_total", "FX divergence alerts raised")
CH_ROWS = Counter("arb_collector_clickhouse_rows_total", "Rows written to ClickHouse", ["table"])
CH_ERRORS = Counter("arb_collector_clickhouse_errors_total", "Failed ClickHouse inserts (batch spilled)")
CH_SPILLED_BYTES = Gauge("arb_collector_clickhouse_spilled_bytes", "Bytes of tick batches waiting on local disk")
CH_SPILLED_ROWS = Gauge("arb_collector_clickhouse_spilled_rows", "Rows of tick batches waiting on local disk")
CH_DROPPED_ROWS = Counter(
    "arb_collector_clickhouse_dropped_rows_total", "Rows lost because the spill directory reached its bound", ["table"]
)
BOOK_UPDATES = Counter("arb_collector_book_updates_total", "Book snapshots published (one per book change)",
                       ["exchange", "symbol"])


class BookAgeCollector(Collector):
    """``arb_collector_book_age_seconds``: seconds since each book last changed, computed when
    scraped (a gauge set on each update would read 0 forever on a feed that went quiet)."""

    def __init__(self) -> None:
        self._sources: list[weakref.WeakMethod[BookTimes]] = []

    def watch(self, source: BookTimes) -> None:
        """``source`` is a bound method returning (exchange, symbol, last change ns) per book."""
        self._sources.append(weakref.WeakMethod(source))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("arb_collector_book_age_seconds", "Seconds since the book last changed",
                                   labels=["exchange", "symbol"])
        now = time.time_ns()
        alive = []
        for ref in self._sources:
            source = ref()
            if source is None:
                continue
            alive.append(ref)
            for exchange, symbol, changed_ns in source():
                family.add_metric([exchange, symbol], max(0.0, (now - changed_ns) / 1e9))
        self._sources = alive
        yield family


BOOK_AGE = BookAgeCollector()
REGISTRY.register(BOOK_AGE)
