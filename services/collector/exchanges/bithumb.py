"""Bithumb: the current Upbit-style API (full book in every message), and the legacy
``orderbookdepth`` feed, whose books can never be trusted.

Docs: apidocs.bithumb.com "WebSocket 기본 정보", "호가 (orderbook)", "체결 (trade)", "마켓 코드
조회"; legacy API 1.0 "빗썸 거래소 정보 수신" (WebSocket), "현재가 정보 조회 (ALL)".

Current API (the default):
- ``wss://ws-api.bithumb.com/websocket/v1`` takes Upbit's request array
  (``[{"ticket"},{"type":"orderbook","codes":["KRW-BTC"]},{"type":"trade",..},{"format"}]``)
  and answers with Upbit's field names in both formats (``DEFAULT`` and ``SIMPLE``): every
  orderbook message is the whole top of the book. Decoding and the book rules are Upbit's
  (``services.collector.exchanges.upbit``), used as they are.
- Markets ``GET /v1/market/all`` (``QUOTE-BASE`` codes, as Upbit's). Bithumb publishes no tick
  or lot table we could verify, and the endpoint with fees and minimums (``/v1/orders/chance``)
  needs a key: tick and lot are left 0 (unknown, so nothing is rounded onto a wrong grid) and
  fees are the configured fallback.

Legacy feed (``book_channel = "orderbookdepth"``, and every legacy recording):
- ``wss://pubwss.bithumb.com/pub/ws``, ``{"type":"orderbookdepth","symbols":["BTC_KRW"]}`` and
  ``{"type":"transaction",..}``. ``orderbookdepth`` pushes are changed levels only
  (``orderType``, ``price``, ``quantity`` = the level's new total, 0 removes it) with a
  ``datetime`` in microseconds: no sequence number, and nothing to start from. The REST
  ``/public/orderbook`` snapshot carries only a millisecond ``timestamp`` that nothing in the
  pushes can be matched against, and lost pushes cannot be noticed. So a book built from them
  contains only the levels that happened to change since we subscribed and cannot be shown to
  be complete or current: it is kept and published, but always marked ``stale`` (reason
  ``untrusted``) and never synced, so nothing downstream trades on it. Trades
  (``transaction``) are sound and are published; ``buySellGb`` 1 is a sell, 2 a buy;
  ``contDtm`` is Korean time.
- Markets: ``GET /public/ticker/ALL_KRW`` and ``ALL_BTC`` (keys are the base currencies).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct, field

from services.collector.exchanges.upbit import DEFAULT_PREFIX, SIMPLE_PREFIX, Upbit, market_codes
from services.collector.venue import (
    UNTRUSTED,
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
    TradeMsg,
    VenueOptions,
)
from shared.models import Instrument, Side

log = logging.getLogger(__name__)

MS = 1_000_000
LEGACY = "orderbookdepth"
LEGACY_QUOTES = ("KRW", "BTC")
KST = timezone(timedelta(hours=9))
UNKNOWN = Decimal(0)


class DepthLevel(Struct):
    symbol: str
    orderType: str
    price: Price
    quantity: Size


class DepthContent(Struct):
    levels: list[DepthLevel] = field(name="list")
    micros: int = field(name="datetime")


class DepthPush(Struct):
    type: str
    content: DepthContent


class Fill(Struct):
    symbol: str
    buySellGb: str
    contPrice: Price
    contQty: Size
    contDtm: str


class FillContent(Struct):
    fills: list[Fill] = field(name="list")


class FillPush(Struct):
    type: str
    content: FillContent


_depth = msgspec.json.Decoder(DepthPush, strict=False)
_fills = msgspec.json.Decoder(FillPush, strict=False)
_any: msgspec.json.Decoder[Any] = msgspec.json.Decoder()

LEGACY_PREFIX = b'{"type":"orderbookdepth"'
FILL_PREFIX = b'{"type":"transaction"'


class LegacyBook(BookSync):
    """Levels as ``orderbookdepth`` changed them; applied in order, never vouched for."""

    __slots__ = ()

    def on_message(self, m: tuple[int, list[Level], list[Level]]) -> Outcome:
        micros, bids, asks = m
        self.book.apply(bids, asks)
        self.seq = micros
        self.ts_exchange_ns = micros * 1000
        return UNTRUSTED


def _fill_ns(stamp: str) -> int:
    """``"2021-06-02 08:43:34.555058"`` (Korean time) -> nanoseconds since the epoch."""
    try:
        moment = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=KST)
    except ValueError:
        raise Malformed("bad_time", stamp) from None
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def parse_markets(body: bytes, fees: Fees) -> list[Instrument]:
    """``/v1/market/all``: the market codes are Upbit's; ticks and lots are not published."""
    return [Instrument(exchange="bithumb", symbol=f"{base}/{quote}", native=market, base=base, quote=quote,
                       tick_size=UNKNOWN, lot_size=UNKNOWN, taker_fee=fees.taker, maker_fee=fees.maker)
            for market, base, quote in market_codes(body)]


def parse_legacy_tickers(body: bytes, quote: str, fees: Fees) -> list[Instrument]:
    """``/public/ticker/ALL_<quote>``: one entry per base currency (plus a ``date`` field)."""
    doc = _any.decode(body)
    if not isinstance(doc, dict) or doc.get("status") != "0000" or not isinstance(doc.get("data"), dict):
        raise Malformed("exchange_error", str(doc)[:200])
    return [Instrument(exchange="bithumb", symbol=f"{base}/{quote}", native=f"{base}_{quote}", base=base,
                       quote=quote, tick_size=UNKNOWN, lot_size=UNKNOWN, taker_fee=fees.taker, maker_fee=fees.maker)
            for base, ticker in doc["data"].items() if isinstance(ticker, dict) and base.isalnum()]


class Bithumb(Upbit):
    name = "bithumb"
    ws_url = "wss://ws-api.bithumb.com"
    rest_url = "https://api.bithumb.com"
    # Public REST: 150 requests/s per IP.
    rest_limit = RestLimit(weight=20, per_s=1.0)
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.0025"), Decimal("0.0025"))
    LEGACY_WS_URL: ClassVar[str] = "wss://pubwss.bithumb.com"

    def __init__(self, options: VenueOptions | None = None) -> None:
        super().__init__(options)
        self.legacy = self.options.book_channel == LEGACY

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        if self.legacy:
            everything: list[Instrument] = []
            for quote in LEGACY_QUOTES:
                everything += parse_legacy_tickers(await get(RestRequest(f"/public/ticker/ALL_{quote}")), quote, fees)
        else:
            everything = parse_markets(await get(RestRequest("/v1/market/all", {"isDetails": "false"})), fees)
        wanted = set(symbols)
        return [i for i in everything if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        if self.legacy:
            # The legacy feed lives on its own host; a configured URL (a simulator) is used as is.
            host = self.LEGACY_WS_URL if base.rstrip("/") == self.ws_url else base.rstrip("/")
            return host + "/pub/ws"
        return super().connect_url(base, natives)

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        if not self.legacy:
            return super().subscribe(natives)
        out = [msgspec.json.encode({"type": LEGACY, "symbols": list(natives)}).decode()]
        if self.options.trades:
            out.append(msgspec.json.encode({"type": "transaction", "symbols": list(natives)}).decode())
        return out

    def new_book(self, native: str) -> BookSync:
        # Legacy markets are BASE_QUOTE, current ones QUOTE-BASE: the code says which feed it is.
        return LegacyBook(self.new_order_book()) if "_" in native else super().new_book(native)

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame.startswith(LEGACY_PREFIX):
            return self._depth(_depth.decode(frame).content)
        if frame.startswith(FILL_PREFIX):
            return [self._fill(f) for f in _fills.decode(frame).content.fills]
        if frame.startswith((SIMPLE_PREFIX, DEFAULT_PREFIX)):
            return super().decode(frame)  # Upbit's protocol, keys in their usual order
        # Anything else: find out what it is before deciding whose format it is.
        doc = _any.decode(frame)
        if isinstance(doc, dict):
            kind = doc.get("type")
            if kind == LEGACY:
                return self._depth(_depth.decode(frame).content)
            if kind == "transaction":
                return [self._fill(f) for f in _fills.decode(frame).content.fills]
            if "resmsg" in doc and doc.get("status") != "0000":
                raise Malformed("exchange_error", f"{doc.get('status')} {doc.get('resmsg')}"[:200])
        return super().decode(frame)

    @staticmethod
    def _depth(content: DepthContent) -> Sequence[Event]:
        by_symbol: dict[str, tuple[list[Level], list[Level]]] = {}
        for level in content.levels:
            bids, asks = by_symbol.setdefault(level.symbol, ([], []))
            if level.orderType == "bid":
                bids.append((level.price, level.quantity))
            elif level.orderType == "ask":
                asks.append((level.price, level.quantity))
            else:
                raise Malformed("bad_side", level.orderType)
        if not by_symbol:
            raise Malformed("empty_data")
        return [BookMsg(symbol, (content.micros, bids, asks)) for symbol, (bids, asks) in by_symbol.items()]

    @staticmethod
    def _fill(f: Fill) -> TradeMsg:
        if f.buySellGb not in ("1", "2"):
            raise Malformed("bad_side", f.buySellGb)
        if f.contQty <= 0:
            raise Malformed("bad_level", str(f.contQty))
        ts = _fill_ns(f.contDtm)
        side: Side = "sell" if f.buySellGb == "1" else "buy"
        # Legacy fills carry no id: the time, price, size and side stand in for one.
        return TradeMsg(f.symbol, f"{f.contDtm}|{f.contPrice}|{f.contQty}|{side}", f.contPrice, f.contQty, side, ts)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        path = urlsplit(url).path
        if path.endswith("/v1/market/all"):
            return (InstrumentsMsg(parse_markets(body, self.DEFAULT_FEES)),)
        for quote in LEGACY_QUOTES:
            if path.endswith(f"/public/ticker/ALL_{quote}"):
                return (InstrumentsMsg(parse_legacy_tickers(body, quote, self.DEFAULT_FEES)),)
        return ()

