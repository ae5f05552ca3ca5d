"""The collector's pure core: frames in, bus messages and resync requests out.

``FeedCore`` holds every book of one exchange connection. It is synchronous and
deterministic, reads no clock (each call carries ``recv_ns``/``now_ns``) and does no I/O:
the live shell (``feed.py``), ``arb replay``, the benchmark and the tests drive the very
same object. It

- decodes frames through the exchange module and counts every bad one (metric + ``stats``),
- lets the exchange's ``BookSync`` apply its rules and acts on the outcome: publish the
  top-N snapshot, or mark the book stale and ask for a resync (REST snapshot or
  resubscription, as the exchange requires),
- publishes books the exchange gives no way to verify (no sync point) marked stale only,
- rejects crossed books, marks books stale on disconnect and on silence, and
- emits ``BookStatus`` exactly when a book turns stale or synced.

Outputs accumulate in ``outputs`` and requested actions in ``actions``; callers drain both.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import msgspec

from services.collector import metrics
from services.collector.venue import (
    ALIVE,
    APPLIED,
    BUFFERED,
    IGNORED,
    NEED_SNAPSHOT,
    UNTRUSTED,
    BboMsg,
    BookMsg,
    BookSync,
    InstrumentsMsg,
    Malformed,
    Outcome,
    SnapshotMsg,
    TradeMsg,
    Venue,
)
from shared.models import BookSnapshot, BookState, BookStatus, Instrument, Message, TopOfBook, Trade

log = logging.getLogger(__name__)

SYNCED: BookState = "synced"
STALE: BookState = "stale"


class FetchSnapshot(NamedTuple):
    native: str


class Resubscribe(NamedTuple):
    native: str


Action = FetchSnapshot | Resubscribe


class BookEntry:
    """One book and what the core knows about it."""

    __slots__ = ("last_change_ns", "native", "reason", "stale_since_ns", "status", "symbol", "sync")

    def __init__(self, native: str, symbol: str, sync: BookSync) -> None:
        self.native = native
        self.symbol = symbol
        self.sync = sync
        self.status: BookState = STALE
        self.reason = "connecting"
        self.last_change_ns = 0
        self.stale_since_ns = 0


class FeedCore:
    def __init__(
        self,
        venue: Venue,
        *,
        depth: int = 20,
        stale_after_ns: int = 5_000_000_000,
        strict: bool = True,
    ) -> None:
        """``strict``: only books and symbols set up through ``set_instruments``/``track`` are
        accepted, anything else is counted as ``unknown_symbol``. Replay runs lenient:
        unknown native symbols get a book named by the native symbol."""
        self.venue = venue
        self.exchange = venue.name
        self.depth = depth
        self.stale_after_ns = stale_after_ns
        self.strict = strict
        self.symbols: dict[str, str] = {}
        self.instruments: dict[str, Instrument] = {}
        self.books: dict[str, BookEntry] = {}
        self.outputs: list[Message] = []
        self.actions: list[Action] = []
        self.stats: Counter[str] = Counter()
        self._malformed_counters: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup

    def set_instruments(self, instruments: Iterable[Instrument]) -> None:
        for ins in instruments:
            self.instruments[ins.native] = ins
            self.symbols[ins.native] = ins.symbol
            entry = self.books.get(ins.native)
            if entry is not None:
                entry.symbol = ins.symbol

    def track(self, natives: Sequence[str], now_ns: int) -> None:
        """Expect these books; they start stale until their first sync."""
        for native in natives:
            if native not in self.books:
                entry = self._new_entry(native)
                self.outputs.append(BookStatus(exchange=self.exchange, symbol=entry.symbol, status=STALE,
                                               reason="connecting", ts_ns=now_ns))

    def _new_entry(self, native: str) -> BookEntry:
        entry = BookEntry(native, self.symbols.get(native, native), self.venue.new_book(native))
        self.books[native] = entry
        metrics.BOOK_STALE.labels(self.exchange, entry.symbol).set(1)
        return entry

    def take(self) -> list[Message]:
        out, self.outputs = self.outputs, []
        return out

    def take_actions(self) -> list[Action]:
        out, self.actions = self.actions, []
        return out

    # ------------------------------------------------------------------ input

    def on_frame(self, frame: bytes, recv_ns: int) -> None:
        self.stats["frames"] += 1
        try:
            events = self.venue.decode(frame)
        except Malformed as exc:
            self._malformed(exc.reason)
            return
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._malformed("decode")
            return
        except Exception:  # a decoder bug must not take the feed down; count it loudly
            log.exception("decoder failed", extra={"exchange": self.exchange})
            self._malformed("decoder_error")
            return
        for event in events:
            if type(event) is BboMsg:  # most frames of a feed with a BBO channel: handled without a call
                symbol = self.symbols.get(event.native)
                if symbol is None:
                    symbol = self._symbol(event.native)
                if symbol is not None:
                    self.outputs.append(TopOfBook(
                        exchange=self.exchange, symbol=symbol, seq=event.seq, bid=event.bid,
                        bid_size=event.bid_size, ask=event.ask, ask_size=event.ask_size,
                        ts_exchange_ns=event.ts_exchange_ns or recv_ns, ts_recv_ns=recv_ns,
                    ))
            else:
                self._dispatch(event, recv_ns)

    def on_rest(self, url: str, body: bytes, recv_ns: int, native: str | None = None) -> None:
        """A REST response: a book snapshot we asked for, or (replay) recorded metadata."""
        try:
            events = self.venue.decode_rest(url, body)
        except Malformed as exc:
            self._malformed(exc.reason)
            return
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._malformed("decode")
            return
        for event in events:
            if native is not None and type(event) is SnapshotMsg and event.native is None:
                event = SnapshotMsg(native, event.payload)
            self._dispatch(event, recv_ns)

    def on_connected(self, now_ns: int) -> None:
        self.stats["connections"] += 1

    def on_disconnected(self, now_ns: int, reason: str = "disconnected") -> None:
        """Every book of the connection is unknown until resynced."""
        for entry in self.books.values():
            entry.sync.reset()
            self._stale(entry, reason, now_ns)

    def check_silence(self, now_ns: int) -> None:
        """Books with no change for ``stale_after_ns`` are marked stale (they resync on their next update)."""
        limit = now_ns - self.stale_after_ns
        for entry in self.books.values():
            if entry.status is SYNCED and entry.last_change_ns < limit:
                self._stale(entry, "silent", now_ns)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, event: Any, recv_ns: int) -> None:
        # Runs for every event of every frame: known symbols are looked up inline. (BBOs of frames
        # are handled in on_frame; this branch serves events of REST bodies.)
        kind = type(event)
        if kind is BboMsg:
            symbol = self.symbols.get(event.native)
            if symbol is None:
                symbol = self._symbol(event.native)
            if symbol is not None:
                self.outputs.append(TopOfBook(
                    exchange=self.exchange, symbol=symbol, seq=event.seq, bid=event.bid, bid_size=event.bid_size,
                    ask=event.ask, ask_size=event.ask_size, ts_exchange_ns=event.ts_exchange_ns or recv_ns,
                    ts_recv_ns=recv_ns,
                ))
        elif kind is BookMsg:
            entry = self.books.get(event.native) or self._unknown_book(event.native)
            if entry is not None:
                self._apply(entry, entry.sync.on_message, event.payload, recv_ns)
        elif kind is TradeMsg:
            symbol = self.symbols.get(event.native)
            if symbol is None:
                symbol = self._symbol(event.native)
            if symbol is not None:
                self.outputs.append(Trade(
                    exchange=self.exchange, symbol=symbol, trade_id=event.trade_id, price=event.price,
                    size=event.size, side=event.side, ts_exchange_ns=event.ts_exchange_ns, ts_recv_ns=recv_ns,
                ))
        elif kind is SnapshotMsg:
            entry = self._snapshot_owner(event.native)
            if entry is not None:
                self._apply(entry, entry.sync.on_snapshot, event.payload, recv_ns)
        elif kind is InstrumentsMsg:
            self.set_instruments(event.instruments)

    def _apply(self, entry: BookEntry, step: Any, payload: Any, recv_ns: int) -> None:
        try:
            outcome: Outcome = step(payload)
        except Malformed as exc:  # rejected before touching the book
            self._malformed(exc.reason)
            return
        except Exception:  # the book may be half-updated: throw it away and resync
            log.exception("book sync failed", extra={"exchange": self.exchange, "symbol": entry.symbol})
            self._malformed("invalid")
            entry.sync.reset()
            self._desync(entry, "invalid", recv_ns)
            return
        if outcome is APPLIED:
            sync = entry.sync
            if sync.book.crossed():
                self._malformed("crossed")
                sync.reset()
                self._desync(entry, "crossed", recv_ns)
                return
            entry.last_change_ns = recv_ns
            if entry.status is not SYNCED:
                self._synced(entry, recv_ns)
            bids, asks = sync.book.top(self.depth)
            self.outputs.append(BookSnapshot(
                exchange=self.exchange, symbol=entry.symbol, seq=sync.seq, bids=bids, asks=asks,
                ts_exchange_ns=sync.ts_exchange_ns or recv_ns, ts_recv_ns=recv_ns,
            ))
        elif outcome is IGNORED or outcome is BUFFERED:
            return
        elif outcome is UNTRUSTED:
            self._untrusted(entry, recv_ns)
        elif outcome is NEED_SNAPSHOT:
            self.actions.append(FetchSnapshot(entry.native))
        elif outcome is ALIVE:
            entry.last_change_ns = recv_ns
            if entry.status is not SYNCED and entry.sync.synced:
                self._synced(entry, recv_ns)
                bids, asks = entry.sync.book.top(self.depth)
                self.outputs.append(BookSnapshot(
                    exchange=self.exchange, symbol=entry.symbol, seq=entry.sync.seq, bids=bids, asks=asks,
                    ts_exchange_ns=entry.sync.ts_exchange_ns or recv_ns, ts_recv_ns=recv_ns,
                ))
        else:
            self._desync(entry, outcome.reason, recv_ns)

    def _untrusted(self, entry: BookEntry, recv_ns: int) -> None:
        """A book the exchange gives no way to verify: published, but only ever marked stale."""
        sync = entry.sync
        if sync.book.crossed():
            self._malformed("crossed")
            sync.reset()
            self._desync(entry, "crossed", recv_ns)
            return
        if entry.reason != "untrusted":  # say once why this book is never synced
            was_synced = entry.status is SYNCED
            entry.status = STALE
            entry.reason = "untrusted"
            if was_synced or not entry.stale_since_ns:
                entry.stale_since_ns = recv_ns
            metrics.BOOK_STALE.labels(self.exchange, entry.symbol).set(1)
            self.outputs.append(BookStatus(exchange=self.exchange, symbol=entry.symbol, status=STALE,
                                           reason="untrusted", seq=sync.seq, ts_ns=recv_ns))
        entry.last_change_ns = recv_ns
        bids, asks = sync.book.top(self.depth)
        self.outputs.append(BookSnapshot(
            exchange=self.exchange, symbol=entry.symbol, seq=sync.seq, bids=bids, asks=asks,
            ts_exchange_ns=sync.ts_exchange_ns or recv_ns, ts_recv_ns=recv_ns, status=STALE,
        ))

    # ------------------------------------------------------------------ state changes

    def _desync(self, entry: BookEntry, reason: str, now_ns: int) -> None:
        self.stats[f"resync:{reason}"] += 1
        metrics.RESYNCS.labels(self.exchange, reason).inc()
        self._stale(entry, reason, now_ns)
        resync = self.venue.resync
        if resync == "snapshot":
            self.actions.append(FetchSnapshot(entry.native))
        elif resync == "resubscribe":
            self.actions.append(Resubscribe(entry.native))

    def _stale(self, entry: BookEntry, reason: str, now_ns: int) -> None:
        if entry.status is STALE:
            return
        entry.status = STALE
        entry.reason = reason
        entry.stale_since_ns = now_ns
        metrics.BOOK_STALE.labels(self.exchange, entry.symbol).set(1)
        self.outputs.append(BookStatus(exchange=self.exchange, symbol=entry.symbol, status=STALE, reason=reason,
                                       seq=entry.sync.seq, ts_ns=now_ns))

    def _synced(self, entry: BookEntry, now_ns: int) -> None:
        previous = entry.reason
        entry.status = SYNCED
        entry.reason = ""
        metrics.BOOK_STALE.labels(self.exchange, entry.symbol).set(0)
        if entry.stale_since_ns:
            metrics.RESYNC_SECONDS.labels(self.exchange).observe((now_ns - entry.stale_since_ns) / 1e9)
        self.outputs.append(BookStatus(exchange=self.exchange, symbol=entry.symbol, status=SYNCED,
                                       reason=f"recovered from {previous}", seq=entry.sync.seq, ts_ns=now_ns))

    # ------------------------------------------------------------------ symbols

    def _symbol(self, native: str) -> str | None:
        symbol = self.symbols.get(native)
        if symbol is None:
            if self.strict:
                self._malformed("unknown_symbol")
                return None
            symbol = self.symbols[native] = native
        return symbol

    def _unknown_book(self, native: str) -> BookEntry | None:
        if self.strict:
            self._malformed("unknown_symbol")
            return None
        return self._new_entry(native)

    def _snapshot_owner(self, native: str | None) -> BookEntry | None:
        if native is not None:
            return self.books.get(native) or self._unknown_book(native)
        waiting = [e for e in self.books.values() if e.sync.awaiting_snapshot]
        if len(waiting) == 1:
            return waiting[0]
        if not waiting and len(self.books) == 1:
            return next(iter(self.books.values()))
        self._malformed("snapshot_without_symbol")
        return None

    def _malformed(self, reason: str) -> None:
        self.stats[f"malformed:{reason}"] += 1
        counter = self._malformed_counters.get(reason)
        if counter is None:
            counter = self._malformed_counters[reason] = metrics.MALFORMED.labels(self.exchange, reason)
        counter.inc()

    # ------------------------------------------------------------------ reporting

    @property
    def malformed(self) -> int:
        return sum(n for key, n in self.stats.items() if key.startswith("malformed:"))

    def health(self, now_ns: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for entry in self.books.values():
            age = (now_ns - entry.last_change_ns) / 1e9 if entry.last_change_ns else None
            out[entry.symbol] = {
                "status": entry.status,
                "reason": entry.reason,
                "seq": entry.sync.seq,
                "age_s": round(age, 3) if age is not None else None,
            }
        return out
