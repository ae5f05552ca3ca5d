"""KuCoin spot: a token from the bullet endpoint, REST snapshot + ``/market/level2`` increments.

Docs: kucoin.com/docs-new "Get Public Token", "Orderbook - Increment" (spot public WebSocket),
"Get Full OrderBook" / "Get Part OrderBook", "Get All Symbols"; the legacy
Kucoin/kucoin-api-docs "Level-2 Market Data" calibration procedure.

- Before every connection: ``POST /api/v1/bullet-public`` gives a ``token`` and
  ``instanceServers[{endpoint, pingInterval, pingTimeout}]``; connect to
  ``<endpoint>?token=<token>&connectId=<id>`` (the server says ``welcome``), send
  ``{"id":..,"type":"ping"}`` more often than ``pingInterval``.
- Subscribe ``{"id":..,"type":"subscribe","topic":"/market/level2:BTC-USDT,ETH-USDT",
  "privateChannel":false,"response":true}`` (at most 100 symbols per topic). Increments carry
  ``sequenceStart``, ``sequenceEnd`` and ``changes{asks,bids}`` of ``[price, size, sequence]``.
- Book (calibration): buffer increments, fetch a REST snapshot (``sequence``); drop increments
  with ``sequenceEnd <= sequence``; an increment applies when ``sequenceStart <= local + 1``,
  changes with a sequence above ``local`` only; size 0 removes the price; price 0 changes
  nothing but the sequence; then ``local = sequenceEnd``. ``sequenceStart > local + 1`` means
  lost increments: fetch a new snapshot. An increment made only of price-0 changes moves the
  sequence and leaves the book as it was: nothing to publish, but the book is proven current.
- Snapshots: the full book, ``GET /api/v3/market/orderbook/level2``, needs an API key (signed
  ``KC-API-*`` headers). Without a key the public ``GET /api/v1/market/orderbook/level2_100``
  is the top 100 levels per side only. What that makes sound: every price at or better than
  the snapshot's worst level is known exactly and kept exact by the increments; beyond it we
  know nothing. So with a partial snapshot the book ignores changes past that edge, and when a
  truncated side runs down to ``PARTIAL_MIN_LEVELS`` known levels it fetches a new snapshot
  rather than publish a top that could be missing levels.
- Trades: ``/market/match`` (``side`` is the taker's).
- Instruments: ``GET /api/v2/symbols`` (``priceIncrement``, ``baseIncrement``, ``baseMinSize``,
  ``minFunds``); fees are the configured fallback (the fee endpoint needs a key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Meta, Struct

from services.collector.book import L2Book
from services.collector.venue import (
    ALIVE,
    APPLIED,
    FINITE,
    IGNORED,
    NEED_SNAPSHOT,
    BookMsg,
    BookSync,
    Credentials,
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
SYMBOLS_PER_TOPIC = 100
PARTIAL_DEPTH = 100
PARTIAL_MIN_LEVELS = 25
"""A truncated side with fewer known levels than this is refreshed (we publish 20 by default)."""
FULL_BOOK = "/api/v3/market/orderbook/level2"
PART_BOOK = "/api/v1/market/orderbook/level2_{depth}"

ChangePrice = Annotated[float, Meta(ge=0, le=FINITE)]
"""A change's price: 0 is KuCoin's way of moving the sequence without touching the book."""
Size = Annotated[float, Meta(ge=0, le=FINITE)]
Change = tuple[ChangePrice, Size, int]


class Changes(Struct):
    asks: list[Change]
    bids: list[Change]


class L2Data(Struct):
    sequenceStart: int
    sequenceEnd: int
    symbol: str
    changes: Changes
    time: int | None = None
    """Milliseconds; missing in captures made before KuCoin added it."""


class L2Push(Struct):
    topic: str
    data: L2Data


class MatchData(Struct):
    symbol: str
    side: str
    price: Price
    size: Annotated[float, Meta(gt=0, le=FINITE)]
    tradeId: str
    time: int
    """Nanoseconds."""


class MatchPush(Struct):
    topic: str
    data: MatchData


class SnapshotData(Struct):
    sequence: int
    bids: list[Level]
    asks: list[Level]
    time: int | None = None


class SnapshotBody(Struct):
    code: str
    data: SnapshotData | None = None
    msg: str | None = None


class Snapshot(Struct):
    """A REST snapshot and, when it came from a public partial endpoint, its depth per side."""

    body: SnapshotData
    depth: int | None


class Server(Struct):
    endpoint: str
    pingInterval: int = 18_000
    pingTimeout: int = 10_000


class BulletData(Struct):
    token: str
    instanceServers: list[Server]


class BulletBody(Struct):
    code: str
    data: BulletData | None = None
    msg: str | None = None


class Control(Struct):
    """welcome, ack, pong, error; or a push whose topic was not found where it usually is."""

    type: str
    topic: str | None = None
    id: str | int | None = None
    code: int | str | None = None
    data: Any = None


_l2 = msgspec.json.Decoder(L2Push, strict=False)
_match = msgspec.json.Decoder(MatchPush, strict=False)
_snapshot = msgspec.json.Decoder(SnapshotBody, strict=False)
_bullet = msgspec.json.Decoder(BulletBody)
_control = msgspec.json.Decoder(Control)
_any = msgspec.json.Decoder(dict[str, Any])

TOPIC = b'"topic":"'


class KucoinBook(SnapshotDiffSync[L2Data]):
    __slots__ = ("ask_edge", "bid_edge")

    def __init__(self, book: L2Book, max_buffer: int = 10_000) -> None:
        super().__init__(book, max_buffer)
        self.bid_edge: float | None = None
        """Lowest bid price a partial snapshot vouches for (None: the side is complete)."""
        self.ask_edge: float | None = None

    def on_message(self, m: L2Data) -> Outcome:
        if self.synced:
            return self._update(m)
        return self._hold(m, m.sequenceStart)

    def _update(self, m: L2Data) -> Outcome:
        local = self.seq
        if m.sequenceEnd <= local:
            return IGNORED
        if m.sequenceStart > local + 1:
            self._restart(m, m.sequenceStart)
            return desync("gap")
        changed = self._side(self.book.bids.update, m.changes.bids, local, self.bid_edge, -1.0)
        changed |= self._side(self.book.asks.update, m.changes.asks, local, self.ask_edge, 1.0)
        self.seq = m.sequenceEnd
        if m.time:
            self.ts_exchange_ns = m.time * MS
        if self._too_thin():
            self._restart(None, None)
            return desync("partial_depth")
        return APPLIED if changed else ALIVE

    @staticmethod
    def _side(update: Any, changes: list[Change], local: int, edge: float | None, sign: float) -> bool:
        levels = []
        for price, size, sequence in changes:
            if sequence <= local or price == 0.0:
                continue  # already in the snapshot, or a change that only moves the sequence
            if edge is not None and sign * price > sign * edge:
                continue  # past what the partial snapshot covers: unknown territory
            levels.append((price, size))
        if levels:
            update(levels)
        return bool(levels)

    def _too_thin(self) -> bool:
        return ((self.bid_edge is not None and len(self.book.bids) < PARTIAL_MIN_LEVELS)
                or (self.ask_edge is not None and len(self.book.asks) < PARTIAL_MIN_LEVELS))

    def on_snapshot(self, snap: Snapshot) -> Outcome:
        if self.synced:  # an unsolicited (e.g. recorded) snapshot: the increments already carry us
            return IGNORED
        body = snap.body
        if self.first_id is not None and body.sequence + 1 < self.first_id:
            return NEED_SNAPSHOT  # older than our first buffered increment: ask again
        kept = [m for m in self._take_held() if m.sequenceEnd > body.sequence]
        self.book.replace(body.bids, body.asks)
        depth = snap.depth
        self.bid_edge = min(p for p, _ in body.bids) if depth and len(body.bids) >= depth else None
        self.ask_edge = max(p for p, _ in body.asks) if depth and len(body.asks) >= depth else None
        self.seq = body.sequence
        self.ts_exchange_ns = (body.time or 0) * MS
        self.synced = True
        for m in kept:
            outcome = self._update(m)
            if outcome is not APPLIED and outcome is not IGNORED and outcome is not ALIVE:
                return outcome
        return APPLIED

    def reset(self) -> None:
        super().reset()
        self.bid_edge = self.ask_edge = None

def parse_symbols(body: bytes, fees: Fees) -> list[Instrument]:
    doc = _any.decode(body)
    if doc.get("code") != "200000":
        raise Malformed("exchange_error", str(doc.get("msg", ""))[:200])
    out: list[Instrument] = []
    for d in doc.get("data") or ():
        if not d.get("enableTrading", True):
            continue
        try:
            out.append(Instrument(
                exchange="kucoin",
                symbol=f"{d['baseCurrency']}/{d['quoteCurrency']}",
                native=d["symbol"],
                base=d["baseCurrency"],
                quote=d["quoteCurrency"],
                tick_size=Decimal(d["priceIncrement"]).normalize(),
                lot_size=Decimal(d["baseIncrement"]).normalize(),
                min_qty=Decimal(d.get("baseMinSize") or "0").normalize(),
                # v2 names the minimum order value minFunds; v1 had only quoteMinSize.
                min_notional=Decimal(d.get("minFunds") or d.get("quoteMinSize") or "0").normalize(),
                taker_fee=fees.taker,
                maker_fee=fees.maker,
            ))
        except (KeyError, TypeError, ArithmeticError) as exc:
            log.warning("skipping malformed symbol", extra={"symbol": d.get("symbol"), "error": str(exc)})
    return out


def signer(credentials: Credentials) -> Any:
    """KuCoin's v2 key signature: Base64(HMAC-SHA256(secret, timestamp + METHOD + path + body))
    and the passphrase itself signed with the secret."""
    secret = credentials.secret.encode()
    passphrase = base64.b64encode(hmac.new(secret, credentials.passphrase.encode(), hashlib.sha256).digest()).decode()

    def sign(method: str, path: str) -> dict[str, str]:
        now = str(int(time.time() * 1000))
        signature = base64.b64encode(hmac.new(secret, f"{now}{method}{path}".encode(), hashlib.sha256).digest())
        return {"KC-API-KEY": credentials.key, "KC-API-SIGN": signature.decode(), "KC-API-TIMESTAMP": now,
                "KC-API-PASSPHRASE": passphrase, "KC-API-KEY-VERSION": "2"}

    return sign


class Kucoin(Venue):
    name = "kucoin"
    ws_url = "wss://ws-api-spot.kucoin.com"
    """Not used to connect: every connection goes where the bullet answer says."""
    rest_url = "https://api.kucoin.com"
    ping = PingRule(interval_s=9.0, message='{"id":"ping","type":"ping"}')
    # The public pool is 2000 weight per 30 s per IP, shared with everything else on the host.
    rest_limit = RestLimit(weight=500, per_s=30.0)
    resync = "snapshot"
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.001"), Decimal("0.001"))

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/api/v2/symbols", weight=4))
        wanted = set(symbols)
        return [i for i in parse_symbols(body, fees) if not wanted or i.symbol in wanted]

    async def open_url(self, get: Get, base: str, natives: Sequence[str]) -> str:
        doc = _bullet.decode(await get(RestRequest("/api/v1/bullet-public", method="POST", weight=10)))
        if doc.code != "200000" or doc.data is None or not doc.data.instanceServers:
            raise ConnectionError(f"kucoin bullet refused: {doc.code} {doc.msg}")
        server = doc.data.instanceServers[0]
        # Ping at half the advertised interval: the server drops a connection that misses one.
        self.ping = PingRule(interval_s=server.pingInterval / 2000, message='{"id":"ping","type":"ping"}')
        return f"{server.endpoint}?token={doc.data.token}&connectId={uuid.uuid4().hex}"

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        channels = ["/market/level2", "/market/match"] if self.options.trades else ["/market/level2"]
        out: list[str] = []
        for channel in channels:
            for i in range(0, len(natives), SYMBOLS_PER_TOPIC):
                topic = f"{channel}:{','.join(natives[i:i + SYMBOLS_PER_TOPIC])}"
                out.append(msgspec.json.encode({"id": f"sub-{len(out)}", "type": "subscribe", "topic": topic,
                                                "privateChannel": False, "response": True}).decode())
        return out

    def new_book(self, native: str) -> BookSync:
        return KucoinBook(self.new_order_book())

    def snapshot_request(self, native: str) -> RestRequest:
        credentials = self.options.credentials
        if credentials is not None:
            return RestRequest(FULL_BOOK, {"symbol": native}, weight=3, sign=signer(credentials))
        return RestRequest(PART_BOOK.format(depth=PARTIAL_DEPTH), {"symbol": native}, weight=4)

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        # KuCoin writes the topic first today; older pushes (our captures) put it after the data.
        at = frame.find(TOPIC, 0, 64)
        if at < 0:
            at = frame.rfind(TOPIC)
        if at >= 0:
            start = at + len(TOPIC)
            channel = frame[start:frame.find(b":", start)].decode()
        else:  # no compact topic: a control message, or a push laid out another way
            msg = _control.decode(frame)
            if msg.topic is None:
                return self._control(msg)
            channel = msg.topic.partition(":")[0]
        if channel == "/market/level2":
            d = _l2.decode(frame).data
            return (BookMsg(d.symbol, d),)
        if channel == "/market/match":
            t = _match.decode(frame).data
            if t.side not in ("buy", "sell"):
                raise Malformed("bad_side", t.side)
            return (TradeMsg(t.symbol, t.tradeId, t.price, t.size, "buy" if t.side == "buy" else "sell", t.time),)
        ensure_json(frame)
        return ()  # tickers, candles and other topics

    @staticmethod
    def _control(msg: Control) -> Sequence[Event]:
        if msg.type == "error":
            raise Malformed("exchange_error", f"{msg.code} {msg.data}"[:200])
        if msg.type in ("welcome", "ack", "pong", "notice", "command"):
            return ()
        raise Malformed("unknown_message", msg.type)

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        parts = urlsplit(url)
        path = parts.path
        if path.endswith(FULL_BOOK) or "/market/orderbook/level2_" in path:
            doc = _snapshot.decode(body)
            if doc.code != "200000" or doc.data is None:
                raise Malformed("exchange_error", f"{doc.code} {doc.msg}"[:200])
            try:
                depth = None if path.endswith(FULL_BOOK) else int(path.rsplit("_", 1)[1])
            except ValueError:
                raise Malformed("bad_url", path) from None
            symbol = parse_qs(parts.query).get("symbol", [None])[0]
            return (SnapshotMsg(symbol, Snapshot(doc.data, depth)),)
        if path.endswith(("/api/v1/symbols", "/api/v2/symbols")):
            return (InstrumentsMsg(parse_symbols(body, self.DEFAULT_FEES)),)
        return ()
