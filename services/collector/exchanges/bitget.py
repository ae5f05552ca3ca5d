"""Bitget spot (API v2): ``books`` snapshot + updates with a CRC32 checksum; v1 pushes decoded too.

Docs: bitget.com/api-doc/spot/websocket/public/Depth-Channel, .../Trades-Channel,
/api-doc/spot/market/Get-Symbols, /api-doc/common/websocket-intro.

- Connect to ``wss://ws.bitget.com/v2/ws/public``; subscribe
  ``{"op":"subscribe","args":[{"instType":"SPOT","channel":"books","instId":"BTCUSDT"}]}``.
  Pushes: ``{"action":"snapshot"|"update","arg":{..},"data":[{"asks","bids","checksum","seq",
  "ts"}],"ts"}``; levels are ``[price, size]`` strings.
- Book: a snapshot replaces the book, updates set absolute sizes (0 deletes). ``seq`` rises with
  every change (the docs promise no +1 step), so a ``seq`` that does not rise means a packet
  out of order. After every push the CRC32 of the top 25 levels (interleaved ``bid:ask``,
  ``price:size`` joined by ``:``, over the strings as received, as a signed int) must equal
  ``checksum``. A mismatch or an out-of-order push: unsubscribe and subscribe again.
- The v1 spot stream (``wss://ws.bitget.com/spot/v1/stream``, ``instType`` ``sp``, retired) had
  the same books with the same checksum and no ``seq``; its trade pushes are bare arrays
  ``[ts, price, size, side]`` without a trade id. Both shapes are decoded, so v1 recordings
  replay.
- Heartbeat: send text ``ping`` at least every 30 s; the server answers ``pong``.
- Trades: ``trade`` (``side`` is the taker's); the snapshot a subscription starts with is
  history and is skipped.
- Instruments: ``GET /api/v2/spot/public/symbols``: ``pricePrecision``/``quantityPrecision``
  are decimal places (tick = 10^-pricePrecision, lot = 10^-quantityPrecision),
  ``minTradeUSDT``, and the default ``takerFeeRate``/``makerFeeRate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct

from services.collector.book import OrderBook
from services.collector.exchanges.okx import checksum, parsed
from services.collector.venue import (
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
INF = float("inf")
RawLevel = tuple[str, str]


class Arg(Struct):
    channel: str
    instId: str = ""
    instType: str = ""


class BookData(Struct):
    asks: list[RawLevel]
    bids: list[RawLevel]
    ts: str
    checksum: int | None = None
    seq: int | None = None


class BookPush(Struct):
    action: str
    arg: Arg
    data: list[BookData]


class TradeData(Struct):
    ts: str
    price: str
    size: str
    side: str
    tradeId: str


class TradePush(Struct):
    action: str
    arg: Arg
    data: list[TradeData | tuple[str, str, str, str]]
    """v2 objects, or v1 ``[ts, price, size, side]`` arrays."""


class Envelope(Struct):
    arg: Arg | None = None
    event: str | None = None
    code: str | int | None = None
    msg: str | None = None


_books = msgspec.json.Decoder(BookPush)
_trades = msgspec.json.Decoder(TradePush)
_envelope = msgspec.json.Decoder(Envelope)
_any = msgspec.json.Decoder(dict[str, Any])

CHANNEL = b'"channel":"'


class BitgetBook(BookSync):
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
            if d.seq is not None and self.seq_id is not None and d.seq <= self.seq_id:
                self.reset()
                return desync("out_of_order")
            self.book.apply_parsed(bids, asks)
        else:
            raise Malformed("unknown_action", action)
        self.seq_id = d.seq
        self.seq = d.seq if d.seq is not None else ts
        self.ts_exchange_ns = ts * MS
        if d.checksum is not None and checksum(self.book) != d.checksum:
            self.reset()
            return desync("checksum")
        return APPLIED

    def reset(self) -> None:
        super().reset()
        self.seq_id = None


def _step(places: Any) -> Decimal:
    digits = int(places)
    if not 0 <= digits <= 30:
        raise ArithmeticError(f"precision {places}")
    return Decimal(1).scaleb(-digits)


def parse_symbols(body: bytes, fees: Fees) -> list[Instrument]:
    """``/api/v2/spot/public/symbols``, or v1's ``/api/spot/v1/public/products`` (recordings)."""
    doc = _any.decode(body)
    if doc.get("code") != "00000":
        raise Malformed("exchange_error", str(doc.get("msg", ""))[:200])
    out: list[Instrument] = []
    for d in doc.get("data") or ():
        if d.get("status") != "online":
            continue
        v1 = "priceScale" in d
        try:
            base, quote = d["baseCoin"], d["quoteCoin"]
            min_usdt = Decimal(d.get("minTradeUSDT") or "0") if quote == "USDT" else Decimal(0)
            out.append(Instrument(
                exchange="bitget",
                symbol=f"{base}/{quote}",
                # v1 named the market ALPHAUSDT_SPBL and streamed it as symbolName ALPHAUSDT.
                native=d["symbolName"] if v1 else d["symbol"],
                base=base,
                quote=quote,
                tick_size=_step(d["priceScale"] if v1 else d["pricePrecision"]),
                lot_size=_step(d["quantityScale"] if v1 else d["quantityPrecision"]),
                min_qty=Decimal(d.get("minTradeAmount") or "0").normalize() if v1 else Decimal(0),
                min_notional=min_usdt.normalize(),
                taker_fee=Decimal(d["takerFeeRate"]) if d.get("takerFeeRate") else fees.taker,
                maker_fee=Decimal(d["makerFeeRate"]) if d.get("makerFeeRate") else fees.maker,
            ))
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("skipping malformed symbol", extra={"symbol": d.get("symbol"), "error": str(exc)})
    return out


class Bitget(Venue):
    name = "bitget"
    ws_url = "wss://ws.bitget.com"
    rest_url = "https://api.bitget.com"
    ping = PingRule(interval_s=25.0, message="ping")
    # Symbols: 20 requests/s per IP; 6000/min overall per IP, shared with trading.
    rest_limit = RestLimit(weight=10, per_s=1.0)
    resync = "resubscribe"
    keep_strings = True
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.001"), Decimal("0.001"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/api/v2/spot/public/symbols"))
        wanted = set(symbols)
        return [i for i in parse_symbols(body, fees) if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/v2/ws/public"

    @staticmethod
    def _args(natives: Sequence[str], channels: Sequence[str]) -> str:
        args = [{"instType": "SPOT", "channel": ch, "instId": n} for n in natives for ch in channels]
        return msgspec.json.encode(args).decode()

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        channels = ["books", "trade"] if self.options.trades else ["books"]
        return [f'{{"op":"subscribe","args":{self._args(natives, channels)}}}']

    def resubscribe(self, native: str) -> list[str]:
        args = self._args([native], ["books"])
        return [f'{{"op":"unsubscribe","args":{args}}}', f'{{"op":"subscribe","args":{args}}}']

    def new_book(self, native: str) -> BookSync:
        return BitgetBook(OrderBook(keep_strings=True))

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        if frame == b"pong":
            return ()
        at = frame.find(CHANNEL, 0, 80)
        if at < 0 or b'"event"' in frame[:16]:
            env = _envelope.decode(frame)
            if env.event == "error":
                raise Malformed("exchange_error", f"{env.code} {env.msg}")
            if env.event is not None:
                return ()  # subscribe / unsubscribe acknowledgements
            if env.arg is None:
                raise Malformed("unknown_message")
            channel = env.arg.channel.encode()
        else:
            start = at + len(CHANNEL)
            channel = frame[start:frame.find(b'"', start)]
        if channel == b"books":
            push = _books.decode(frame)
            if not push.data:
                raise Malformed("empty_data")
            return [BookMsg(push.arg.instId, (push.action, d)) for d in push.data]
        if channel == b"trade":
            push_t = _trades.decode(frame)
            if push_t.action == "snapshot":
                return ()  # recent history, sent again on every subscription
            return [self._trade(push_t.arg.instId, t) for t in push_t.data]
        ensure_json(frame)
        return ()  # tickers, candles and the snapshot-only book channels

    @staticmethod
    def _trade(native: str, t: TradeData | tuple[str, str, str, str]) -> TradeMsg:
        if isinstance(t, TradeData):
            ts, price_s, size_s, side, trade_id = t.ts, t.price, t.size, t.side, t.tradeId
        else:
            ts, price_s, size_s, side = t
            trade_id = f"{ts}-{price_s}-{size_s}-{side}"  # v1 trades carry no id
        if side not in ("buy", "sell"):
            raise Malformed("bad_side", side)
        try:
            price, size, ts_ms = float(price_s), float(size_s), int(ts)
        except ValueError:
            raise Malformed("bad_number", f"{price_s} {size_s} {ts}") from None
        if not (0 < price < INF and 0 < size < INF):
            raise Malformed("bad_level", f"{price_s} {size_s}")
        return TradeMsg(native, trade_id, price, size, "buy" if side == "buy" else "sell", ts_ms * MS)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        if urlsplit(url).path.endswith(("/api/v2/spot/public/symbols", "/api/spot/v1/public/products")):
            return (InstrumentsMsg(parse_symbols(body, self.DEFAULT_FEES)),)
        return ()
