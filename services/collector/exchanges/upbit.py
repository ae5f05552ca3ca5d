"""Upbit (KRW, BTC and USDT markets): every orderbook message is a complete top-N snapshot.

Docs: docs.upbit.com "WebSocket 사용 및 에러 안내", "호가 (orderbook)", "체결 (trade)",
"마켓 코드 조회" (``/v1/market/all``), "호가 정책 조회" (``/v1/orderbook/instruments``),
"원화 마켓 호가 단위" (KRW tick policy of 2025-07-31).

- Connect to ``wss://api.upbit.com/websocket/v1`` and send one JSON array:
  ``[{"ticket":"..."},{"type":"orderbook","codes":["KRW-BTC"]},{"type":"trade","codes":[...]},
  {"format":"SIMPLE"}]``. Codes are upper case; frames are binary JSON.
- Two formats, both decoded: DEFAULT (``type, code, timestamp, orderbook_units[]{ask_price,
  bid_price, ask_size, bid_size}``) and SIMPLE (``ty, cd, tms, obu[]{ap, bp, as, bs}``).
- Book: replace the book with each message; drop a message older than the last one. There
  is no sequence and no checksum: the exchange timestamp is the book's ``seq``.
- Heartbeat: idle connections close after about 120 s; we send protocol pings.
- Market codes are ``QUOTE-BASE`` (``KRW-BTC`` is ``BTC/KRW``). Instruments: KRW and USDT
  markets get the documented price-dependent tick tables, the BTC market its single
  0.00000001 tick; ``/v1/orderbook/instruments`` (since 2025-07-31) gives the tick below
  the tables. Fees and the KRW minimum are the configured fallback / unknown: the
  endpoint that has them (``/v1/orders/chance``) needs a key.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import Meta, Struct, field

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
    Malformed,
    Outcome,
    PingRule,
    RestLimit,
    RestRequest,
    TradeMsg,
    Venue,
    ensure_json,
)
from shared.models import Instrument, Level

log = logging.getLogger(__name__)

MS = 1_000_000
NonNeg = Annotated[float, Meta(ge=0, le=FINITE)]
Positive = Annotated[float, Meta(gt=0, le=FINITE)]

# KRW market tick sizes by price (docs "원화(KRW) 마켓 주문 가격 단위", policy of 2025-07-31):
# (price at or above, tick), highest first. Below 100 KRW the tick differs per market (read
# /v1/orderbook/instruments); USDT/KRW and USDC/KRW have a finer 0.5 KRW tick in the
# 1,000-10,000 band, of which this table's 1 KRW is a valid (coarser) multiple.
KRW_TICKS: list[tuple[Decimal, Decimal]] = [
    (Decimal(1_000_000), Decimal(1000)),
    (Decimal(500_000), Decimal(500)),
    (Decimal(100_000), Decimal(100)),
    (Decimal(50_000), Decimal(50)),
    (Decimal(10_000), Decimal(10)),
    (Decimal(5_000), Decimal(5)),
    (Decimal(100), Decimal(1)),
]
# USDT market tick sizes by price (docs "USDT 마켓 주문 가격 단위", since 2024-08-19).
USDT_TICKS: list[tuple[Decimal, Decimal]] = [
    (Decimal(10), Decimal("0.01")),
    (Decimal(1), Decimal("0.001")),
    (Decimal("0.1"), Decimal("0.0001")),
    (Decimal("0.01"), Decimal("0.00001")),
    (Decimal("0.001"), Decimal("0.000001")),
    (Decimal("0.0001"), Decimal("0.0000001")),
]
TICK_TABLES = {"KRW": KRW_TICKS, "USDT": USDT_TICKS}
SATOSHI = Decimal("0.00000001")
"""The BTC market's single tick, and the tick below every table."""
# Minimum order totals documented per market ("최소 주문 가능 금액"). The KRW minimum is read
# from /v1/orders/chance (`min_total`), which needs a key: unknown here, left at 0.
MIN_NOTIONAL = {"BTC": Decimal("0.00005"), "USDT": Decimal("0.5")}


# Decoded frames hold strings, numbers and lists of them, never a cycle: ``gc=False`` spares the
# cyclic collector from tracking the several objects every frame makes.


class UnitSimple(Struct, gc=False):
    ap: NonNeg
    bp: NonNeg
    as_: NonNeg = field(name="as")
    bs: NonNeg


class OrderbookSimple(Struct, tag_field="ty", tag="orderbook", gc=False):
    cd: str
    tms: int
    obu: list[UnitSimple]


class FullUnitSimple(Struct, gc=False):
    """A unit whose four figures are all positive: no padding, nothing to filter."""

    ap: Positive
    bp: Positive
    as_: Positive = field(name="as")
    bs: Positive


class FullOrderbookSimple(Struct, tag_field="ty", tag="orderbook", gc=False):
    """The usual book message: every unit priced and sized on both sides."""

    cd: str
    tms: int
    obu: list[FullUnitSimple]


class TradeSimple(Struct, tag_field="ty", tag="trade", gc=False):
    cd: str
    ttms: int
    tp: Positive
    tv: Positive
    ab: str
    sid: int


class Unit(Struct, gc=False):
    ask_price: NonNeg
    bid_price: NonNeg
    ask_size: NonNeg
    bid_size: NonNeg


class Orderbook(Struct, tag_field="type", tag="orderbook", gc=False):
    code: str
    timestamp: int
    orderbook_units: list[Unit]


class TradeDefault(Struct, tag_field="type", tag="trade", gc=False):
    code: str
    trade_timestamp: int
    trade_price: Positive
    trade_volume: Positive
    ask_bid: str
    sequential_id: int


_simple = msgspec.json.Decoder(OrderbookSimple | TradeSimple)
_simple_full = msgspec.json.Decoder(FullOrderbookSimple | TradeSimple)
_default = msgspec.json.Decoder(Orderbook | TradeDefault)
_any: msgspec.json.Decoder[Any] = msgspec.json.Decoder()

SIMPLE_PREFIX = b'{"ty":"'
DEFAULT_PREFIX = b'{"type":"'
KNOWN = (b"orderbook", b"trade")


def _kind(frame: bytes, start: int) -> bytes:
    """The message type named right after the prefix (up to its closing quote)."""
    end = frame.find(b'"', start)
    return frame[start:end if end >= 0 else len(frame)]


def _side(levels: list[tuple[float, float]]) -> list[Level]:
    """Units pad missing levels with zeros; a size without a price is broken."""
    out = []
    for price, size in levels:
        if price > 0 and size > 0:
            out.append((price, size))
        elif price == 0 and size > 0:
            raise Malformed("bad_level", f"size {size} at price 0")
    return out


class UpbitBook(BookSync):
    __slots__ = ()

    def on_message(self, m: tuple[int, list[Level], list[Level]]) -> Outcome:
        tms, bids, asks = m
        if not bids and not asks:
            raise Malformed("empty_book")
        if bids and asks and max(bids)[0] >= min(asks)[0]:  # the highest bid, the lowest ask
            raise Malformed("crossed")
        if tms < self.seq:
            return IGNORED  # older than the book we have
        self.book.replace(bids, asks)
        self.seq = tms
        self.ts_exchange_ns = tms * MS
        self.synced = True
        return APPLIED


def unified(market: str) -> tuple[str, str]:
    """``KRW-BTC`` -> ``("BTC", "KRW")``: Upbit's documented QUOTE-BASE market code."""
    quote, sep, base = market.partition("-")
    if not sep or not quote or not base:
        raise Malformed("bad_market", market)
    return base, quote


def market_codes(body: bytes) -> list[tuple[str, str, str]]:
    """``(market, base, quote)`` of every market in a ``/v1/market/all`` answer (Bithumb's too)."""
    out = []
    for m in _any.decode(body):
        market = m.get("market") if isinstance(m, dict) else None
        if not isinstance(market, str):
            continue
        try:
            base, quote = unified(market)
        except Malformed:
            continue
        out.append((market, base, quote))
    return out


def parse_markets(body: bytes, ticks: dict[str, Decimal], fees: Fees) -> list[Instrument]:
    out: list[Instrument] = []
    for market, base, quote in market_codes(body):
        out.append(Instrument(
            exchange="upbit", symbol=f"{base}/{quote}", native=market, base=base, quote=quote,
            # Below the tables: the market's own tick when the exchange gave it, else a value
            # every documented tick is a multiple of (orders stay valid, if coarse).
            tick_size=ticks.get(market, KRW_TICKS[-1][1] if quote == "KRW" else SATOSHI),
            lot_size=SATOSHI,
            min_notional=MIN_NOTIONAL.get(quote, Decimal(0)),
            taker_fee=fees.taker, maker_fee=fees.maker,
            tick_table=TICK_TABLES.get(quote, []),
        ))
    return out


def parse_tick_sizes(body: bytes) -> dict[str, Decimal]:
    out = {}
    for m in _any.decode(body):
        if isinstance(m, dict) and isinstance(m.get("market"), str) and m.get("tick_size") is not None:
            try:
                out[m["market"]] = Decimal(str(m["tick_size"])).normalize()
            except ArithmeticError:
                continue
    return out


class Upbit(Venue):
    name = "upbit"
    ws_url = "wss://api.upbit.com"
    rest_url = "https://api.upbit.com"
    ping = PingRule(interval_s=30.0)
    rest_limit = RestLimit(weight=5, per_s=1.0)
    resync = "none"
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.0005"), Decimal("0.0005"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        markets = await get(RestRequest("/v1/market/all", {"isDetails": "false"}))
        everything = parse_markets(markets, {}, fees)
        wanted = set(symbols)
        chosen = [i for i in everything if not wanted or i.symbol in wanted]
        if not chosen:
            return []
        try:  # the per-market tick endpoint exists since 2025-07-31
            body = await get(RestRequest("/v1/orderbook/instruments", {"markets": ",".join(i.native for i in chosen)}))
            ticks = parse_tick_sizes(body)
        except Exception as exc:
            log.warning("tick sizes unavailable, using the KRW tick table", extra={"error": str(exc)})
            ticks = {}
        return [i for i in parse_markets(markets, ticks, fees) if i.native in {c.native for c in chosen}]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/websocket/v1"

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        request: list[dict[str, Any]] = [{"ticket": str(uuid.uuid4())}, {"type": "orderbook", "codes": list(natives)}]
        if self.options.trades:
            request.append({"type": "trade", "codes": list(natives)})
        request.append({"format": self.options.upbit_format})
        return [msgspec.json.encode(request).decode()]

    def new_book(self, native: str) -> BookSync:
        return UpbitBook(self.new_order_book())

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame.startswith(SIMPLE_PREFIX):
            if _kind(frame, len(SIMPLE_PREFIX)) not in KNOWN:
                ensure_json(frame)
                return ()  # ticker and other types
            try:  # the usual full book, read without filtering its units
                msg: Any = _simple_full.decode(frame)
            except msgspec.ValidationError:  # padding or a figure out of range: the general rules decide
                msg = _simple.decode(frame)
        elif frame.startswith(DEFAULT_PREFIX):
            if _kind(frame, len(DEFAULT_PREFIX)) not in KNOWN:
                ensure_json(frame)
                return ()
            msg = _default.decode(frame)
        else:
            return self._decode_other(frame)
        return (self._event(msg),)

    def _decode_other(self, frame: bytes) -> Sequence[Event]:
        doc = _any.decode(frame)
        if not isinstance(doc, dict):
            raise Malformed("unknown_message")
        if "status" in doc:
            return ()  # {"status":"UP"} keep-alive
        if "error" in doc:
            raise Malformed("exchange_error", str(doc["error"])[:200])
        kind = doc.get("ty", doc.get("type"))
        if kind in ("orderbook", "trade"):  # a known message with its keys in another order
            decoder = _simple if "ty" in doc else _default
            return (self._event(decoder.decode(frame)),)
        if kind is not None:
            return ()
        raise Malformed("unknown_message")

    @staticmethod
    def _event(msg: Any) -> Event:
        kind = type(msg)
        if kind is FullOrderbookSimple:
            units = msg.obu
            return BookMsg(msg.cd, (msg.tms, [(u.bp, u.bs) for u in units], [(u.ap, u.as_) for u in units]))
        if kind is OrderbookSimple:
            units = msg.obu
            bids = [(u.bp, u.bs) for u in units if u.bp > 0 and u.bs > 0]
            asks = [(u.ap, u.as_) for u in units if u.ap > 0 and u.as_ > 0]
            if len(bids) < len(units) or len(asks) < len(units):  # padding, or a broken level: the full rules
                bids = _side([(u.bp, u.bs) for u in units])
                asks = _side([(u.ap, u.as_) for u in units])
            return BookMsg(msg.cd, (msg.tms, bids, asks))
        if kind is Orderbook:
            units = msg.orderbook_units
            bids = [(u.bid_price, u.bid_size) for u in units if u.bid_price > 0 and u.bid_size > 0]
            asks = [(u.ask_price, u.ask_size) for u in units if u.ask_price > 0 and u.ask_size > 0]
            if len(bids) < len(units) or len(asks) < len(units):
                bids = _side([(u.bid_price, u.bid_size) for u in units])
                asks = _side([(u.ask_price, u.ask_size) for u in units])
            return BookMsg(msg.code, (msg.timestamp, bids, asks))
        if kind is TradeSimple:
            return _trade(msg.cd, str(msg.sid), msg.tp, msg.tv, msg.ab, msg.ttms)
        return _trade(msg.code, str(msg.sequential_id), msg.trade_price, msg.trade_volume, msg.ask_bid,
                      msg.trade_timestamp)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        if "/v1/market/all" in url:
            return (InstrumentsMsg(parse_markets(body, {}, self.DEFAULT_FEES)),)
        return ()


def _trade(code: str, trade_id: str, price: float, size: float, ask_bid: str, ts_ms: int) -> TradeMsg:
    # ask_bid is the taker's side: ASK = a sell order took the bid.
    if ask_bid not in ("ASK", "BID"):
        raise Malformed("bad_side", ask_bid)
    return TradeMsg(code, trade_id, price, size, "sell" if ask_bid == "ASK" else "buy", ts_ms * MS)
