"""Bithumb as the simulator speaks it: the current API (Upbit's protocol) and the legacy feed.

- ``/websocket/v1``: Bithumb's current public WebSocket is Upbit's protocol (request array,
  ``DEFAULT``/``SIMPLE`` formats, binary frames), so it is served exactly as ``UpbitSim``
  serves it. We have no recording of Bithumb's current API: its socket tests play Upbit's
  recorded frames through it.
- ``/pub/ws`` (legacy API 1.0): greets ``{"status":"0000","resmsg":"Connected Successfully"}``;
  ``{"type":"orderbookdepth"|"transaction"|"ticker","symbols":[..]}`` is answered
  ``Filter Registered Successfully`` (``5100 Invalid Filter Syntax`` otherwise). Recorded
  pushes go out in binary frames on both paths (the legacy server sent text; a client reads
  the same bytes either way).
- REST: recorded bodies (``/public/ticker/ALL_KRW``, ``/v1/market/all``).
"""

from __future__ import annotations

import json
from typing import Any

from shared.simulator.server import Connection, Key
from shared.simulator.venues.upbit import UpbitSim

LEGACY_PATH = "/pub/ws"
LEGACY_TYPES = ("orderbookdepth", "transaction", "ticker")


class BithumbSim(UpbitSim):
    name = "bithumb"
    ws_paths = ("/websocket/v1", LEGACY_PATH)

    def on_open(self, conn: Connection) -> None:
        conn.options["legacy"] = conn.request.path == LEGACY_PATH
        if conn.options["legacy"]:
            conn.send('{"status":"0000","resmsg":"Connected Successfully"}')

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        if not conn.options.get("legacy"):
            super().on_message(conn, data)
            return
        try:
            msg = json.loads(data)
            kind, symbols = msg["type"], msg["symbols"]
            if kind not in LEGACY_TYPES or not isinstance(symbols, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            conn.send('{"status":"5100","resmsg":"Invalid Filter Syntax"}')
            return
        conn.keys.update((kind, str(s)) for s in symbols)
        conn.send('{"status":"0000","resmsg":"Filter Registered Successfully"}')

    def route(self, frame: bytes) -> Key | None:
        if frame.startswith(b'{"type":"') and b'"content":' in frame[:40]:
            try:
                msg: Any = json.loads(frame)
                content = msg["content"]
                first = content["list"][0] if "list" in content else content
                return (msg["type"], first["symbol"])
            except (ValueError, KeyError, TypeError, IndexError):
                return None
        return super().route(frame)
