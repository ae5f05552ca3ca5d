"""Bitget public WebSocket as the simulator speaks it.

- ``/v2/ws/public`` (today's API) and ``/spot/v1/stream``, ``/mix/v1/stream`` (the retired v1
  the recordings were made on): ``{"op":"subscribe"|"unsubscribe","args":[{"instType",
  "channel","instId"}]}`` answered per argument ``{"event":..,"arg":{..}}``; text ``ping``
  answered ``pong``.
- v1 clients get the recorded pushes as they are. A v2 client gets the same pushes with v2's
  field set: ``instType`` ``SPOT`` (``USDT-FUTURES`` for the recorded mix books) and a top-level
  ``ts``; books and checksums are untouched (v1 had no ``seq``, so none is added), and trades
  keep v1's array rows (they have no trade id to give).
- ``books``: a subscription made after the recording has passed a book's snapshot starts with
  a fresh snapshot of the simulated exchange's book (original strings, checksum computed as
  Bitget documents it, the same as OKX's), as the exchange sends one on every subscription.
- ``corrupt_checksum`` shifts a push's ``checksum`` by one.
- ``GET /api/v2/spot/public/symbols``: the recordings have v1's product list
  (``/api/spot/v1/public/products``), served for both (the collector reads either shape).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, Simulator, SimVenue
from shared.simulator.venues.okx import okx_checksum

CHECKSUM = re.compile(rb'"checksum":(-?\d+)')
V2_INST_TYPES = {"sp": "SPOT", "mc": "USDT-FUTURES"}
CHANNEL = b'"channel":"'


class BitgetSim(SimVenue):
    name = "bitget"
    ws_paths = ("/v2/ws/public", "/spot/v1/stream", "/mix/v1/stream")

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.books: dict[str, LevelBook] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def on_open(self, conn: Connection) -> None:
        conn.options["v2"] = conn.request.path.startswith("/v2/")

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        if text == "ping":
            conn.send("pong")
            return
        try:
            msg = json.loads(text)
            op, args = msg["op"], msg["args"]
        except (ValueError, KeyError, TypeError):
            conn.send(json.dumps({"event": "error", "code": 30001, "msg": f"Invalid request: {text[:100]}"}))
            return
        for arg in args:
            key = (arg.get("channel", ""), arg.get("instId", ""))
            conn.send(json.dumps({"event": op, "arg": arg}))
            if op == "subscribe":
                if key[0] == "books" and key[1] in self.books:
                    conn.send(self.render(conn, self._snapshot(key[1])))
                conn.keys.add(key)
            elif op == "unsubscribe":
                conn.keys.discard(key)

    def _snapshot(self, inst: str) -> bytes:
        book = self.books[inst]
        bids, asks = book.top()
        meta = self.meta[inst]
        data = {"asks": [list(a[:2]) for a in asks], "bids": [list(b[:2]) for b in bids],
                "checksum": okx_checksum(bids, asks), "ts": meta["ts"]}
        return json.dumps({"action": "snapshot", "arg": {"instType": meta["instType"], "channel": "books",
                                                         "instId": inst}, "data": [data]},
                          separators=(",", ":")).encode()

    def route(self, frame: bytes) -> Key | None:
        if not frame.startswith(b'{"action"'):
            return None
        arg = json.loads(frame).get("arg", {})
        return (arg.get("channel", ""), arg.get("instId", ""))

    def render(self, conn: Connection, frame: bytes) -> bytes | str:
        if not conn.options.get("v2"):
            return frame
        msg = json.loads(frame)
        arg = msg.get("arg", {})
        arg["instType"] = V2_INST_TYPES.get(arg.get("instType", ""), arg.get("instType", ""))
        data = msg.get("data") or []
        first = data[0] if data else None
        if isinstance(first, dict) and "ts" in first:
            msg["ts"] = int(first["ts"])
        elif isinstance(first, list) and first:
            msg["ts"] = int(first[0])
        return json.dumps(msg, separators=(",", ":"))

    def observe(self, frame: bytes) -> None:
        if not frame.startswith(b'{"action"') or b'"channel":"books"' not in frame[:120]:
            return
        msg = json.loads(frame)
        inst = msg["arg"]["instId"]
        for d in msg.get("data", ()):
            if msg["action"] == "snapshot":
                self.books[inst] = LevelBook()
                self.books[inst].load(d["bids"], d["asks"], 0)
            elif inst in self.books:
                self.books[inst].apply(d["bids"], d["asks"], 0)
            else:
                continue
            self.meta[inst] = {"ts": d["ts"], "instType": msg["arg"]["instType"]}

    def corrupt_checksum(self, frame: bytes) -> bytes:
        def bump(m: re.Match[bytes]) -> bytes:
            value = int(m.group(1))
            return b'"checksum":%d' % (value + 1 if value < 2**31 - 1 else value - 1)

        corrupted, n = CHECKSUM.subn(bump, frame)
        if not n:
            raise ValueError("frame has no checksum")
        return corrupted

    def routes(self, app: web.Application, sim: Simulator) -> None:
        async def symbols(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            body = next((r.data for r in self.records if r.kind == "rest"
                         and urlsplit(r.url).path.endswith("/api/spot/v1/public/products")), None)
            if body is None:
                return web.json_response({"code": "40404", "msg": "not recorded"}, status=404)
            return web.Response(body=body, content_type="application/json")

        app.router.add_get("/api/v2/spot/public/symbols", symbols)
