"""The collector service: one ``Feed`` per enabled exchange, publishing to the bus, ticks to
ClickHouse, FX from the Upbit USDT book (and an optional reference). With ClickHouse on it
also stores the detector's route edges (``spreads`` stream, group ``clickhouse``) in
``spread_history``.

In replay mode (``collector.replay``: exchange -> capture files) the feeds are replaced by
one ``ReplaySource`` paced on the wall clock: the same cores, instruments loaded from the
recorded REST responses and stored as a feed stores them, and outputs moved to the time each
frame is played (``replay_speed``: the time it is due; ``replay_rate``: the time it is
handled), so books are current and FX is fresh for the detectors, risk and the executor.

It never stops because an exchange is unreachable: feeds retry with backoff and their
books are published stale; ``/health`` stays ``ok`` for the process and reports every
book's state (``books``), every feed's (``feeds``) and the tick store's (``clickhouse``).
This process is the one that opens an embedded chDB directory (chDB admits one process per
directory); against a ClickHouse server every collector writes directly.
"""

from __future__ import annotations

import asyncio
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
from services.collector.replay import ReplaySource
from services.collector.rest import RestClient
from services.collector.venue import Fees
from shared.config import Config
from shared.models import Instrument, Message, SpreadSample, decoder_for
from shared.runtime import Delivery, retry_redis
from shared.service import Service
from shared.streams import SPREADS, Domain, Group

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
            # The detector's route edges reach ClickHouse through the process that owns it (chDB
            # admits one); acknowledged once flushed, so a crash before the insert loses none.
            self.consumer(Group.CLICKHOUSE, [SPREADS], self.on_spread, decoder=decoder_for(SpreadSample).decode,
                          before_ack=self.ticks.flush)
        self.publisher = Publisher(
            self.producer, self.bus.keys,
            book_ttl_ms=c.latest_book_ttl_ms or Domain.BOOK.ttl_s * 1000,
            ticks=self.ticks,
        )
        self.fx = FxDesk(source_symbol=c.fx_source, max_divergence=c.fx_max_divergence)
        self.feeds: dict[str, Feed] = {}
        self.rests: list[RestClient] = []
        self.replay: ReplaySource | None = None
        self.replayed = 0
        self.replay_done = False
        self.replay_span = (0, 0)
        """Wall time the first and the latest frame were played (the achieved rate, for benchmarks)."""
        self._fx_on = "upbit" in (c.replay or cfg.exchanges.enabled())
        if c.replay:
            self.replay = await ReplaySource.load(c.replay, cfg)
            for instruments in self.replay.instruments.values():
                await self.store_instruments(instruments)
            self.background(self._play)
        for name in [] if c.replay else cfg.exchanges.enabled():
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

    async def _play(self) -> None:
        """Play the replay timeline: record i is due at ``start + (recv_i - recv_0) / speed`` (or
        ``start + i / rate``) and carries that time (the rate mode: the time it is handled)."""
        assert self.replay is not None
        c = self.cfg.collector
        source = self.replay
        start = c.replay_start_ns or time.time_ns() + 1_000_000_000
        rate_ns = 1e9 / c.replay_rate if c.replay_rate else 0.0
        origin = source.origin_ns
        log.info("replay starting", extra={"frames": len(source), "start_ns": start, "speed": c.replay_speed,
                                           "rate": c.replay_rate})
        due = start
        for i, (recv_ns, _, _) in enumerate(source.timeline):
            due = start + int(i * rate_ns) if rate_ns else start + int((recv_ns - origin) / c.replay_speed)
            wait = due - time.time_ns()
            if wait > 0:
                while wait > 0:  # the loop's timer may wake a little early: never play a frame before it is due
                    await asyncio.sleep(wait / 1e9)
                    wait = due - time.time_ns()
            elif i % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: still let the producer flush now and then
            if i == 0:
                self.emit(source.start(due))
            now = time.time_ns()
            outputs = source.feed(i, now if rate_ns else due)
            self.replayed = i + 1
            self.replay_span = (self.replay_span[0] or now, now)
            if outputs:
                self.emit(outputs)
        # Nothing arrives after the recording: its books go stale as the silence rule has it.
        end = due + c.stale_after_ms * 1_000_000
        await asyncio.sleep(max(0.0, (end - time.time_ns()) / 1e9))
        self.emit(source.finish(end))
        self.replay_done = True
        log.info("replay finished", extra={"frames": len(source)})
        while await self.sleep(60):  # a background task that returns would stop the service
            pass

    async def on_spread(self, delivery: Delivery) -> None:
        assert self.ticks is not None
        self.ticks.add_spread(delivery.message)

    def emit(self, outputs: list[Message]) -> None:
        fx = self.fx.on_outputs(outputs, time.time_ns()) if self._fx_on else []
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
        if self.replay is not None:
            now = time.time_ns()
            for name, core in self.replay.cores.items():
                doc["books"].update({f"{name}:{symbol}": book for symbol, book in core.health(now).items()})
            first, last = self.replay_span
            doc["replay"] = {"frames": len(self.replay), "played": self.replayed, "done": self.replay_done,
                             "frames_per_s": round((self.replayed - 1) / ((last - first) / 1e9), 1)
                             if last > first else None}
        doc["books_stale"] = sum(1 for b in doc["books"].values() if b["status"] != "synced")
        if self.ticks is not None:
            doc["clickhouse"] = self.ticks.health()
        return doc
