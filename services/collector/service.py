"""The collector service: one ``Feed`` per enabled exchange, publishing to the bus, ticks to
ClickHouse, FX from the Upbit USDT book (and an optional reference).

It never stops because an exchange is unreachable: feeds retry with backoff and their
books are published stale; ``/health`` stays ``ok`` for the process and reports every
book's state (``books``), every feed's (``feeds``) and the tick store's (``clickhouse``).
This process is the one that opens an embedded chDB directory (chDB admits one process per
directory); against a ClickHouse server every collector writes directly.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

import msgspec

from services.collector.clickhouse_sink import ClickHouseSink
from services.collector.core import FeedCore
from services.collector.exchanges import VENUES, make_venue, venue_options
from services.collector.feed import Feed
from services.collector.fx import FxDesk, ReferenceSource
from services.collector.publisher import Publisher
from services.collector.rest import RestClient
from services.collector.venue import Fees
from shared.config import Config
from shared.models import Instrument, Message
from shared.runtime import retry_redis
from shared.service import Service
from shared.streams import Domain

log = logging.getLogger(__name__)


class CollectorService(Service):
    name = "collector"

    async def setup(self) -> None:
        cfg: Config = self.cfg
        c = cfg.collector
        self.ticks: ClickHouseSink | None = None
        if cfg.clickhouse.enabled:
            self.ticks = ClickHouseSink(
                cfg.clickhouse.url,
                batch_rows=cfg.clickhouse.batch_rows,
                flush_interval_s=cfg.clickhouse.flush_interval_ms / 1000,
                spill_dir=cfg.clickhouse.spill_dir,
                spill_max_bytes=cfg.clickhouse.spill_max_bytes,
            )
            self.background(self.ticks.run)
        self.publisher = Publisher(
            self.producer, self.bus.keys,
            book_ttl_ms=c.latest_book_ttl_ms or Domain.BOOK.ttl_s * 1000,
            ticks=self.ticks,
        )
        self.fx = FxDesk(source_symbol=c.fx_source, max_divergence=c.fx_max_divergence)
        self.feeds: dict[str, Feed] = {}
        self.rests: list[RestClient] = []
        for name in cfg.exchanges.enabled():
            if name not in VENUES:
                log.warning("no collector module for this exchange yet", extra={"exchange": name})
                continue
            ex = cfg.exchanges.get(name)
            venue = make_venue(name, venue_options(name, c, ex, self.secrets))
            rest = RestClient(name, ex.rest_url or venue.rest_url, venue.rest_limit)
            self.rests.append(rest)
            feed = Feed(
                venue,
                FeedCore(venue, depth=c.depth, stale_after_ns=c.stale_after_ms * 1_000_000),
                rest,
                ws_url=ex.ws_url or venue.ws_url,
                symbols=ex.symbols,
                fees=Fees(Decimal(str(ex.taker_fee)), Decimal(str(ex.maker_fee))),
                emit=self.emit,
                on_instruments=self.store_instruments,
                reconnect_initial_s=c.reconnect_initial_ms / 1000,
                reconnect_max_s=c.reconnect_max_ms / 1000,
                silence_timeout_s=c.silence_timeout_ms / 1000,
            )
            self.feeds[name] = feed
            self.background(feed.run)
        if c.fx_reference_url:
            reference = ReferenceSource(c.fx_reference_url, c.fx_reference_field)

            async def poll_reference() -> None:
                await reference.poll(self.fx, self.publisher, c.fx_reference_interval_ms / 1000)

            self.background(poll_reference)

    def emit(self, outputs: list[Message]) -> None:
        fx = self.fx.on_outputs(outputs, time.time_ns()) if "upbit" in self.feeds else []
        self.publisher(outputs)
        if fx:
            self.publisher(fx)

    async def store_instruments(self, instruments: list[Instrument]) -> None:
        if not instruments:
            return
        key = self.bus.keys.instruments(instruments[0].exchange)
        mapping: dict[Any, Any] = {i.symbol: msgspec.json.encode(i) for i in instruments}
        await retry_redis(lambda: self.bus.redis.hset(key, mapping=mapping), stop=lambda: self.stopping)

    async def teardown(self) -> None:
        for feed in self.feeds.values():
            feed.stop()
        for rest in self.rests:
            await rest.close()
        if self.ticks is not None:
            await self.ticks.close()

    async def extra_health(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"feeds": {}, "books": {}}
        for name, feed in self.feeds.items():
            health = feed.health()
            doc["books"].update({f"{name}:{symbol}": book for symbol, book in health.pop("books").items()})
            doc["feeds"][name] = health
        doc["books_stale"] = sum(1 for b in doc["books"].values() if b["status"] != "synced")
        if self.ticks is not None:
            doc["clickhouse"] = self.ticks.health()
        return doc
