"""What an exchange module provides, and what it hands to the generic machinery.

An exchange module (``services/collector/exchanges/<name>.py``) subclasses ``Venue`` and
``BookSync`` and reads like that exchange's docs: URLs, subscribe messages, ping rule,
typed decoding, its book-sync rules and instrument metadata. Everything else -- the
connection, reconnects with backoff, REST rate limiting, resync execution, stale marking,
publishing, replay -- lives once in ``core.py``, ``feed.py`` and ``publisher.py`` and is
driven through this interface. Adding an exchange is one module plus its simulator module.

Decoding returns small events instead of bus messages: the core resolves native symbols to
unified ones and stamps times, so an exchange module never needs either. Events are frozen
msgspec Structs built positionally (a third of a NamedTuple's cost: one or more per frame),
untracked by the cyclic garbage collector (``gc=False``): they hold decoded values, never
themselves, so they cannot form a cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from services.collector.book import L2Book, new_book
from shared.models import Instrument, Side

# --------------------------------------------------------------------------- wire types

FINITE = 1e18
"""Larger than any price or size an exchange sends; keeps ``inf`` (which ``float()`` parses) out."""
Price = Annotated[float, Meta(gt=0, le=FINITE)]
Size = Annotated[float, Meta(ge=0, le=FINITE)]
"""A level's size: 0 removes the level."""
Level = tuple[Price, Size]

_json = msgspec.json.Decoder(msgspec.Raw)


def ensure_json(frame: bytes) -> None:
    """Validate a frame we are about to ignore (a channel we do not use): a broken frame is
    still a broken frame, and must be counted as one."""
    _json.decode(frame)


# --------------------------------------------------------------------------- errors


class Malformed(Exception):
    """A frame (or REST body) that breaks the exchange's format: counted and skipped.

    Raised before anything is applied to a book, so the book is untouched.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- events


class BookMsg(Struct, frozen=True, gc=False):
    """A book message for one native symbol; ``payload`` is the exchange's own typed struct."""

    native: str
    payload: Any


class SnapshotMsg(Struct, frozen=True, gc=False):
    """A REST book snapshot. ``native`` is None when the body does not name its symbol
    (Binance's depth body): the core gives it to the one book waiting for a snapshot."""

    native: str | None
    payload: Any


class TradeMsg(Struct, frozen=True, gc=False):
    native: str
    trade_id: str
    price: float
    size: float
    side: Side
    """The taker's side."""
    ts_exchange_ns: int


class BboMsg(Struct, frozen=True, gc=False):
    native: str
    seq: int
    bid: float
    bid_size: float
    ask: float
    ask_size: float
    ts_exchange_ns: int


class InstrumentsMsg(Struct, frozen=True, gc=False):
    """Instrument metadata found in a recorded REST response (replay learns symbols from it)."""

    instruments: list[Instrument]


Event = BookMsg | SnapshotMsg | TradeMsg | BboMsg | InstrumentsMsg

# --------------------------------------------------------------------------- book sync


class Outcome:
    """What a ``BookSync`` did with a message. The shared instances are compared by identity."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Outcome({self.reason})"


APPLIED = Outcome("applied")
"""The book changed: publish it."""
IGNORED = Outcome("ignored")
"""Nothing to do: an old or duplicate message, or an update before the first snapshot."""
ALIVE = Outcome("alive")
"""An exchange keep-alive proving the book is current but unchanged."""
BUFFERED = Outcome("buffered")
"""Kept until a REST snapshot arrives."""
NEED_SNAPSHOT = Outcome("need_snapshot")
"""Kept, and a REST snapshot is needed (first buffered diff, or the snapshot was too old)."""
UNTRUSTED = Outcome("untrusted")
"""The book changed, but the exchange gives no way to know it is complete and current (no
sync point, no sequence): it is published marked ``stale`` and never turns synced."""


def desync(reason: str) -> Outcome:
    """The book can no longer be trusted (gap, checksum, ...). The sync has reset itself."""
    return Outcome(reason)


class BookSync(ABC):
    """One symbol's book and the exchange's rules for keeping it in sync.

    ``on_message``/``on_snapshot`` apply the rules and return an ``Outcome``. On a desync
    the sync resets itself (keeping what the rules say to keep, e.g. a diff to buffer);
    ``reset`` is called by the core when the cause is outside the sync (disconnect,
    crossed book). ``seq`` and ``ts_exchange_ns`` describe the last applied change.
    """

    __slots__ = ("book", "seq", "synced", "ts_exchange_ns")

    def __init__(self, book: L2Book) -> None:
        self.book = book
        self.seq = 0
        self.synced = False
        self.ts_exchange_ns = 0

    @abstractmethod
    def on_message(self, payload: Any) -> Outcome: ...

    def on_snapshot(self, payload: Any) -> Outcome:
        raise Malformed("unexpected_snapshot", "this exchange has no REST snapshots")

    def reset(self) -> None:
        self.book.clear()
        self.synced = False

    @property
    def awaiting_snapshot(self) -> bool:
        """True while a REST snapshot is wanted (only REST-snapshot exchanges)."""
        return False



D = TypeVar("D")
"""A diff message of one exchange."""


class SnapshotDiffSync(BookSync, Generic[D]):
    """The REST-snapshot start most exchanges share: diffs are held from the first one on and
    a snapshot is asked for; the snapshot is taken only if it is not older than the first held
    diff (else asked again), and the held diffs after it are replayed over it."""

    __slots__ = ("buffer", "first_id", "max_buffer", "requested")

    def __init__(self, book: L2Book, max_buffer: int = 10_000) -> None:
        super().__init__(book)
        self.buffer: list[D] = []
        self.first_id: int | None = None
        """First update id of the first diff held since the last (re)start."""
        self.requested = False
        self.max_buffer = max_buffer

    def _hold(self, m: D, first_id: int) -> Outcome:
        """Keep a diff until the snapshot comes; the first one held asks for it."""
        if len(self.buffer) >= self.max_buffer:  # the snapshot is not coming: start over
            self.buffer.clear()
            self.first_id = None
        self.buffer.append(m)
        if self.first_id is None:
            self.first_id = first_id
        if not self.requested:
            self.requested = True
            return NEED_SNAPSHOT
        return BUFFERED

    def _take_held(self) -> list[D]:
        """The held diffs, and nothing held or asked for from now on."""
        held = self.buffer
        self.buffer, self.first_id, self.requested = [], None, False
        return held

    def _restart(self, m: D | None, first_id: int | None) -> None:
        """Out of sync: start over from ``m`` (if it is worth keeping); the core asks for the
        snapshot as part of the resync."""
        self.book.clear()
        self.synced = False
        self.buffer = [m] if m is not None else []
        self.first_id = first_id
        self.requested = True

    def reset(self) -> None:
        super().reset()
        self._take_held()

    @property
    def awaiting_snapshot(self) -> bool:
        return not self.synced and self.requested


# --------------------------------------------------------------------------- connection rules


Sign = Callable[[str, str], dict[str, str]]
"""``(method, path with query) -> headers``: signs a request at the moment it is sent."""


@dataclass(frozen=True, slots=True)
class RestRequest:
    path: str
    params: dict[str, str] = field(default_factory=dict)
    weight: int = 1
    """The exchange's request weight, charged to the REST rate limiter."""
    method: str = "GET"
    """KuCoin hands out its WebSocket token on ``POST /api/v1/bullet-public``."""
    sign: Sign | None = None
    """Private endpoints (KuCoin's full order book): headers computed when the request leaves,
    after any wait for the rate limiter, so the signed timestamp is fresh."""


@dataclass(frozen=True, slots=True)
class PingRule:
    """How to keep a connection alive: the exchange pings us, or we ping it."""

    interval_s: float | None = None
    """Send ``message`` (or a protocol ping frame when ``message`` is None) this often."""
    message: str | None = None


@dataclass(frozen=True, slots=True)
class RestLimit:
    """A REST weight budget: ``weight`` per ``per_s`` seconds (we use part of the exchange's)."""

    weight: int
    per_s: float


@dataclass(frozen=True, slots=True)
class Fees:
    """Fallback fees from configuration, for exchanges whose public REST does not give them."""

    taker: Decimal
    maker: Decimal


@dataclass(frozen=True, slots=True)
class Credentials:
    """An API key for the few market-data endpoints that need one (KuCoin's full L2 snapshot)."""

    key: str
    secret: str = field(repr=False)
    passphrase: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class VenueOptions:
    snapshot_depth: int = 1000
    """Levels asked of a REST snapshot (Binance: weight grows with it)."""
    trades: bool = True
    bbo: bool = True
    """Also subscribe to a faster best-bid/offer channel where the exchange has one."""
    upbit_format: Literal["DEFAULT", "SIMPLE"] = "SIMPLE"
    channel_depth: int = 0
    """Depth of the book channel where the exchange offers several (Bybit 1/50/200/1000); 0 = default."""
    book_channel: str = ""
    """Another book channel of the same protocol (OKX ``books-l2-tbt``, VIP only); "" = default."""
    credentials: Credentials | None = None
    """Read-only key for private market-data endpoints; None = public endpoints only."""


Resync = Literal["snapshot", "resubscribe", "none"]
Get = Callable[[RestRequest], Awaitable[bytes]]


class Venue(ABC):
    """One exchange's public market-data protocol."""

    name: ClassVar[str]
    ws_url: ClassVar[str]
    rest_url: ClassVar[str]
    ping: PingRule = PingRule()
    """May be set per connection (KuCoin's bullet answer names the ping interval)."""
    rest_limit: ClassVar[RestLimit] = RestLimit(weight=10, per_s=1.0)
    resync: Resync
    """How a lost book is recovered: a REST snapshot, a resubscription, or the next full snapshot
    (per instance: Gate's V2 channel resubscribes where its V1 channel fetches a snapshot)."""
    keep_strings: ClassVar[bool] = False
    """Books keep the original price/size strings (checksums over them)."""

    def __init__(self, options: VenueOptions | None = None) -> None:
        self.options = options or VenueOptions()

    # metadata --------------------------------------------------------------

    @abstractmethod
    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        """Instruments of the unified ``symbols`` (all markets when empty), from public REST."""

    # connection ------------------------------------------------------------

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base

    async def open_url(self, get: Get, base: str, natives: Sequence[str]) -> str:
        """The URL of the next connection. Exchanges that hand out a token and an endpoint
        over REST before each connection (KuCoin's bullet) override this, and may set
        ``self.ping`` from the answer; the others connect to ``connect_url``."""
        return self.connect_url(base, natives)

    @abstractmethod
    def subscribe(self, natives: Sequence[str]) -> list[str]:
        """Messages to send right after connecting."""

    def resubscribe(self, native: str) -> list[str]:
        """Messages that make the exchange send a fresh snapshot of one book."""
        return []

    # decoding --------------------------------------------------------------

    @abstractmethod
    def decode(self, frame: bytes) -> Sequence[Event]:
        """Events in one frame; raises ``Malformed`` (or a msgspec error) on bad input."""

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        """Events in a recorded REST response (snapshots, metadata); unknown ones give none."""
        return ()

    @abstractmethod
    def new_book(self, native: str) -> BookSync: ...

    def snapshot_request(self, native: str) -> RestRequest:
        raise NotImplementedError(f"{self.name} has no REST snapshots")

    def new_order_book(self) -> L2Book:
        return new_book(keep_strings=self.keep_strings)
