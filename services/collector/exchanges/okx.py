"""OKX spot (API v5): in-band book snapshot + updates, ``seqId``/``prevSeqId`` and CRC32.

Docs: okx.com/docs-v5 "WebSocket order book channel", "Connect", "Get instruments".

- Connect to ``wss://ws.okx.com:8443/ws/v5/public``; subscribe
  ``{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}``. Levels are
  ``[price, size, "0", orders]`` strings; pushes carry ``action`` (snapshot|update),
  ``checksum``, ``seqId``, ``prevSeqId`` and ``ts``.
- Book: a snapshot replaces the book. An update needs ``prevSeqId`` == the last
  ``seqId``; ``seqId == prevSeqId`` with no levels is a keep-alive; ``seqId < prevSeqId``
  is a sequence reset after maintenance (carry on); any other mismatch means lost updates.
  Size ``"0"`` deletes. (Captures made before OKX added ``seqId`` have only the checksum.)
- Checksum: for i in 0..24 take ``bid_px:bid_sz`` then ``ask_px:ask_sz`` when present,
  join with ``:``, CRC32 as a signed 32-bit int, over the strings exactly as received.
  A mismatch or a gap: unsubscribe and subscribe again for a fresh snapshot.
- Heartbeat: send text ``ping`` when idle (< 30 s); the server answers ``pong``.
- Instruments: ``GET /api/v5/public/instruments?instType=SPOT`` (``tickSz``, ``lotSz``,
  ``minSz``, ``baseCcy``/``quoteCcy``); fees are the configured fallback.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from decimal import Decimal
from itertools import chain
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Struct

from services.collector.book import OrderBook, ParsedLevel, parse_raw
from services.collector.venue import (
    ALIVE,
    APPLIED,
    IGNORED,
    BookMsg,
    BookSync,
    Event,
    Fees,
    Get,
    InstrumentsMsg,
    Malformed,
    Outcome,
    PingRule,
    RestLimit,
    RestRequest,
    TradeMsg,
    Venue,
    desync,
    ensure_json,
)
from shared.models import Instrument

log = logging.getLogger(__name__)

MS = 1_000_000
CHECKSUM_LEVELS = 25
BOOK_CHANNELS = frozenset({"books", "books-l2-tbt", "books50-l2-tbt"})

RawLevel = tuple[str, str, str, str]


class Arg(Struct):
    channel: str
    instId: str = ""


class BookData(Struct):
    asks: list[RawLevel]
    bids: list[RawLevel]
    ts: str
    checksum: int | None = None
    seqId: int | None = None
    prevSeqId: int | None = None


class BookPush(Struct):
    arg: Arg
    action: str
    data: list[BookData]


class TradeData(Struct):
    instId: str
    tradeId: str
    px: str
    sz: str
    side: str
    ts: str


class TradePush(Struct):
    arg: Arg
    data: list[TradeData]


class Envelope(Struct):
    """Any push or event; ``data`` left undecoded until the channel is known."""

    arg: Arg | None = None
    event: str | None = None
    code: str | None = None
    msg: str | None = None


_books = msgspec.json.Decoder(BookPush)
_trades = msgspec.json.Decoder(TradePush)
_envelope = msgspec.json.Decoder(Envelope)
_any = msgspec.json.Decoder(dict[str, Any])

CHANNEL_PREFIX = b'{"arg":{"channel":"'


def checksum(book: OrderBook) -> int:
    """OKX's CRC32 over the top 25 levels of each side, interleaved bid/ask, as a signed int32
    (Bitget's is the same)."""
    bids = book.bids.top_raw(CHECKSUM_LEVELS)
    asks = book.asks.top_raw(CHECKSUM_LEVELS)
    n = min(len(bids), len(asks))
    levels = [level for pair in zip(bids, asks, strict=False) for level in pair]  # bid 1, ask 1, bid 2, ...
    levels += bids[n:] or asks[n:]  # the longer side goes on alone
    crc = zlib.crc32(":".join(chain.from_iterable(levels)).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def parsed(levels: Sequence[Sequence[str]]) -> list[ParsedLevel]:
    """The levels read and checked once, before the book is touched."""
    try:
        return parse_raw(levels)
    except ValueError as exc:
        raise Malformed("bad_level", str(exc)[:100]) from None


class OkxBook(BookSync):
    __slots__ = ("seq_id",)
    book: OrderBook
    """The checksum covers the exchange's strings: only the reference book keeps them."""

    def __init__(self, book: OrderBook) -> None:
        super().__init__(book)
        self.seq_id: int | None = None

    def on_message(self, m: tuple[str, BookData]) -> Outcome:
        action, d = m
        try:
            ts = int(d.ts)
        except ValueError:
            raise Malformed("bad_number", d.ts) from None
        bids, asks = parsed(d.bids), parsed(d.asks)
        if action == "snapshot":
            self.book.replace_parsed(bids, asks)
            self.synced = True
        elif action == "update":
            if not self.synced:
                return IGNORED  # waiting for the snapshot of a (re)subscription
            if d.seqId is not None and d.prevSeqId is not None and self.seq_id is not None:
                if d.seqId == d.prevSeqId and not d.bids and not d.asks:
                    return ALIVE
                if d.prevSeqId != self.seq_id and not d.seqId < d.prevSeqId:
                    self.reset()
                    return desync("gap")
            self.book.apply_parsed(bids, asks)
        else:
            raise Malformed("unknown_action", action)
        self.seq_id = d.seqId
        self.seq = d.seqId if d.seqId is not None else ts
        self.ts_exchange_ns = ts * MS
        if d.checksum is not None and checksum(self.book) != d.checksum:
            self.reset()
            return desync("checksum")
        return APPLIED

    def reset(self) -> None:
        super().reset()
        self.seq_id = None


def parse_instruments(body: bytes, fees: Fees) -> list[Instrument]:
    doc = _any.decode(body)
    if doc.get("code") not in ("0", 0, None):
        raise Malformed("exchange_error", str(doc.get("msg", ""))[:200])
    out: list[Instrument] = []
    for d in doc.get("data", ()):
        if d.get("instType") != "SPOT" or not d.get("baseCcy") or not d.get("quoteCcy"):
            continue
        try:
            out.append(Instrument(
                exchange="okx",
                symbol=f"{d['baseCcy']}/{d['quoteCcy']}",
                native=d["instId"],
                base=d["baseCcy"],
                quote=d["quoteCcy"],
                tick_size=Decimal(d["tickSz"]).normalize(),
                lot_size=Decimal(d["lotSz"]).normalize(),
                min_qty=Decimal(d.get("minSz") or "0").normalize(),
                taker_fee=fees.taker,
                maker_fee=fees.maker,
            ))
        except (KeyError, ArithmeticError) as exc:
            log.warning("skipping malformed instrument", extra={"instId": d.get("instId"), "error": str(exc)})
    return out


class Okx(Venue):
    name = "okx"
    ws_url = "wss://ws.okx.com:8443"
    rest_url = "https://www.okx.com"
    ping = PingRule(interval_s=20.0, message="ping")
    rest_limit = RestLimit(weight=10, per_s=2.0)
    resync = "resubscribe"
    keep_strings = True
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.001"), Decimal("0.0008"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/api/v5/public/instruments", {"instType": "SPOT"}))
        wanted = set(symbols)
        return [i for i in parse_instruments(body, fees) if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/ws/v5/public"

    def _args(self, natives: Sequence[str], channels: Sequence[str]) -> str:
        args = [{"channel": ch, "instId": n} for n in natives for ch in channels]
        return msgspec.json.encode(args).decode()

    @property
    def book_channel(self) -> str:
        return self.options.book_channel or "books"

    def _channels(self) -> list[str]:
        return [self.book_channel, "trades"] if self.options.trades else [self.book_channel]

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        return [f'{{"op":"subscribe","args":{self._args(natives, self._channels())}}}']

    def resubscribe(self, native: str) -> list[str]:
        args = self._args([native], [self.book_channel])
        return [f'{{"op":"unsubscribe","args":{args}}}', f'{{"op":"subscribe","args":{args}}}']

    def new_book(self, native: str) -> BookSync:
        return OkxBook(OrderBook(keep_strings=True))

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame == b"pong":
            return ()
        channel = b""
        if frame.startswith(CHANNEL_PREFIX):
            channel = frame[len(CHANNEL_PREFIX):frame.find(b'"', len(CHANNEL_PREFIX))]
        else:
            env = _envelope.decode(frame)
            if env.event is not None:
                if env.event == "error":
                    raise Malformed("exchange_error", f"{env.code} {env.msg}")
                return ()  # subscribe / unsubscribe acknowledgements
            if env.arg is None:
                raise Malformed("unknown_message")
            channel = env.arg.channel.encode()
        name = channel.decode()
        if name in BOOK_CHANNELS:
            push = _books.decode(frame)
            if not push.data:
                raise Malformed("empty_data")
            return [BookMsg(push.arg.instId, (push.action, d)) for d in push.data]
        if name == "trades":
            return [self._trade(t) for t in _trades.decode(frame).data]
        ensure_json(frame)
        return ()  # tickers and other channels

    @staticmethod
    def _trade(t: TradeData) -> TradeMsg:
        if t.side not in ("buy", "sell"):
            raise Malformed("bad_side", t.side)
        try:
            price, size, ts = float(t.px), float(t.sz), int(t.ts)
        except ValueError:
            raise Malformed("bad_number", f"{t.px} {t.sz} {t.ts}") from None
        if not (price > 0 and size > 0):
            raise Malformed("bad_level", f"{t.px} {t.sz}")
        return TradeMsg(t.instId, t.tradeId, price, size, "buy" if t.side == "buy" else "sell", ts * MS)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        parts = urlsplit(url)
        if parts.path.endswith("/public/instruments") and parse_qs(parts.query).get("instType") == ["SPOT"]:
            return (InstrumentsMsg(parse_instruments(body, self.DEFAULT_FEES)),)
        return ()
