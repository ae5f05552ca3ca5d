"""Bybit v5 public as the simulator speaks it.

- WebSocket ``/v5/public/spot`` (and ``/v5/public/linear``, which the recordings include):
  ``{"op":"subscribe"|"unsubscribe","args":[topics],"req_id":..}`` answered
  ``{"success":true,"ret_msg":"<op>","conn_id":..,"req_id":..,"op":..}``; ``{"op":"ping"}``
  answered with ``ret_msg`` ``pong``.
- Order-book topics: a subscription made after the recording has passed the topic's
  snapshot starts with a snapshot of the simulated exchange's state (same ``u``), as Bybit
  sends one on every subscription.
- REST: recorded bodies (``/v5/market/instruments-info``) or ones given to the simulator.
"""

from __future__ import annotations

import json
from typing import Any

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, SimVenue


class BybitSim(SimVenue):
    name = "bybit"
    ws_paths = ("/v5/public/spot", "/v5/public/linear")

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.books: dict[str, LevelBook] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        try:
            msg = json.loads(data)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            conn.send(json.dumps({"success": False, "ret_msg": "error:invalid request", "conn_id": conn.id}))
            return
        reply = {"success": True, "ret_msg": op, "conn_id": conn.id, "req_id": msg.get("req_id", ""), "op": op}
        if op == "ping":
            reply["ret_msg"] = "pong"
            conn.send(json.dumps(reply))
            return
        conn.send(json.dumps(reply))
        for topic in msg.get("args", ()):
            if op == "subscribe":
                if topic.startswith("orderbook.") and topic in self.books:
                    conn.send(self._snapshot(topic))
                conn.keys.add(topic)
            elif op == "unsubscribe":
                conn.keys.discard(topic)

    def _snapshot(self, topic: str) -> str:
        book = self.books[topic]
        depth = int(topic.split(".")[1])
        bids, asks = book.top(depth)
        meta = self.meta[topic]
        return json.dumps({
            "topic": topic, "type": "snapshot", "ts": meta["ts"],
            "data": {"s": meta["s"], "b": [b[:2] for b in bids], "a": [a[:2] for a in asks], "u": book.seq,
                     "seq": meta.get("seq", 0)},
            "cts": meta.get("cts", meta["ts"]),
        }, separators=(",", ":"))

    def route(self, frame: bytes) -> Key | None:
        if not frame.startswith(b'{"topic":"'):
            return None
        return frame[len(b'{"topic":"'):frame.find(b'"', len(b'{"topic":"'))].decode()

    def observe(self, frame: bytes) -> None:
        if not frame.startswith(b'{"topic":"orderbook.'):
            return
        msg = json.loads(frame)
        topic, d = msg["topic"], msg["data"]
        if msg["type"] == "snapshot" or d["u"] == 1:
            self.books[topic] = LevelBook()
            self.books[topic].load(d["b"], d["a"], d["u"])
        elif topic in self.books:
            self.books[topic].apply(d["b"], d["a"], d["u"])
        else:
            return
        self.meta[topic] = {"ts": msg["ts"], "cts": msg.get("cts", msg["ts"]), "s": d["s"], "seq": d.get("seq", 0)}
