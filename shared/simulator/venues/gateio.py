"""Gate spot (WebSocket v4) as the simulator speaks it.

- WebSocket ``/ws/v4/``: ``{"time","channel","event":"subscribe"|"unsubscribe","payload"}``
  answered ``{"time","time_ms","channel","event","error":null,"result":{"status":"success"}}``;
  ``spot.ping`` answered ``spot.pong``.
- ``spot.order_book_update`` (``[pair, "100ms"]``) and ``spot.trades`` (``[pairs]``) get the
  recorded pushes as they are.
- ``spot.obu`` (``["ob.<pair>.400"]``, Gate's V2 book): the recordings are V1, so a V2
  subscription gets what the V2 documentation describes for the same book: first a full push
  (``full: true``) of the simulated exchange's book, then each recorded V1 push of that pair
  with the V2 field set (``s`` = the stream name, the same ``U``/``u``, ``b``, ``a``).
- ``GET /api/v4/spot/order_book?..&with_id=true``: the first request for a pair gets its
  recorded body byte for byte; later ones the recorded snapshot moved forward by every push
  played since (``id`` = the last push's ``u``).
- Other REST paths (``currency_pairs``) come from recorded bodies.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, Simulator, SimVenue

V1 = "spot.order_book_update"
OBU = "spot.obu"
CHANNEL = b'"channel":"'


def channel_of(frame: bytes) -> str:
    at = frame.find(CHANNEL, 0, 80)
    if at < 0:
        return ""
    start = at + len(CHANNEL)
    return frame[start:frame.find(b'"', start)].decode()


class GateioSim(SimVenue):
    name = "gateio"
    ws_paths = ("/ws/v4/",)

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.recorded: dict[str, bytes] = {}
        self.served: set[str] = set()
        self.books: dict[str, LevelBook] = {}
        self.times: dict[str, int] = {}
        for r in records:
            if r.kind != "rest" or not urlsplit(r.url).path.endswith("/spot/order_book"):
                continue
            pair = parse_qs(urlsplit(r.url).query).get("currency_pair", [""])[0]
            if pair and pair not in self.recorded:
                self.recorded[pair] = r.data
                snap = json.loads(r.data)
                self.books[pair] = LevelBook()
                self.books[pair].load(snap["bids"], snap["asks"], snap["id"])

    # ------------------------------------------------------------------ WebSocket

    @staticmethod
    def _reply(channel: str, event: str, error: Any = None) -> str:
        now = time.time()
        return json.dumps({"time": int(now), "time_ms": int(now * 1000), "channel": channel, "event": event,
                           "error": error, "result": None if error else {"status": "success"}})

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
            channel, event, payload = msg["channel"], msg.get("event", ""), msg.get("payload") or []
        except (ValueError, KeyError, TypeError):
            conn.send(self._reply("", "", {"code": 1, "message": "Invalid request body format"}))
            return
        if channel == "spot.ping":
            conn.send(self._reply("spot.pong", ""))
            return
        if abs(int(msg.get("time", 0)) - time.time()) > 60:
            conn.send(self._reply(channel, event, {"code": 2, "message": "time out of range"}))
            return
        keys: list[tuple[str, str]] = []
        if channel == V1 and payload:
            keys = [(V1, payload[0])]
        elif channel == "spot.trades":
            keys = [("spot.trades", pair) for pair in payload]
        elif channel == OBU:
            for stream in payload:
                pair, _, level = str(stream)[3:].rpartition(".")
                keys.append((V1, pair))  # the recorded V1 pushes feed the V2 stream
                obu = conn.options.setdefault("obu", {})
                if event == "subscribe":
                    obu[pair] = int(level) if level.isdigit() else 400
                else:
                    obu.pop(pair, None)
        else:
            conn.send(self._reply(channel, event, {"code": 2, "message": f"unknown channel {channel}"}))
            return
        conn.send(self._reply(channel, event))
        for key in keys:
            if event == "subscribe":
                conn.keys.add(key)
                if channel == OBU and key[1] in self.books:
                    conn.send(self._full(key[1], conn.options["obu"][key[1]]))
            elif event == "unsubscribe":
                conn.keys.discard(key)

    def _full(self, pair: str, level: int) -> str:
        book = self.books[pair]
        bids, asks = book.top(level)
        return json.dumps({"channel": OBU, "result": {
            "t": self.times.get(pair, 0), "full": True, "s": f"ob.{pair}.{level}", "u": book.seq,
            "b": [list(b[:2]) for b in bids], "a": [list(a[:2]) for a in asks]}, "time_ms": int(time.time() * 1000)},
            separators=(",", ":"))

    def route(self, frame: bytes) -> Key | None:
        channel = channel_of(frame)
        if channel == V1 and b'"event":"update"' in frame:
            return (V1, json.loads(frame)["result"]["s"])
        if channel == "spot.trades" and b'"event":"update"' in frame:
            return ("spot.trades", json.loads(frame)["result"]["currency_pair"])
        return None

    def render(self, conn: Connection, frame: bytes) -> bytes | str:
        obu = conn.options.get("obu")
        if not obu or channel_of(frame) != V1:
            return frame
        msg = json.loads(frame)
        r = msg["result"]
        level = obu.get(r["s"])
        if level is None:
            return frame
        result = {"t": r.get("t", 0), "s": f"ob.{r['s']}.{level}", "U": r["U"], "u": r["u"], "b": r["b"], "a": r["a"]}
        return json.dumps({"channel": OBU, "result": result, "time_ms": msg.get("time_ms", r.get("t", 0))},
                          separators=(",", ":"))

    def observe(self, frame: bytes) -> None:
        if channel_of(frame) != V1 or b'"event":"update"' not in frame:
            return
        r = json.loads(frame)["result"]
        book = self.books.get(r["s"])
        if book is None or r["u"] <= book.seq:
            return
        book.apply(r["b"], r["a"], r["u"])
        self.times[r["s"]] = r.get("t", 0)

    # ------------------------------------------------------------------ REST

    def routes(self, app: web.Application, sim: Simulator) -> None:
        async def order_book(request: web.Request) -> web.StreamResponse:
            sim.rest_requests.append(request.path_qs)
            pair = request.query.get("currency_pair", "")
            if pair not in self.books:
                return web.json_response({"label": "INVALID_CURRENCY_PAIR", "message": pair}, status=400)
            if pair not in self.served:
                self.served.add(pair)
                return web.Response(body=self.recorded[pair], content_type="application/json")
            book = self.books[pair]
            bids, asks = book.top(int(request.query.get("limit", "10")))
            now = int(time.time() * 1000)
            body = {"id": book.seq, "current": now, "update": self.times.get(pair, now),
                    "asks": [list(a[:2]) for a in asks], "bids": [list(b[:2]) for b in bids]}
            return web.Response(body=json.dumps(body, separators=(",", ":")), content_type="application/json")

        app.router.add_get("/api/v4/spot/order_book", order_book)
