"""OKX v5 public as the simulator speaks it.

- WebSocket ``/ws/v5/public``: ``{"op":"subscribe"|"unsubscribe","args":[{"channel","instId"}]}``
  answered per argument with ``{"event":"subscribe","arg":{..},"connId":..}``; text
  ``ping`` answered ``pong``.
- Book channels: a subscription made after the recording has passed a book's snapshot
  starts with a fresh snapshot of the simulated exchange's state (original strings, the
  checksum computed as OKX documents it, ``seqId`` carried over when the recording has one),
  as the exchange sends one on every (re)subscription.
- ``corrupt_checksum`` shifts a frame's ``checksum`` by one.
- REST: recorded ``/api/v5/public/instruments`` bodies.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from shared.simulator.levels import LevelBook
from shared.simulator.server import Connection, Key, SimVenue

BOOK_CHANNELS = {"books", "books-l2-tbt", "books50-l2-tbt", "books5"}
CHECKSUM = re.compile(rb'"checksum":(-?\d+)')


def okx_checksum(bids: list[Any], asks: list[Any]) -> int:
    parts = []
    for i in range(25):
        if i < len(bids):
            parts.append(f"{bids[i][0]}:{bids[i][1]}")
        if i < len(asks):
            parts.append(f"{asks[i][0]}:{asks[i][1]}")
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


class OkxSim(SimVenue):
    name = "okx"
    ws_paths = ("/ws/v5/public",)

    def __init__(self, records: Any) -> None:
        super().__init__(records)
        self.books: dict[tuple[str, str], LevelBook] = {}
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        if text == "ping":
            conn.send("pong")
            return
        try:
            msg = json.loads(text)
            op, args = msg["op"], msg["args"]
        except (ValueError, KeyError, TypeError):
            conn.send(json.dumps({"event": "error", "code": "60012", "msg": f"Invalid request: {text[:100]}"}))
            return
        for arg in args:
            key = (arg.get("channel", ""), arg.get("instId", ""))
            conn.send(json.dumps({"event": op, "arg": arg, "connId": conn.id}))
            if op == "subscribe":
                if key[0] in BOOK_CHANNELS and key in self.books:
                    conn.send(self._snapshot(key))
                conn.keys.add(key)
            elif op == "unsubscribe":
                conn.keys.discard(key)

    def _snapshot(self, key: tuple[str, str]) -> str:
        book = self.books[key]
        bids, asks = book.top(400)
        meta = self.meta.get(key, {})
        data: dict[str, Any] = {"asks": asks, "bids": bids, "ts": meta.get("ts", "0"),
                                "checksum": okx_checksum(bids, asks)}
        if "seqId" in meta:
            data["prevSeqId"] = -1
            data["seqId"] = meta["seqId"]
        return json.dumps({"arg": {"channel": key[0], "instId": key[1]}, "action": "snapshot", "data": [data]},
                          separators=(",", ":"))

    def route(self, frame: bytes) -> Key | None:
        if not frame.startswith(b'{"arg":'):
            return None
        arg = json.loads(frame).get("arg", {})
        return (arg.get("channel", ""), arg.get("instId", ""))

    def observe(self, frame: bytes) -> None:
        if b'"action"' not in frame:
            return
        msg = json.loads(frame)
        key = (msg["arg"]["channel"], msg["arg"]["instId"])
        for d in msg.get("data", ()):
            if msg["action"] == "snapshot":
                self.books[key] = LevelBook()
                self.books[key].load(d["bids"], d["asks"], 0)
            elif key in self.books:
                self.books[key].apply(d["bids"], d["asks"], 0)
            else:
                continue
            self.meta[key] = {k: d[k] for k in ("ts", "seqId") if k in d}

    def corrupt_checksum(self, frame: bytes) -> bytes:
        def bump(m: re.Match[bytes]) -> bytes:
            value = int(m.group(1))
            return b'"checksum":%d' % (value + 1 if value < 2**31 - 1 else value - 1)

        corrupted, n = CHECKSUM.subn(bump, frame)
        if not n:
            raise ValueError("frame has no checksum")
        return corrupted
