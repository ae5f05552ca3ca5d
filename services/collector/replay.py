"""Feeding recorded traffic through the same core the live collector runs.

``replay`` takes capture records (``shared.capture``) and drives a ``FeedCore`` exactly as
the live shell does: received frames go to ``on_frame``, recorded REST responses (book
snapshots, instrument lists) to ``on_rest``, a recorded reconnection to
``on_disconnected``; silence is checked against the recorded receive times. Outputs go to
``emit`` as they are produced. With ``speed`` set, records are paced by their receive
times (1.0 = as recorded); otherwise they run as fast as possible.

``ReplaySource`` plays captures of several exchanges as one timeline, for the collector's
replay mode and the backtest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from services.collector.core import FeedCore
from services.collector.venue import Fees, Get, RestRequest, SnapshotMsg, Venue, VenueOptions
from shared.capture import Record, read_captures
from shared.config import Config
from shared.models import BookSnapshot, BookStatus, Instrument, Message, TopOfBook, Trade

SILENCE_CHECK_NS = 100_000_000


def replay(
    core: FeedCore,
    records: Iterable[Record],
    emit: Callable[[list[Message]], None],
    *,
    speed: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``records`` through ``core``; returns the number of records used."""
    count = 0
    first_recorded = first_wall = 0.0
    next_check = 0
    connected = False
    for record in records:
        if speed is not None and record.recv_ns:
            if not first_recorded:
                first_recorded, first_wall = record.recv_ns, time.perf_counter()
            due = first_wall + (record.recv_ns - first_recorded) / 1e9 / speed
            delay = due - time.perf_counter()
            if delay > 0:
                sleep(delay)
        kind = record.kind
        if kind == "ws":
            core.on_frame(record.data, record.recv_ns)
        elif kind == "rest":
            core.on_rest(record.url, record.data, record.recv_ns)
        elif kind == "open":
            if connected:  # the recording reconnected: books are unknown until resynced
                core.on_disconnected(record.recv_ns, "reconnected")
            connected = True
            core.on_connected(record.recv_ns)
        else:
            continue
        if record.recv_ns and record.recv_ns >= next_check:
            core.check_silence(record.recv_ns)
            next_check = record.recv_ns + SILENCE_CHECK_NS
        if core.outputs:
            emit(core.take())
        core.actions.clear()  # a recording cannot answer requests: its snapshots arrive in-stream
        count += 1
    return count


# --------------------------------------------------------------------------- replay as a source


class ReplayError(ValueError):
    """A capture set that cannot be replayed (no instrument list, unknown exchange)."""


_SHIFTED_BOOK = (BookSnapshot, TopOfBook, Trade)


def shift_times(outputs: list[Message], delta_ns: int) -> None:
    """Move outputs by ``delta_ns``: every time they carry, so each keeps its recorded
    exchange-to-receive delay while its receive time becomes the time it was delivered."""
    for msg in outputs:
        if isinstance(msg, _SHIFTED_BOOK):
            msg.ts_recv_ns += delta_ns
            msg.ts_exchange_ns += delta_ns
        elif isinstance(msg, BookStatus):
            msg.ts_ns += delta_ns


class ReplaySource:
    """Captures of several exchanges played as one timeline, through each exchange's ``FeedCore``.

    This is the collector's replay mode (``collector.replay``) and the backtest's capture
    source: both drive the very same object, so they produce the very same messages.

    - Every capture file of an exchange is read; REST responses that are not book snapshots
      (instrument lists) answer the exchange module's own ``load_instruments``, exactly as
      the exchange's REST API would have; everything else forms the timeline, merged over
      exchanges by receive time.
    - The cores are strict, set up like the live feed's (instruments, tracked books), and
      run on the recorded receive times; silence is checked every 100 ms of recorded time.
    - ``feed(i, delivered_ns)`` moves the record's outputs to the time it was delivered
      (``shift_times``): a replay paced on the wall clock publishes current times (books are
      not stale, FX is fresh), and a backtest given the same delivery times sees the very
      same messages.
    """

    def __init__(self, cores: dict[str, FeedCore], natives: dict[str, list[str]],
                 instruments: dict[str, list[Instrument]], timeline: list[tuple[int, str, Record]]) -> None:
        self.cores = cores
        self.natives = natives
        self.instruments = instruments
        self.timeline = timeline
        self.origin_ns = timeline[0][0] if timeline else 0
        self.end_ns = timeline[-1][0] if timeline else 0
        self._next_check = 0
        self._connected: set[str] = set()

    def __len__(self) -> int:
        return len(self.timeline)

    @classmethod
    async def load(cls, captures: Mapping[str, Sequence[str | Path]], cfg: Config) -> ReplaySource:
        """Read ``captures`` (exchange -> files) for the books ``cfg`` enables on each exchange."""
        from services.collector.exchanges import VENUES, make_venue

        c = cfg.collector
        cores: dict[str, FeedCore] = {}
        natives: dict[str, list[str]] = {}
        instruments: dict[str, list[Instrument]] = {}
        merged: list[tuple[int, int, int, str, Record]] = []
        for n, (name, files) in enumerate(sorted(captures.items())):
            if name not in VENUES:
                raise ReplayError(f"no collector module for exchange {name!r}")
            ex = cfg.exchanges.get(name)
            venue = make_venue(name, VenueOptions(
                snapshot_depth=c.snapshot_depth, trades=c.trades, bbo=c.bbo, upbit_format=c.upbit_format,
                channel_depth=ex.book_depth, book_channel=ex.book_channel))
            records = read_captures(list(files))
            metadata = [r for r in records if r.kind == "rest" and not _is_book_snapshot(venue, r)]
            fees = Fees(Decimal(str(ex.taker_fee)), Decimal(str(ex.maker_fee)))
            try:
                found = await venue.load_instruments(_recorded_get(metadata), ex.symbols, fees)
            except LookupError as exc:
                raise ReplayError(f"{name}: the captures hold no instrument list ({exc})") from None
            wanted = [i for i in found if i.symbol in set(ex.symbols)]
            if not wanted:
                raise ReplayError(f"{name}: none of {', '.join(ex.symbols)} is in the recorded instrument list")
            core = FeedCore(venue, depth=c.depth, stale_after_ns=c.stale_after_ms * 1_000_000)
            core.set_instruments(found)
            cores[name] = core
            instruments[name] = found
            natives[name] = [i.native for i in wanted]
            skip = {id(r) for r in metadata}
            merged.extend((r.recv_ns, n, i, name, r) for i, r in enumerate(records)
                          if id(r) not in skip and r.kind != "sent")
        merged.sort(key=lambda t: (t[0], t[1], t[2]))
        return cls(cores, natives, instruments, [(t, name, r) for t, _, _, name, r in merged])

    def start(self, delivered_ns: int) -> list[Message]:
        """The books the replay expects, stale until their first sync (as a feed starts)."""
        out: list[Message] = []
        for name, core in self.cores.items():
            core.track(self.natives[name], self.origin_ns)
            out += core.take()
        shift_times(out, delivered_ns - self.origin_ns)
        return out

    def feed(self, i: int, delivered_ns: int) -> list[Message]:
        """Run record ``i`` through its exchange's core; its outputs at ``delivered_ns``."""
        recv_ns, name, record = self.timeline[i]
        core = self.cores[name]
        kind = record.kind
        if kind == "ws":
            core.on_frame(record.data, recv_ns)
        elif kind == "rest":
            core.on_rest(record.url, record.data, recv_ns)
        elif kind == "open":
            if name in self._connected:  # the recording reconnected: books are unknown until resynced
                core.on_disconnected(recv_ns, "reconnected")
            self._connected.add(name)
            core.on_connected(recv_ns)
        if core.actions:
            core.actions.clear()  # a recording cannot answer requests: its snapshots arrive in-stream
        out = core.outputs
        if out:
            core.outputs = []
        if recv_ns >= self._next_check:
            self._next_check = recv_ns + SILENCE_CHECK_NS
            for other in self.cores.values():
                other.check_silence(recv_ns)
                if other.outputs:
                    out += other.take()
        if delivered_ns != recv_ns and out:
            shift_times(out, delivered_ns - recv_ns)
        return out

    def finish(self, delivered_ns: int) -> list[Message]:
        """The recording ended: every book is unknown from now on."""
        out: list[Message] = []
        for core in self.cores.values():
            core.on_disconnected(self.end_ns, "replay_end")
            out += core.take()
        shift_times(out, delivered_ns - self.end_ns)
        return out


def _is_book_snapshot(venue: Venue, record: Record) -> bool:
    try:
        events = venue.decode_rest(record.url, record.data)
    except Exception:  # not a body this exchange module reads: metadata at most
        return False
    return any(isinstance(e, SnapshotMsg) for e in events)


def _recorded_get(records: Sequence[Record]) -> Get:
    """Answers REST requests from recorded responses: same path, recorded parameters a subset
    of the asked ones (the simulator's rule); a request nobody recorded raises ``LookupError``."""

    async def get(request: RestRequest) -> bytes:
        asked = set(request.params.items())
        for record in records:
            parts = urlsplit(record.url)
            if parts.path == request.path and set(parse_qsl(parts.query)) <= asked:
                return record.data
        raise LookupError(f"no recorded response to {request.path}")

    return get
