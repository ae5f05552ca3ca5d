"""Bybit spot (API v5): in-band snapshot + deltas with update id ``u``.

Docs: bybit-exchange docs ``v5/websocket/public/orderbook.mdx``, ``v5/ws/connect``,
``v5/market/instrument.mdx``.

- Connect to ``wss://stream.bybit.com/v5/public/spot``; subscribe
  ``{"req_id":"1","op":"subscribe","args":["orderbook.50.BTCUSDT"]}`` (at most 10 args per
  request on spot). Messages: ``topic, type (snapshot|delta), ts, cts, data{s, b, a, u, seq}``.
- Book: a snapshot replaces the book; deltas set absolute sizes (0 deletes); ``u == 1``
  means the service restarted and the message overwrites the book. ``u`` is continuous in
  normal operation (docs: "generally this id is continuous"), so a delta whose ``u`` is not
  the previous ``u + 1`` means lost updates: resubscribe for a fresh snapshot. Depth 1 is
  snapshot-only and resends the same ``u`` after 3 s without change.
- Heartbeat: send ``{"op":"ping"}`` every 20 s.
- Instruments: ``GET /v5/market/instruments-info?category=spot`` (``priceFilter.tickSize``,
  ``lotSizeFilter.basePrecision``/``minOrderQty``/``minOrderAmt``); fees are the
  configured fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Meta, Struct

from services.collector.venue import (
    APPLIED,
    FINITE,
    IGNORED,
    BookMsg,
    BookSync,
    Event,
    Fees,
    Get,
    InstrumentsMsg,
    Level,
    Malformed,
    Outcome,
    PingRule,
    Price,
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
DEPTH = 50
ARGS_PER_REQUEST = 10



class BookData(Struct):
    s: str
    b: list[Level]
    a: list[Level]
    u: int
    seq: int | None = None


class BookPush(Struct):
    topic: str
    type: str
    ts: int
    data: BookData
    cts: int | None = None


class TradeData(Struct):
    T: int
    s: str
    S: str
    v: Annotated[float, Meta(gt=0, le=FINITE)]
    p: Price
    i: str


class TradePush(Struct):
    topic: str
    ts: int
    data: list[TradeData]


_books = msgspec.json.Decoder(BookPush, strict=False)
_trades = msgspec.json.Decoder(TradePush, strict=False)
_any = msgspec.json.Decoder(dict[str, Any])

TOPIC_PREFIX = b'{"topic":"'


class BybitBook(BookSync):
    __slots__ = ()

    def on_message(self, m: BookPush) -> Outcome:
        d = m.data
        if m.type == "snapshot" or d.u == 1:
            self.book.replace(d.b, d.a)
            self.synced = True
        elif m.type == "delta":
            if not self.synced:
                return IGNORED  # waiting for the snapshot of a (re)subscription
            if d.u != self.seq + 1:
                if d.u <= self.seq:
                    return IGNORED
                self.reset()
                return desync("gap")
            self.book.apply(d.b, d.a)
        else:
            raise Malformed("unknown_type", m.type)
        self.seq = d.u
        self.ts_exchange_ns = m.ts * MS
        return APPLIED


def parse_instruments(body: bytes, fees: Fees) -> list[Instrument]:
    doc = _any.decode(body)
    if doc.get("retCode") not in (0, None):
        raise Malformed("exchange_error", str(doc.get("retMsg", ""))[:200])
    out: list[Instrument] = []
    for d in (doc.get("result") or {}).get("list", ()):
        lot = d.get("lotSizeFilter") or {}
        price = d.get("priceFilter") or {}
        try:
            out.append(Instrument(
                exchange="bybit",
                symbol=f"{d['baseCoin']}/{d['quoteCoin']}",
                native=d["symbol"],
                base=d["baseCoin"],
                quote=d["quoteCoin"],
                tick_size=Decimal(price["tickSize"]).normalize(),
                lot_size=Decimal(lot.get("basePrecision") or lot.get("qtyStep") or "0").normalize(),
                min_qty=Decimal(lot.get("minOrderQty") or "0").normalize(),
                min_notional=Decimal(lot.get("minOrderAmt") or lot.get("minNotionalValue") or "0").normalize(),
                taker_fee=fees.taker,
                maker_fee=fees.maker,
            ))
        except (KeyError, ArithmeticError) as exc:
            log.warning("skipping malformed instrument", extra={"symbol": d.get("symbol"), "error": str(exc)})
    return out


class Bybit(Venue):
    name = "bybit"
    ws_url = "wss://stream.bybit.com"
    rest_url = "https://api.bybit.com"
    ping = PingRule(interval_s=20.0, message='{"op":"ping"}')
    rest_limit = RestLimit(weight=100, per_s=5.0)
    resync = "resubscribe"
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.001"), Decimal("0.001"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/v5/market/instruments-info", {"category": "spot"}))
        wanted = set(symbols)
        return [i for i in parse_instruments(body, fees) if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/v5/public/spot"

    @property
    def depth(self) -> int:
        return self.options.channel_depth or DEPTH

    def topics(self, native: str) -> list[str]:
        topics = [f"orderbook.{self.depth}.{native}"]
        if self.options.trades:
            topics.append(f"publicTrade.{native}")
        return topics

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        topics = [t for n in natives for t in self.topics(n)]
        out = []
        for i in range(0, len(topics), ARGS_PER_REQUEST):
            args = msgspec.json.encode(topics[i:i + ARGS_PER_REQUEST]).decode()
            out.append(f'{{"req_id":"sub{i}","op":"subscribe","args":{args}}}')
        return out

    def resubscribe(self, native: str) -> list[str]:
        topic = f"orderbook.{self.depth}.{native}"
        return [f'{{"req_id":"unsub","op":"unsubscribe","args":["{topic}"]}}',
                f'{{"req_id":"resub","op":"subscribe","args":["{topic}"]}}']

    def new_book(self, native: str) -> BookSync:
        return BybitBook(self.new_order_book())

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame.startswith(TOPIC_PREFIX):
            topic = frame[len(TOPIC_PREFIX):frame.find(b'"', len(TOPIC_PREFIX))]
        else:
            msg = _any.decode(frame)
            if "op" in msg or "success" in msg:
                if msg.get("success") is False:
                    raise Malformed("exchange_error", str(msg.get("ret_msg", ""))[:200])
                return ()  # subscribe / ping acknowledgements
            topic_value = msg.get("topic")
            if not isinstance(topic_value, str):
                raise Malformed("unknown_message")
            topic = topic_value.encode()
        if topic.startswith(b"orderbook."):
            push = _books.decode(frame)
            return (BookMsg(push.data.s, push),)
        if topic.startswith(b"publicTrade."):
            return [self._trade(t) for t in _trades.decode(frame).data]
        ensure_json(frame)
        return ()  # tickers and other topics

    @staticmethod
    def _trade(t: TradeData) -> TradeMsg:
        if t.S not in ("Buy", "Sell"):
            raise Malformed("bad_side", t.S)
        return TradeMsg(t.s, t.i, t.p, t.v, "buy" if t.S == "Buy" else "sell", t.T * MS)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        parts = urlsplit(url)
        if parts.path.endswith("/instruments-info") and parse_qs(parts.query).get("category") == ["spot"]:
            return (InstrumentsMsg(parse_instruments(body, self.DEFAULT_FEES)),)
        return ()
