"""Binance spot: combined-stream WebSocket, L2 book from a REST snapshot plus ``U``/``u`` diffs.

Docs: binance-spot-api-docs ``web-socket-streams.md`` ("How to manage a local order book
correctly"), ``rest-api.md``, ``filters.md``.

- Connect to ``wss://stream.binance.com:9443/stream`` and send
  ``{"method":"SUBSCRIBE","params":["btcusdt@depth@100ms",...],"id":1}``; frames arrive as
  ``{"stream":"<name>","data":{...}}``. The server pings every 20 s; the WebSocket library
  answers with the same payload.
- Book: buffer ``depthUpdate`` diffs, note the first ``U``; get
  ``GET /api/v3/depth?symbol=X&limit=1000``; if ``lastUpdateId`` < that ``U`` get it
  again; drop buffered diffs with ``u <= lastUpdateId``; then for each diff: ignore
  ``u <= local``, a gap when ``U > local + 1`` (start over), else apply (absolute sizes,
  0 deletes) and ``local = u``.
- ``bookTicker`` is the faster best bid/offer: published as ``TopOfBook``, never mixed into
  the L2 book, so the L2 book stays checkable against the documented rules.
- Instruments from ``GET /api/v3/exchangeInfo`` filters; fees are the configured fallback
  (the account's commission endpoint needs a key).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Struct

from services.collector.venue import (
    APPLIED,
    IGNORED,
    NEED_SNAPSHOT,
    BboMsg,
    BookMsg,
    BookSync,
    Event,
    Fees,
    Get,
    InstrumentsMsg,
    Level,
    Malformed,
    Outcome,
    Price,
    RestLimit,
    RestRequest,
    Size,
    SnapshotDiffSync,
    SnapshotMsg,
    TradeMsg,
    Venue,
    desync,
    ensure_json,
)
from shared.models import Instrument

log = logging.getLogger(__name__)


MS = 1_000_000


# Decoded frames hold strings, numbers and lists of them, never a cycle: ``gc=False`` spares the
# cyclic collector from tracking the several objects every frame makes.


class DepthUpdate(Struct, gc=False):
    E: int
    s: str
    U: int
    u: int
    b: list[Level]
    a: list[Level]


class DepthSnapshot(Struct, gc=False):
    lastUpdateId: int
    bids: list[Level]
    asks: list[Level]


class TradeData(Struct, gc=False):
    s: str
    p: Price
    q: Size
    T: int
    m: bool
    """The buyer is the maker, so the taker sold."""
    t: int | None = None
    a: int | None = None
    """``aggTrade`` carries an aggregate id instead of ``t``."""


class BookTicker(Struct, gc=False):
    u: int
    s: str
    b: Price
    B: Size
    a: Price
    A: Size


class DepthFrame(Struct, gc=False):
    stream: str
    data: DepthUpdate


class TradeFrame(Struct, gc=False):
    stream: str
    data: TradeData


class BookTickerFrame(Struct, gc=False):
    stream: str
    data: BookTicker


# Prices and sizes are strings on the wire: ``strict=False`` lets msgspec turn them into
# floats in C while decoding, instead of a Python float() per level afterwards.
_depth_frame = msgspec.json.Decoder(DepthFrame, strict=False)
_trade_frame = msgspec.json.Decoder(TradeFrame, strict=False)
_ticker_frame = msgspec.json.Decoder(BookTickerFrame, strict=False)
_snapshot = msgspec.json.Decoder(DepthSnapshot, strict=False)
_any = msgspec.json.Decoder(dict[str, Any])

STREAM_PREFIX = b'{"stream":"'
_START = len(STREAM_PREFIX)
DEPTH, TRADE, TICKER, UNUSED, UNNAMED = range(5)
_routes: dict[bytes, int] = {}
"""Stream name -> what its frames are: a few names per connection, classified once each."""
_MAX_ROUTES = 4096


def _route(name: bytes) -> int:
    at = name.find(b"@")
    if at < 0:
        return UNNAMED
    kind = name[at + 1:]
    if kind == b"depth" or kind.startswith(b"depth@"):
        return DEPTH
    if kind == b"trade" or kind == b"aggTrade":
        return TRADE
    if kind == b"bookTicker":
        return TICKER
    return UNUSED


class BinanceBook(SnapshotDiffSync[DepthUpdate]):
    __slots__ = ()

    def on_message(self, m: DepthUpdate) -> Outcome:
        if self.synced:
            return self._update(m)
        return self._hold(m, m.U)

    def _update(self, m: DepthUpdate) -> Outcome:
        if m.u <= self.seq:
            return IGNORED
        if self.seq + 1 < m.U:
            self._restart(m, m.U)
            return desync("gap")
        self.book.apply(m.b, m.a)
        self.seq = m.u
        self.ts_exchange_ns = m.E * MS
        return APPLIED

    def on_snapshot(self, snap: DepthSnapshot) -> Outcome:
        if self.synced:  # an unsolicited (e.g. recorded) snapshot: the diffs already carry us
            return IGNORED
        last_id = snap.lastUpdateId
        if self.first_id is not None and last_id < self.first_id:
            return NEED_SNAPSHOT  # older than our first buffered diff: ask again
        kept = [m for m in self._take_held() if m.u > last_id]
        self.book.replace(snap.bids, snap.asks)
        self.seq = last_id
        self.ts_exchange_ns = 0
        self.synced = True
        for m in kept:
            outcome = self._update(m)
            if outcome is not APPLIED and outcome is not IGNORED:
                return outcome
        return APPLIED


def depth_weight(limit: int) -> int:
    """``GET /api/v3/depth`` weight by ``limit`` (rest-api.md)."""
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


def parse_exchange_info(body: bytes, fees: Fees) -> list[Instrument]:
    info = _any.decode(body)
    out: list[Instrument] = []
    for s in info.get("symbols", ()):
        filters = {f.get("filterType"): f for f in s.get("filters", ())}
        price = filters.get("PRICE_FILTER", {})
        lot = filters.get("LOT_SIZE", {})
        notional = filters.get("NOTIONAL") or filters.get("MIN_NOTIONAL") or {}
        try:
            out.append(Instrument(
                exchange="binance",
                symbol=f"{s['baseAsset']}/{s['quoteAsset']}",
                native=s["symbol"],
                base=s["baseAsset"],
                quote=s["quoteAsset"],
                tick_size=Decimal(price.get("tickSize", "0")).normalize(),
                lot_size=Decimal(lot.get("stepSize", "0")).normalize(),
                min_qty=Decimal(lot.get("minQty", "0")).normalize(),
                min_notional=Decimal(notional.get("minNotional", "0")).normalize(),
                taker_fee=fees.taker,
                maker_fee=fees.maker,
            ))
        except (KeyError, ArithmeticError) as exc:
            log.warning("skipping malformed exchangeInfo entry", extra={"symbol": s.get("symbol"), "error": str(exc)})
    return out


class Binance(Venue):
    name = "binance"
    ws_url = "wss://stream.binance.com:9443"
    rest_url = "https://api.binance.com"
    # 6000 weight/min per IP is shared with the executor's orders: take a third of it.
    rest_limit = RestLimit(weight=2000, per_s=60.0)
    resync = "snapshot"
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.001"), Decimal("0.001"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/api/v3/exchangeInfo", weight=20))
        instruments = parse_exchange_info(body, fees)
        wanted = set(symbols)
        return [i for i in instruments if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/stream"

    def streams(self, natives: Sequence[str]) -> list[str]:
        out = []
        for native in natives:
            sym = native.lower()
            out.append(f"{sym}@depth@100ms")
            if self.options.trades:
                out.append(f"{sym}@trade")
            if self.options.bbo:
                out.append(f"{sym}@bookTicker")
        return out

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        params = msgspec.json.encode(self.streams(natives)).decode()
        return [f'{{"method":"SUBSCRIBE","params":{params},"id":1}}']

    def new_book(self, native: str) -> BookSync:
        return BinanceBook(self.new_order_book())

    def snapshot_request(self, native: str) -> RestRequest:
        limit = self.options.snapshot_depth
        return RestRequest("/api/v3/depth", {"symbol": native, "limit": str(limit)}, weight=depth_weight(limit))

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame.startswith(STREAM_PREFIX):
            end = frame.find(b'"', _START)
            name = frame[_START:end]
            route = _routes.get(name)
            if route is None:
                route = _route(name)
                if end > 0 and len(_routes) < _MAX_ROUTES:
                    _routes[name] = route
            if route == TICKER:  # the most frequent: built here rather than through _ticker
                t = _ticker_frame.decode(frame).data
                return (BboMsg(t.s, t.u, t.b, t.B, t.a, t.A, 0),)
            if route == DEPTH:
                d = _depth_frame.decode(frame).data
                return (BookMsg(d.s, d),)
            if route == TRADE:
                return (self._trade(_trade_frame.decode(frame).data),)
            if route == UNUSED:
                ensure_json(frame)
                return ()  # a stream we do not use (kline, partial depth, ...)
        if frame.startswith(b'{"lastUpdateId"'):
            # hftbacktest records the REST snapshot body inline, without its URL.
            return (SnapshotMsg(None, _snapshot.decode(frame)),)
        return self._decode_other(frame)

    def _decode_other(self, frame: bytes) -> Sequence[Event]:
        msg = _any.decode(frame)
        if "stream" in msg and isinstance(msg.get("data"), dict):  # combined frame, keys reordered
            msg = msg["data"]
        if "result" in msg and "id" in msg:
            return ()  # SUBSCRIBE acknowledgement
        if "error" in msg or "code" in msg:
            raise Malformed("exchange_error", str(msg)[:200])
        event = msg.get("e")
        if event == "depthUpdate":
            d = msgspec.convert(msg, DepthUpdate, strict=False)
            return (BookMsg(d.s, d),)
        if event in ("trade", "aggTrade"):
            return (self._trade(msgspec.convert(msg, TradeData, strict=False)),)
        if event is None and {"u", "s", "b", "B", "a", "A"} <= msg.keys():
            return (self._ticker(msgspec.convert(msg, BookTicker, strict=False)),)
        if event is not None:
            return ()  # another stream type
        raise Malformed("unknown_message")

    @staticmethod
    def _trade(t: TradeData) -> TradeMsg:
        trade_id = t.t if t.t is not None else t.a
        if trade_id is None:
            raise Malformed("missing_field", "trade id")
        return TradeMsg(t.s, str(trade_id), t.p, t.q, "sell" if t.m else "buy", t.T * MS)

    @staticmethod
    def _ticker(t: BookTicker) -> BboMsg:
        # Spot bookTicker carries no event time: the core uses the receive time.
        return BboMsg(t.s, t.u, t.b, t.B, t.a, t.A, 0)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        path = urlsplit(url).path
        if path.endswith("/depth") or (not url and body.startswith(b'{"lastUpdateId"')):
            symbol = parse_qs(urlsplit(url).query).get("symbol", [None])[0]
            return (SnapshotMsg(symbol, _snapshot.decode(body)),)
        if path.endswith("/exchangeInfo"):
            return (InstrumentsMsg(parse_exchange_info(body, self.DEFAULT_FEES)),)
        return ()
