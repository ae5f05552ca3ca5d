"""KuCoin spot as the simulator speaks it.

- ``POST /api/v1/bullet-public`` hands out a token and this simulator's ``/endpoint`` as the
  instance server (``pingInterval`` 18 s). A connection to ``/endpoint?token=..`` with a token
  we did not hand out gets an error and is closed; a good one is greeted ``welcome``.
- ``{"id","type":"subscribe"|"unsubscribe","topic":"/market/level2:A,B"}`` is acknowledged
  ``{"id","type":"ack"}``; ``{"id","type":"ping"}`` answered ``pong``.
- ``GET /api/v3/market/orderbook/level2`` (the full book) needs the ``KC-API-*`` headers
  (checked against ``api_secret`` when one is set); the first request for a symbol gets its
  recorded body byte for byte, later ones the recorded snapshot moved forward by every
  increment played since. ``GET /api/v1/market/orderbook/level2_20|100`` (public, partial)
  gives the top of that same book.
- ``/api/v2/symbols``: the recordings have the v1 list (``/api/v1/symbols``), whose fields the
  collector reads are the same; it is served for both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, Simulator, SimVenue

TOPIC = b'"topic":"'
KEY_HEADERS = ("KC-API-KEY", "KC-API-SIGN", "KC-API-TIMESTAMP", "KC-API-PASSPHRASE")


def topic_of(frame: bytes) -> str | None:
    at = frame.find(TOPIC, 0, 64)
    if at < 0:
        at = frame.rfind(TOPIC)
    if at < 0:
        return None
    start = at + len(TOPIC)
    return frame[start:frame.find(b'"', start)].decode()


class KucoinSim(SimVenue):
    name = "kucoin"
    ws_paths = ("/endpoint",)

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.api_secret: str | None = None
        """When set, signed requests must carry a valid KC-API-SIGN for this secret."""
        self.tokens: set[str] = set()
        self.recorded: dict[str, bytes] = {}
        self.served: set[str] = set()
        self.books: dict[str, LevelBook] = {}
        self.times: dict[str, int] = {}
        for r in records:
            if r.kind != "rest" or not urlsplit(r.url).path.endswith("/api/v3/market/orderbook/level2"):
                continue
            symbol = parse_qs(urlsplit(r.url).query).get("symbol", [""])[0]
            if symbol and symbol not in self.recorded:
                self.recorded[symbol] = r.data
                data = json.loads(r.data)["data"]
                self.books[symbol] = LevelBook()
                self.books[symbol].load(data["bids"], data["asks"], int(data["sequence"]))
                self.times[symbol] = int(data.get("time") or 0)

    # ------------------------------------------------------------------ WebSocket

    def on_open(self, conn: Connection) -> None:
        query = conn.request.query
        if query.get("token") not in self.tokens:
            conn.send(json.dumps({"id": query.get("connectId", ""), "type": "error", "code": 401,
                                  "data": "token is invalid"}))
            conn.close()
            return
        conn.send(json.dumps({"id": query.get("connectId", conn.id), "type": "welcome"}))

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
            kind, req_id = msg["type"], msg.get("id", "")
        except (ValueError, KeyError, TypeError):
            conn.send(json.dumps({"id": "", "type": "error", "code": 400, "data": "invalid request"}))
            return
        if kind == "ping":
            conn.send(json.dumps({"id": req_id, "type": "pong"}))
            return
        if kind not in ("subscribe", "unsubscribe") or ":" not in str(msg.get("topic", "")):
            conn.send(json.dumps({"id": req_id, "type": "error", "code": 404, "data": f"unknown request {kind}"}))
            return
        channel, _, symbols = msg["topic"].partition(":")
        keys = {f"{channel}:{s.strip()}" for s in symbols.split(",") if s.strip()}
        if kind == "subscribe":
            conn.keys.update(keys)
        else:
            conn.keys.difference_update(keys)
        if msg.get("response"):
            conn.send(json.dumps({"id": req_id, "type": "ack"}))

    def route(self, frame: bytes) -> Key | None:
        return topic_of(frame)

    def observe(self, frame: bytes) -> None:
        topic = topic_of(frame)
        if topic is None or not topic.startswith("/market/level2:"):
            return
        d = json.loads(frame)["data"]
        book = self.books.get(d["symbol"])
        if book is None or d["sequenceEnd"] <= book.seq:
            return
        changes = d["changes"]
        seq = book.seq
        book.apply([c for c in changes["bids"] if int(c[2]) > seq and c[0] != "0"],
                   [c for c in changes["asks"] if int(c[2]) > seq and c[0] != "0"], d["sequenceEnd"])
        if d.get("time"):
            self.times[d["symbol"]] = d["time"]

    # ------------------------------------------------------------------ REST

    def _signed(self, request: web.Request) -> str | None:
        """Why the request's key headers are not acceptable, or None when they are."""
        if any(not request.headers.get(h) for h in KEY_HEADERS):
            return "Please check the header of your request for KC-API-KEY, KC-API-SIGN, KC-API-TIMESTAMP, " \
                   "KC-API-PASSPHRASE"
        stamp = request.headers["KC-API-TIMESTAMP"]
        if not stamp.isdigit() or abs(int(stamp) - time.time() * 1000) > 5000:
            return "Invalid KC-API-TIMESTAMP"
        if self.api_secret is not None:
            payload = f"{stamp}{request.method}{request.path_qs}".encode()
            digest = hmac.new(self.api_secret.encode(), payload, hashlib.sha256).digest()
            if not hmac.compare_digest(base64.b64encode(digest).decode(), request.headers["KC-API-SIGN"]):
                return "Signature verification failed"
        return None

    def _book_body(self, symbol: str, depth: int | None) -> bytes:
        book = self.books[symbol]
        bids, asks = book.top(depth)
        data = {"time": self.times.get(symbol, 0), "sequence": str(book.seq),
                "bids": [list(b[:2]) for b in bids], "asks": [list(a[:2]) for a in asks]}
        return json.dumps({"code": "200000", "data": data}, separators=(",", ":")).encode()

    def routes(self, app: web.Application, sim: Simulator) -> None:
        async def bullet(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            token = uuid.uuid4().hex
            self.tokens.add(token)
            server = {"endpoint": f"ws://{request.host}/endpoint", "encrypt": False, "protocol": "websocket",
                      "pingInterval": 18000, "pingTimeout": 10000}
            return web.json_response({"code": "200000", "data": {"token": token, "instanceServers": [server]}})

        async def full_book(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            refused = self._signed(request)
            if refused is not None:
                return web.json_response({"code": "400001", "msg": refused}, status=401)
            symbol = request.query.get("symbol", "")
            if symbol not in self.books:
                return web.json_response({"code": "400100", "msg": "symbol not exists"}, status=400)
            if symbol not in self.served:
                self.served.add(symbol)
                return web.Response(body=self.recorded[symbol], content_type="application/json")
            return web.Response(body=self._book_body(symbol, None), content_type="application/json")

        async def part_book(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            depth = request.match_info["depth"]
            symbol = request.query.get("symbol", "")
            if depth not in ("20", "100") or symbol not in self.books:
                return web.json_response({"code": "400100", "msg": "symbol not exists"}, status=400)
            return web.Response(body=self._book_body(symbol, int(depth)), content_type="application/json")

        async def symbols(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            body = next((r.data for r in self.records if r.kind == "rest"
                         and urlsplit(r.url).path.endswith(("/api/v1/symbols", "/api/v2/symbols"))), None)
            if body is None:
                return web.json_response({"code": "404000", "msg": "not recorded"}, status=404)
            return web.Response(body=body, content_type="application/json")

        app.router.add_post("/api/v1/bullet-public", bullet)
        app.router.add_get("/api/v3/market/orderbook/level2", full_book)
        app.router.add_get("/api/v1/market/orderbook/level2_{depth}", part_book)
        app.router.add_get("/api/v1/symbols", symbols)
        app.router.add_get("/api/v2/symbols", symbols)
