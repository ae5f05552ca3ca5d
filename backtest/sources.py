"""Where a backtest's market data comes from: recorded captures or ClickHouse.

A source yields ``(time_ns, exchange, messages)`` batches in time order: what the collector
would have published at that time. Captures go through the collector's own
``ReplaySource`` (the exchange modules' decoding and book sync, several venues merged by
receive time); ClickHouse rows are the books and trades a collector already published.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.collector.replay import ReplaySource
from shared.config import Config
from shared.models import BookSnapshot, Instrument, Message, Trade

Batch = tuple[int, str, list[Message]]


class MarketSource(Protocol):
    exchanges: list[str]
    instruments: dict[str, list[Instrument]]
    start_ns: int
    end_ns: int

    def __len__(self) -> int: ...

    def batches(self) -> Iterator[Batch]: ...


class CaptureSource:
    """Captures (exchange -> files) replayed through the collector's cores.

    Times are the recorded receive times, or, with ``start_ns``/``speed``, the times a paced
    replay delivers them at (``start_ns + (recv - first) / speed``): how the collector's replay
    mode stamps them, so a backtest of the same files and pacing sees the same messages.
    """

    def __init__(self, replay: ReplaySource, *, start_ns: int | None = None, speed: float = 1.0,
                 silence_ns: int = 5_000_000_000) -> None:
        self.replay = replay
        self.exchanges = sorted(replay.cores)
        self.instruments = replay.instruments
        self.speed = speed
        self.origin_ns = replay.origin_ns
        self.start_ns = start_ns if start_ns is not None else replay.origin_ns
        self.silence_ns = silence_ns
        self.end_ns = self.at(replay.end_ns)

    @classmethod
    def load(cls, captures: Mapping[str, Sequence[str | Path]], cfg: Config, **options: Any) -> CaptureSource:
        replay = asyncio.run(ReplaySource.load(captures, cfg))
        return cls(replay, silence_ns=cfg.collector.stale_after_ms * 1_000_000, **options)

    def at(self, recv_ns: int) -> int:
        """When a record received at ``recv_ns`` is delivered."""
        if self.start_ns == self.origin_ns and self.speed == 1.0:
            return recv_ns
        return self.start_ns + int((recv_ns - self.origin_ns) / self.speed)

    def __len__(self) -> int:
        return len(self.replay)

    def batches(self) -> Iterator[Batch]:
        replay = self.replay
        feed = replay.feed
        timeline = replay.timeline
        yield self.start_ns, "", replay.start(self.start_ns)
        if self.start_ns == self.origin_ns and self.speed == 1.0:
            for i, (recv_ns, exchange, _) in enumerate(timeline):
                out = feed(i, recv_ns)
                if out:
                    yield recv_ns, exchange, out
        else:
            at = self.at
            for i, (recv_ns, exchange, _) in enumerate(timeline):
                t = at(recv_ns)
                out = feed(i, t)
                if out:
                    yield t, exchange, out
        # Nothing arrives after the recording: its books go stale as the silence rule would have it.
        end = self.end_ns + self.silence_ns
        yield end, "", replay.finish(end)


@dataclass(frozen=True)
class ClickHouseWindow:
    exchanges: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()
    start_ns: int = 0
    end_ns: int = 0
    """0 = no bound."""


class ClickHouseSource:
    """Books and trades from ``orderbook_snapshots`` / ``tick_trades``, merged by receive time.

    The tables hold what the collector published: synced snapshots (a book's stale periods are
    not stored, so they show only as an ageing book) and trades. Instruments are not stored
    either: they come from the capture metadata or the trading rules of the configuration.
    """

    def __init__(self, url: str, window: ClickHouseWindow, instruments: dict[str, list[Instrument]] | None = None,
                 *, chunk_rows: int = 50_000) -> None:
        from shared import clickhouse

        try:
            self.client = clickhouse.connect(url)
        except Exception as exc:
            if "lock" in str(exc).lower():  # chDB admits one process per data directory
                raise ValueError(f"{url} is in use by another process (a running collector owns an embedded "
                                 "chDB): stop the stack first, or backtest its recorded captures") from None
            raise
        clickhouse.ensure_schema(self.client)  # a store nothing was written to yet reads as empty, not as an error
        self.window = window
        self.instruments = instruments or {}
        self.chunk_rows = chunk_rows
        where, params = self._where()
        row = self.client.query(
            "SELECT count(), min(toUnixTimestamp64Nano(ts_recv)), max(toUnixTimestamp64Nano(ts_recv)), "
            f"groupUniqArray(exchange) FROM orderbook_snapshots {where}", parameters=params).result_rows[0]
        self.books, self.start_ns, self.end_ns = int(row[0]), int(row[1] or 0), int(row[2] or 0)
        self.exchanges = sorted(row[3])
        self.trades = int(self.client.query(f"SELECT count() FROM tick_trades {where}",
                                            parameters=params).result_rows[0][0])
        if not self.books:
            raise ValueError(f"no order books in {url} for that window (exchanges {list(window.exchanges) or 'all'})")

    def _where(self) -> tuple[str, dict[str, Any]]:
        w = self.window
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if w.exchanges:
            clauses.append("exchange IN {exchanges:Array(String)}")
            params["exchanges"] = list(w.exchanges)
        if w.symbols:
            clauses.append("symbol IN {symbols:Array(String)}")
            params["symbols"] = list(w.symbols)
        if w.start_ns:
            clauses.append("toUnixTimestamp64Nano(ts_recv) >= {start:Int64}")
            params["start"] = w.start_ns
        if w.end_ns:
            clauses.append("toUnixTimestamp64Nano(ts_recv) < {end:Int64}")
            params["end"] = w.end_ns
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    def __len__(self) -> int:
        return self.books + self.trades

    def _rows(self, sql: str, order: str) -> Iterator[Sequence[Any]]:
        where, params = self._where()
        offset = 0
        while True:
            rows = self.client.query(f"{sql} {where} ORDER BY ts_recv, exchange, symbol, {order} "
                                     f"LIMIT {self.chunk_rows} OFFSET {offset}", parameters=params).result_rows
            yield from rows
            if len(rows) < self.chunk_rows:
                return
            offset += len(rows)

    def _books(self) -> Iterator[tuple[int, int, BookSnapshot]]:
        sql = ("SELECT exchange, symbol, seq, status, toUnixTimestamp64Nano(ts_exchange), "
               "toUnixTimestamp64Nano(ts_recv), bid_prices, bid_sizes, ask_prices, ask_sizes FROM orderbook_snapshots")
        for ex, sym, seq, status, ts_ex, ts_recv, bp, bs, ap, as_ in self._rows(sql, "seq"):
            yield int(ts_recv), 0, BookSnapshot(
                exchange=ex, symbol=sym, seq=int(seq), bids=list(zip(bp, bs, strict=True)),
                asks=list(zip(ap, as_, strict=True)), ts_exchange_ns=int(ts_ex), ts_recv_ns=int(ts_recv),
                status="stale" if status == "stale" else "synced")

    def _trades(self) -> Iterator[tuple[int, int, Trade]]:
        sql = ("SELECT exchange, symbol, trade_id, price, size, side, toUnixTimestamp64Nano(ts_exchange), "
               "toUnixTimestamp64Nano(ts_recv) FROM tick_trades")
        for ex, sym, trade_id, price, size, side, ts_ex, ts_recv in self._rows(sql, "trade_id"):
            yield int(ts_recv), 1, Trade(exchange=ex, symbol=sym, trade_id=trade_id, price=price, size=size,
                                         side="sell" if side == "sell" else "buy", ts_exchange_ns=int(ts_ex),
                                         ts_recv_ns=int(ts_recv))

    def batches(self) -> Iterator[Batch]:
        merged: Iterator[tuple[int, int, BookSnapshot | Trade]] = heapq.merge(
            self._books(), self._trades(), key=lambda r: (r[0], r[1]))
        for t, _, msg in merged:
            yield t, msg.exchange, [msg]
