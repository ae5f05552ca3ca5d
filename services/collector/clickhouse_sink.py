"""Ticks to ClickHouse: book snapshots and trades (and the detector's route edges, read from the
``spreads`` stream) in column batches, written off the event loop.

``add_book``/``add_trade``/``add_spread`` append to in-memory columns (cheap, on the event loop). A batch
leaves when it reaches ``batch_rows`` or every ``flush_interval_s``; the insert runs in a
single worker thread so the WebSocket loop never waits on ClickHouse. If an insert fails
(server down, chDB locked, ...), the batch is written to the spill directory instead and
the metric ``arb_collector_clickhouse_spilled_bytes`` says how much waits there; after the
next successful insert the spilled batches are loaded oldest first and deleted. Nothing is
lost until the spill directory would exceed ``spill_max_bytes``; past that, batches are
dropped and counted.

One code path for both DSNs: ``chdb://`` (embedded; one process per data directory) and
``http(s)://`` (a ClickHouse server), through ``shared.clickhouse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from services.collector import metrics
from shared import clickhouse
from shared.models import BookSnapshot, SpreadSample, Trade

log = logging.getLogger(__name__)

BOOK_TABLE = "orderbook_snapshots"
TRADE_TABLE = "tick_trades"
SPREAD_TABLE = "spread_history"
BOOK_COLUMNS = ("exchange", "symbol", "seq", "status", "ts_exchange", "ts_recv", "ts_pub",
                "bid_prices", "bid_sizes", "ask_prices", "ask_sizes")
TRADE_COLUMNS = ("exchange", "symbol", "trade_id", "price", "size", "side", "ts_exchange", "ts_recv")
SPREAD_COLUMNS = ("asset", "strategy", "buy_exchange", "buy_symbol", "sell_exchange", "sell_symbol", "ts",
                  "gross_edge_bps", "net_edge_bps", "fx_rate", "notional")


class Batch(msgspec.Struct):
    table: str
    columns: list[str]
    data: list[list[Any]]
    """Column-oriented: ``data[i]`` holds the values of ``columns[i]``."""

    @property
    def rows(self) -> int:
        return len(self.data[0]) if self.data else 0


class SpillDir:
    """Batches waiting on local disk, oldest first; bounded in bytes."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._seq = itertools.count()
        self.path.mkdir(parents=True, exist_ok=True)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Batch)
        self.bytes = 0
        self.rows = 0
        for f in self.files():  # batches left by a previous run count too
            self.bytes += f.stat().st_size
            self.rows += self._decoder.decode(f.read_bytes()).rows
        self._report()

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.batch"))

    def write(self, batch: Batch) -> bool:
        blob = self._encoder.encode(batch)
        if self.bytes + len(blob) > self.max_bytes:
            return False
        name = f"{time.time_ns():020d}-{next(self._seq):06d}-{batch.table}.batch"
        tmp = self.path / (name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, self.path / name)  # a crash never leaves half a batch under a .batch name
        self.bytes += len(blob)
        self.rows += batch.rows
        self._report()
        return True

    def read(self, path: Path) -> Batch:
        return self._decoder.decode(path.read_bytes())

    def remove(self, path: Path, batch: Batch) -> None:
        self.bytes -= path.stat().st_size
        self.rows -= batch.rows
        path.unlink()
        self._report()

    def _report(self) -> None:
        metrics.CH_SPILLED_BYTES.set(self.bytes)
        metrics.CH_SPILLED_ROWS.set(self.rows)


class ClickHouseSink:
    def __init__(
        self,
        url: str,
        *,
        batch_rows: int = 5_000,
        flush_interval_s: float = 1.0,
        spill_dir: str | Path = "./var/spill",
        spill_max_bytes: int = 1 << 30,
        connect: Callable[[str], Any] | None = None,
    ) -> None:
        self.url = url
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.spill = SpillDir(spill_dir, spill_max_bytes)
        self._connect = connect or _connect
        self._client: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self._books: list[list[Any]] = [[] for _ in BOOK_COLUMNS]
        self._trades: list[list[Any]] = [[] for _ in TRADE_COLUMNS]
        self._spreads: list[list[Any]] = [[] for _ in SPREAD_COLUMNS]
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self.written = {BOOK_TABLE: 0, TRADE_TABLE: 0, SPREAD_TABLE: 0}
        self.last_error = ""

    # ------------------------------------------------------------------ input (event loop)

    def add_book(self, s: BookSnapshot) -> None:
        c = self._books
        c[0].append(s.exchange)
        c[1].append(s.symbol)
        c[2].append(s.seq)
        c[3].append(s.status)
        c[4].append(s.ts_exchange_ns)
        c[5].append(s.ts_recv_ns)
        c[6].append(s.ts_pub_ns)
        c[7].append([p for p, _ in s.bids])
        c[8].append([q for _, q in s.bids])
        c[9].append([p for p, _ in s.asks])
        c[10].append([q for _, q in s.asks])
        if len(c[0]) >= self.batch_rows:
            self._full.set()

    def add_trade(self, t: Trade) -> None:
        c = self._trades
        c[0].append(t.exchange)
        c[1].append(t.symbol)
        c[2].append(t.trade_id)
        c[3].append(t.price)
        c[4].append(t.size)
        c[5].append(t.side)
        c[6].append(t.ts_exchange_ns)
        c[7].append(t.ts_recv_ns)
        if len(c[0]) >= self.batch_rows:
            self._full.set()

    def add_spread(self, s: SpreadSample) -> None:
        c = self._spreads
        for column, value in zip(c, (s.asset, s.strategy, s.buy_exchange, s.buy_symbol, s.sell_exchange,
                                     s.sell_symbol, s.ts_ns, s.gross_edge_bps, s.net_edge_bps, s.fx_rate,
                                     s.notional), strict=True):
            column.append(value)
        if len(c[0]) >= self.batch_rows:
            self._full.set()

    @property
    def pending_rows(self) -> int:
        return len(self._books[0]) + len(self._trades[0]) + len(self._spreads[0])

    # ------------------------------------------------------------------ writing

    async def run(self) -> None:
        """Flush by size or time until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout=self.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; when it returns, every row added before is in ClickHouse or spilled."""
        async with self._flush_lock:
            self._full.clear()
            batches = []
            if self._books[0]:
                batches.append(Batch(BOOK_TABLE, list(BOOK_COLUMNS), self._books))
                self._books = [[] for _ in BOOK_COLUMNS]
            if self._trades[0]:
                batches.append(Batch(TRADE_TABLE, list(TRADE_COLUMNS), self._trades))
                self._trades = [[] for _ in TRADE_COLUMNS]
            if self._spreads[0]:
                batches.append(Batch(SPREAD_TABLE, list(SPREAD_COLUMNS), self._spreads))
                self._spreads = [[] for _ in SPREAD_COLUMNS]
            if batches or self.spill.rows:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._write, batches)

    async def close(self) -> None:
        await self.flush()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_client)
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ worker thread

    def _write(self, batches: list[Batch]) -> None:
        for i, batch in enumerate(batches):
            try:
                self._insert(batch)
            except Exception as exc:
                self._failed(exc)
                for rest in batches[i:]:
                    self._spill(rest)
                return
        self._load_spilled()

    def _insert(self, batch: Batch) -> None:
        if self._client is None:
            self._client = self._connect(self.url)
            clickhouse.ensure_schema(self._client)
        self._client.insert(batch.table, batch.data, column_names=batch.columns, column_oriented=True)
        self.written[batch.table] += batch.rows
        metrics.CH_ROWS.labels(batch.table).inc(batch.rows)

    def _load_spilled(self) -> None:
        for path in self.spill.files():
            try:
                batch = self.spill.read(path)
            except (OSError, msgspec.DecodeError) as exc:
                log.error("unreadable spill file set aside", extra={"file": str(path), "error": str(exc)})
                path.rename(path.with_suffix(".bad"))
                continue
            try:
                self._insert(batch)
            except Exception as exc:
                self._failed(exc)
                return
            self.spill.remove(path, batch)
            log.info("spilled batch loaded", extra={"table": batch.table, "rows": batch.rows})

    def _spill(self, batch: Batch) -> None:
        if not self.spill.write(batch):
            metrics.CH_DROPPED_ROWS.labels(batch.table).inc(batch.rows)
            log.error("spill directory full, batch dropped", extra={"table": batch.table, "rows": batch.rows,
                                                                    "spilled_bytes": self.spill.bytes})

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        metrics.CH_ERRORS.inc()
        log.warning("ClickHouse insert failed, spilling to disk", extra={"error": self.last_error})
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def health(self) -> dict[str, Any]:
        return {
            "written": dict(self.written),
            "pending_rows": self.pending_rows,
            "spilled_rows": self.spill.rows,
            "spilled_bytes": self.spill.bytes,
            "last_error": self.last_error,
        }


def _connect(url: str) -> Any:
    if url.startswith("chdb://"):
        return clickhouse.connect(url)
    return clickhouse.connect(url, connect_timeout=2, send_receive_timeout=30)
