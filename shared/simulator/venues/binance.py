"""Binance spot as the simulator speaks it.

- WebSocket ``/stream`` (combined frames ``{"stream","data"}``, streams from ``?streams=``
  or ``SUBSCRIBE``) and ``/ws`` (raw payloads); ``SUBSCRIBE``/``UNSUBSCRIBE`` are answered
  ``{"result":null,"id":..}``; the server pings every 20 s.
- ``GET /api/v3/depth``: the first request for a symbol gets its recorded snapshot body
  byte for byte; later ones get the book the exchange has at that point of the recording:
  the recorded snapshot moved forward by every diff played since (``u > lastUpdateId``),
  with ``lastUpdateId`` = the last diff's ``u``.
- Other REST paths (``exchangeInfo``) come from recorded bodies.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, Simulator, SimVenue

STREAM_PREFIX = b'{"stream":"'


class BinanceSim(SimVenue):
    name = "binance"
    ws_paths = ("/stream", "/ws", "/ws/{stream}")
    server_ping_s = 20.0

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.recorded: dict[str, bytes] = {}
        self.served: set[str] = set()
        self.books: dict[str, LevelBook] = {}
        symbols = {self._symbol(r.data) for r in records if r.kind == "ws" and b"depthUpdate" in r.data[:80]}
        symbols.discard(None)
        for r in records:
            symbol: str | None = None
            if r.kind == "rest" and urlsplit(r.url).path.endswith("/depth"):
                symbol = parse_qs(urlsplit(r.url).query).get("symbol", [""])[0]
            elif r.kind in ("ws", "rest") and r.data.startswith(b'{"lastUpdateId"') and len(symbols) == 1:
                symbol = next(iter(symbols))  # hftbacktest: one symbol per file, body without URL
            if symbol and symbol not in self.recorded:
                self.recorded[symbol] = r.data
                snap = json.loads(r.data)
                book = self.books[symbol] = LevelBook()
                book.load(snap["bids"], snap["asks"], snap["lastUpdateId"])

    @staticmethod
    def _symbol(frame: bytes) -> str | None:
        try:
            data = json.loads(frame).get("data", {})
        except ValueError:
            return None
        s = data.get("s") if isinstance(data, dict) else None
        return s if isinstance(s, str) else None

    # ------------------------------------------------------------------ WebSocket

    def on_open(self, conn: Connection) -> None:
        path = conn.request.path
        conn.options["raw"] = path == "/ws" or path.startswith("/ws/")
        streams = conn.request.query.get("streams") or conn.request.match_info.get("stream")
        if streams:
            conn.keys.update(streams.split("/"))

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            conn.send('{"error":{"code":3,"msg":"Invalid JSON"}}')
            return
        method, params, req_id = msg.get("method"), msg.get("params") or [], msg.get("id")
        if method == "SUBSCRIBE":
            conn.keys.update(params)
        elif method == "UNSUBSCRIBE":
            conn.keys.difference_update(params)
        elif method == "LIST_SUBSCRIPTIONS":
            conn.send(json.dumps({"result": sorted(map(str, conn.keys)), "id": req_id}))
            return
        else:
            conn.send(json.dumps({"error": {"code": 2, "msg": f"Invalid request: unknown method {method}"},
                                  "id": req_id}))
            return
        conn.send(json.dumps({"result": None, "id": req_id}))

    def route(self, frame: bytes) -> Key | None:
        if not frame.startswith(STREAM_PREFIX):
            return None
        end = frame.find(b'"', len(STREAM_PREFIX))
        return frame[len(STREAM_PREFIX):end].decode()

    def render(self, conn: Connection, frame: bytes) -> bytes | str:
        if conn.options.get("raw"):
            return json.dumps(json.loads(frame)["data"], separators=(",", ":"))
        return frame

    def observe(self, frame: bytes) -> None:
        if b'"depthUpdate"' not in frame[:120]:
            return
        data = json.loads(frame).get("data", {})
        book = self.books.get(data.get("s"))
        if book is not None and data["u"] > book.seq:
            book.apply(data["b"], data["a"], data["u"])

    # ------------------------------------------------------------------ REST

    def routes(self, app: web.Application, sim: Simulator) -> None:
        async def depth(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            symbol = request.query.get("symbol", "")
            limit = int(request.query.get("limit", "100"))
            if symbol not in self.books:
                return web.json_response({"code": -1121, "msg": "Invalid symbol."}, status=400)
            if symbol not in self.served:
                self.served.add(symbol)
                return web.Response(body=self.recorded[symbol], content_type="application/json")
            book = self.books[symbol]
            bids, asks = book.top(limit)
            body = {"lastUpdateId": book.seq, "bids": [list(b[:2]) for b in bids], "asks": [list(a[:2]) for a in asks]}
            return web.Response(body=json.dumps(body, separators=(",", ":")), content_type="application/json")

        async def ping(_: web.Request) -> web.StreamResponse:
            return web.json_response({})

        app.router.add_get("/api/v3/depth", depth)
        app.router.add_get("/api/v3/ping", ping)
