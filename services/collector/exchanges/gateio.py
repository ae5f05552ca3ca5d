"""Gate (gate.io) spot, API v4: ``spot.order_book_update`` with a REST snapshot, or ``spot.obu``.

Docs: gate.io/docs/developers/apiv4/ws/en "Order Book Channel" (how to maintain a local
order book), "Changed order book levels", "Order Book V2 API"; apiv4 "Retrieve order book",
"List all currency pairs supported".

- Connect to ``wss://api.gateio.ws/ws/v4/``; requests are ``{"time":<unix s>,"channel":..,
  "event":"subscribe","payload":[..]}`` (``time`` within 60 s of the server's); answers and
  pushes are ``{"time","time_ms","channel","event","error","result"}``. Protocol pings keep
  the connection alive.
- V1, ``spot.order_book_update`` with payload ``[pair, "100ms"]`` (a 100-level window; "20ms":
  20 levels). Pushes carry ``U``/``u`` (first/last update id), ``b``/``a`` absolute amounts (0
  removes). Book: cache pushes; ``GET /api/v4/spot/order_book?currency_pair=..&limit=100&
  with_id=true`` gives ``id``; drop pushes with ``u < id + 1``; if the first cached ``U`` is
  above ``id + 1`` the snapshot is behind: fetch again; start from the push with
  ``U <= id + 1 <= u``; afterwards ``U > local + 1`` means lost updates: new snapshot.
  ``full: true`` (newer pushes) replaces the book outright. The book is the channel's window:
  levels beyond its depth are dropped.
- V2, ``spot.obu`` with payload ``["ob.<pair>.400"]`` (or ``.50``): the first push is full
  (``full: true``, local id = ``u``); an increment needs ``U == local + 1``, otherwise
  unsubscribe and subscribe again for a new full push. Chosen with ``book_channel = "spot.obu"``.
- Trades: ``spot.trades`` (``side`` is the taker's; ``create_time_ms`` is a decimal string).
- Instruments: ``GET /api/v4/spot/currency_pairs``: ``precision``/``amount_precision`` are
  decimal places, so tick = 10^-precision and lot = 10^-amount_precision; ``min_base_amount``,
  ``min_quote_amount``. Fees are the configured fallback (the pair list's single ``fee`` does
  not say maker or taker; the account's rates need a key).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, ClassVar, NamedTuple
from urllib.parse import parse_qs, urlsplit

import msgspec
from msgspec import Meta, Struct

from services.collector.venue import (
    APPLIED,
    FINITE,
    IGNORED,
    NEED_SNAPSHOT,
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
    Resync,
    SnapshotDiffSync,
    SnapshotMsg,
    TradeMsg,
    Venue,
    VenueOptions,
    desync,
    ensure_json,
)
from shared.models import Instrument

log = logging.getLogger(__name__)

MS = 1_000_000
OBU = "spot.obu"
V1_CHANNEL = "spot.order_book_update"
V1_DEPTHS = {20: "20ms", 100: "100ms"}
OBU_DEPTHS = (400, 50)


class Update(Struct):
    u: int
    b: list[Level]
    a: list[Level]
    s: str
    U: int = 0
    """First update id; a V2 full push has only ``u``."""
    t: int = 0
    """Milliseconds."""
    full: bool = False
    l: str | None = None  # noqa: E741 - Gate's name for the level count


class UpdatePush(Struct):
    channel: str
    result: Update
    event: str = ""
    """V2 (``spot.obu``) pushes have no event."""


class TradeData(Struct):
    id: int
    create_time_ms: str
    side: str
    currency_pair: str
    amount: Annotated[float, Meta(gt=0, le=FINITE)]
    price: Price


class TradePush(Struct):
    channel: str
    event: str
    result: TradeData


class Control(Struct):
    channel: str = ""
    event: str = ""
    error: Any = None


class Snapshot(Struct):
    id: int
    bids: list[Level]
    asks: list[Level]
    update: int | None = None
    """Milliseconds."""


class BookPush(NamedTuple):
    """One push for one book: which channel it came from and the window it describes."""

    obu: bool
    update: Update
    depth: int


_update = msgspec.json.Decoder(UpdatePush, strict=False)
_trade = msgspec.json.Decoder(TradePush, strict=False)
_control = msgspec.json.Decoder(Control)
_snapshot = msgspec.json.Decoder(Snapshot, strict=False)
_any: msgspec.json.Decoder[Any] = msgspec.json.Decoder()

CHANNEL = b'"channel":"'


class GateBook(SnapshotDiffSync[BookPush]):
    __slots__ = ()

    def on_message(self, m: BookPush) -> Outcome:
        r = m.update
        if r.full:
            self.book.replace(r.b, r.a)
            self._take_held()
            self._moved(m)
            self.synced = True
            return APPLIED
        if self.synced:
            return self._update(m)
        if m.obu:
            return IGNORED  # waiting for the full push of a (re)subscription
        return self._hold(m, r.U)

    def _update(self, m: BookPush) -> Outcome:
        r = m.update
        if r.u <= self.seq:
            return IGNORED
        # V1 may start from a push that straddles the snapshot id; V2 increments follow exactly.
        if self.seq + 1 < r.U or (m.obu and self.seq + 1 != r.U):
            self._restart(m, r.U)
            return desync("gap")
        self.book.apply(r.b, r.a)
        self._moved(m)
        return APPLIED

    def _moved(self, m: BookPush) -> None:
        self.book.bids.trim(m.depth)
        self.book.asks.trim(m.depth)
        self.seq = m.update.u
        self.ts_exchange_ns = m.update.t * MS

    def on_snapshot(self, snap: Snapshot) -> Outcome:
        if self.synced:  # an unsolicited (e.g. recorded) snapshot: the pushes already carry us
            return IGNORED
        if self.first_id is not None and self.first_id > snap.id + 1:
            return NEED_SNAPSHOT  # behind the first cached push: ask again
        kept = [m for m in self._take_held() if m.update.u > snap.id]
        self.book.replace(snap.bids, snap.asks)
        self.seq = snap.id
        self.ts_exchange_ns = (snap.update or 0) * MS
        self.synced = True
        for m in kept:
            outcome = self._update(m)
            if outcome is not APPLIED and outcome is not IGNORED:
                return outcome
        return APPLIED

    def _restart(self, m: BookPush | None, first_id: int | None) -> None:
        if m is not None and m.obu:  # V2 recovers by resubscribing: nothing to keep, no snapshot
            self.book.clear()
            self.synced = False
            self._take_held()
            return
        super()._restart(m, first_id)

def _ns(ms: str) -> int:
    """``"1619093543708.2642"`` (milliseconds, decimal string) -> nanoseconds, exactly."""
    whole, _, frac = ms.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise Malformed("bad_number", ms)
    return int(whole) * MS + int((frac + "000000")[:6])


def _step(places: Any) -> Decimal:
    digits = int(places)
    if not 0 <= digits <= 30:
        raise ArithmeticError(f"precision {places}")
    return Decimal(1).scaleb(-digits)


def parse_currency_pairs(body: bytes, fees: Fees) -> list[Instrument]:
    doc = _any.decode(body)
    if not isinstance(doc, list):
        raise Malformed("exchange_error", str(doc)[:200])
    out: list[Instrument] = []
    for d in doc:
        if not isinstance(d, dict) or d.get("trade_status") != "tradable":
            continue
        try:
            out.append(Instrument(
                exchange="gateio",
                symbol=f"{d['base']}/{d['quote']}",
                native=d["id"],
                base=d["base"],
                quote=d["quote"],
                tick_size=_step(d["precision"]),
                lot_size=_step(d["amount_precision"]),
                min_qty=Decimal(d.get("min_base_amount") or "0").normalize(),
                min_notional=Decimal(d.get("min_quote_amount") or "0").normalize(),
                taker_fee=fees.taker,
                maker_fee=fees.maker,
            ))
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            log.warning("skipping malformed currency pair", extra={"pair": d.get("id"), "error": str(exc)})
    return out


class Gateio(Venue):
    name = "gateio"
    ws_url = "wss://api.gateio.ws"
    rest_url = "https://api.gateio.ws"
    ping = PingRule(interval_s=15.0)
    # Public endpoints allow 200 requests per 10 s each per IP: take half.
    rest_limit = RestLimit(weight=100, per_s=10.0)
    resync: Resync = "snapshot"
    DEFAULT_FEES: ClassVar[Fees] = Fees(Decimal("0.002"), Decimal("0.002"))

    def __init__(self, options: VenueOptions | None = None) -> None:
        super().__init__(options)
        self.obu = self.options.book_channel == OBU
        if self.obu:
            self.resync = "resubscribe"  # V2 has no REST snapshot: a new subscription starts with a full push
            self.depth = self.options.channel_depth if self.options.channel_depth in OBU_DEPTHS else OBU_DEPTHS[0]
        else:
            self.depth = self.options.channel_depth if self.options.channel_depth in V1_DEPTHS else 100

    async def load_instruments(self, get: Get, symbols: Sequence[str], fees: Fees) -> list[Instrument]:
        body = await get(RestRequest("/api/v4/spot/currency_pairs"))
        wanted = set(symbols)
        return [i for i in parse_currency_pairs(body, fees) if not wanted or i.symbol in wanted]

    def connect_url(self, base: str, natives: Sequence[str]) -> str:
        return base.rstrip("/") + "/ws/v4/"

    @staticmethod
    def _request(channel: str, event: str, payload: list[str]) -> str:
        # Gate rejects requests whose time is more than 60 s off its own clock.
        return msgspec.json.encode({"time": int(time.time()), "channel": channel, "event": event,
                                    "payload": payload}).decode()

    def _book_requests(self, native: str, event: str) -> list[str]:
        if self.obu:
            return [self._request(OBU, event, [f"ob.{native}.{self.depth}"])]
        return [self._request(V1_CHANNEL, event, [native, V1_DEPTHS[self.depth]])]

    def subscribe(self, natives: Sequence[str]) -> list[str]:
        out = [m for n in natives for m in self._book_requests(n, "subscribe")]
        if self.options.trades:
            out.append(self._request("spot.trades", "subscribe", list(natives)))
        return out

    def resubscribe(self, native: str) -> list[str]:
        if not self.obu:
            return []
        return [*self._book_requests(native, "unsubscribe"), *self._book_requests(native, "subscribe")]

    def new_book(self, native: str) -> BookSync:
        return GateBook(self.new_order_book())

    def snapshot_request(self, native: str) -> RestRequest:
        return RestRequest("/api/v4/spot/order_book",
                           {"currency_pair": native, "limit": str(self.depth), "with_id": "true"})

    # ------------------------------------------------------------------ decoding

    def decode(self, frame: bytes) -> Sequence[Event]:
        at = frame.find(CHANNEL, 0, 80)
        if at >= 0:  # Gate's own layout: the channel near the start, compact JSON
            start = at + len(CHANNEL)
            channel = frame[start:frame.find(b'"', start)].decode()
            update = b'"event":"update"' in frame or (channel == OBU and b'"event"' not in frame)
        else:  # keys in another order or spacing: read the envelope first
            env = _control.decode(frame)
            if env.error is not None:
                raise Malformed("exchange_error", str(env.error)[:200])
            channel = env.channel
            update = env.event == "update" or (channel == OBU and env.event == "")
        if not update:
            return self._control(frame)  # subscribe answers, pongs, errors
        if channel in (V1_CHANNEL, OBU):
            r = _update.decode(frame).result
            if channel == OBU:
                stream = r.s
                native, _, level = stream[3:].rpartition(".")
                if not stream.startswith("ob.") or not native or not level.isdigit():
                    raise Malformed("bad_stream", stream)
                return (BookMsg(native, BookPush(True, r, int(level))),)
            depth = int(r.l) if r.l and r.l.isdigit() else self.depth
            return (BookMsg(r.s, BookPush(False, r, depth)),)
        if channel == "spot.trades":
            t = _trade.decode(frame).result
            if t.side not in ("buy", "sell"):
                raise Malformed("bad_side", t.side)
            return (TradeMsg(t.currency_pair, str(t.id), t.price, t.amount, "buy" if t.side == "buy" else "sell",
                             _ns(t.create_time_ms)),)
        ensure_json(frame)
        return ()  # tickers, candlesticks and other channels

    @staticmethod
    def _control(frame: bytes) -> Sequence[Event]:
        msg = _control.decode(frame)
        if msg.error is not None:
            raise Malformed("exchange_error", str(msg.error)[:200])
        if not msg.channel:
            raise Malformed("unknown_message")
        return ()  # subscribe acknowledgements, pongs, tickers and other channels

    def decode_rest(self, url: str, body: bytes) -> Sequence[Event]:
        parts = urlsplit(url)
        if parts.path.endswith("/spot/order_book"):
            pair = parse_qs(parts.query).get("currency_pair", [None])[0]
            return (SnapshotMsg(pair, _snapshot.decode(body)),)
        if parts.path.endswith("/spot/currency_pairs"):
            return (InstrumentsMsg(parse_currency_pairs(body, self.DEFAULT_FEES)),)
        return ()
