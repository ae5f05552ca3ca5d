"""From core outputs to the bus (and the tick store).

Each ``BookSnapshot``, ``Trade``, ``TopOfBook`` and ``BookStatus`` goes to ``md.<BASE>``
stamped with its publish time; a book snapshot also becomes the latest book of its
(exchange, symbol) (``SET ... PX ttl``, same pipeline as the XADD); a book turning stale
overwrites that key with the last snapshot marked stale, so a reader of the key never
takes a stale book for a live one. ``FxRate`` goes to ``fx`` and its latest key,
``Alert`` to ``alerts``. Book snapshots and trades are also handed to the ClickHouse sink.

Everything is buffered by the ``Producer`` and leaves in one pipeline per loop turn. When
Redis is unreachable for long enough to fill the producer's buffer, market data is
dropped (and counted) rather than stopping the collector: it would be stale anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol, cast

import msgspec

from services.collector import metrics
from shared import streams
from shared.models import Alert, BookSnapshot, BookStatus, FxRate, Message, TopOfBook, Trade, encode, split_symbol
from shared.runtime import Producer
from shared.streams import Domain, KeySpace

log = logging.getLogger(__name__)


class TickSink(Protocol):
    def add_book(self, snap: BookSnapshot) -> None: ...

    def add_trade(self, trade: Trade) -> None: ...


class Publisher:
    def __init__(
        self,
        producer: Producer,
        keys: KeySpace,
        *,
        book_ttl_ms: int = Domain.BOOK.ttl_s * 1000,
        fx_ttl_ms: int = Domain.STATE.ttl_s * 1000,
        ticks: TickSink | None = None,
    ) -> None:
        self.producer = producer
        self.keys = keys
        self.book_ttl_ms = book_ttl_ms
        self.fx_ttl_ms = fx_ttl_ms
        self.ticks = ticks
        self.last_books: dict[tuple[str, str], BookSnapshot] = {}
        self.published = 0
        self.dropped = 0
        self._streams: dict[str, str] = {}
        self._updates: dict[tuple[str, str], Any] = {}
        metrics.BOOK_AGE.watch(self.book_times)

    def book_times(self) -> list[tuple[str, str, int]]:
        """(exchange, symbol, receive time of the last change) of every book published."""
        return [(ex, sym, snap.ts_recv_ns) for (ex, sym), snap in self.last_books.items()]

    def _stream(self, symbol: str) -> str:
        stream = self._streams.get(symbol)
        if stream is None:
            stream = self._streams[symbol] = streams.md(split_symbol(symbol)[0])
        return stream

    def __call__(self, outputs: Iterable[Message]) -> None:
        now = time.time_ns()
        for msg in outputs:
            try:
                self._publish(msg, now)
            except ValueError:  # not a unified BASE/QUOTE symbol: nothing else can read it
                metrics.PUBLISH_DROPPED.labels(type(msg).__name__).inc()
                log.error("message without a unified symbol dropped", extra={"message": repr(msg)[:200]})
            except BufferError:
                metrics.PUBLISH_DROPPED.labels(type(msg).__name__).inc()
                if self.dropped % 10_000 == 0:
                    log.error("bus buffer full, dropping market data", extra={"buffered": self.producer.buffered})
                self.dropped += 1

    def _publish(self, msg: Message, now: int) -> None:
        producer = self.producer
        kind = type(msg)
        if kind is BookSnapshot:
            snap = cast(BookSnapshot, msg)
            snap.ts_pub_ns = now
            payload = encode(snap)
            producer.publish(self._stream(snap.symbol), payload)
            key = (snap.exchange, snap.symbol)
            self.last_books[key] = snap
            counter = self._updates.get(key)
            if counter is None:
                counter = self._updates[key] = metrics.BOOK_UPDATES.labels(*key)
            counter.inc()
            producer.set_key(self.keys.latest_book(snap.exchange, snap.symbol), payload, self.book_ttl_ms)
            if self.ticks is not None:
                self.ticks.add_book(snap)
        elif kind is Trade or kind is TopOfBook:
            tick = cast(Trade | TopOfBook, msg)
            tick.ts_pub_ns = now
            producer.publish(self._stream(tick.symbol), encode(tick))
            if kind is Trade and self.ticks is not None:
                self.ticks.add_trade(cast(Trade, tick))
        elif kind is BookStatus:
            status = cast(BookStatus, msg)
            producer.publish(self._stream(status.symbol), encode(status))
            last = self.last_books.get((status.exchange, status.symbol))
            if status.status == "stale" and last is not None and last.status == "synced":
                stale = msgspec.structs.replace(last, ts_pub_ns=now, status="stale")
                self.last_books[(status.exchange, status.symbol)] = stale
                producer.set_key(self.keys.latest_book(status.exchange, status.symbol), encode(stale),
                                 self.book_ttl_ms)
        elif kind is FxRate:
            fx = cast(FxRate, msg)
            fx.ts_pub_ns = now
            payload = encode(fx)
            producer.publish(streams.FX, payload)
            producer.set_key(self.keys.fx_latest(fx.pair), payload, self.fx_ttl_ms)
        elif kind is Alert:
            producer.publish(streams.ALERTS, encode(msg))
        else:
            return
        self.published += 1
