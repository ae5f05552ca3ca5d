"""Upbit as the simulator speaks it.

- WebSocket ``/websocket/v1``: the client sends one JSON array
  (``[{"ticket"},{"type","codes"},...,{"format"}]``); Upbit sends no acknowledgement.
  Frames go out binary. Codes may carry a ``.N`` level-count suffix. Text ``PING`` is
  answered ``{"status":"UP"}``.
- Formats: a client asking for the other format than the recording's gets the same
  messages with the field names of that format (Upbit documents both name sets for the
  same fields; values are untouched). The recordings we have are SIMPLE.
- REST: recorded ``/v1/market/all``; ``/v1/orderbook/instruments`` when given a body.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from shared.simulator.server import Connection, Key, SimVenue

# SIMPLE <-> DEFAULT field names for the orderbook and trade messages (docs.upbit.com).
SIMPLE_TO_DEFAULT = {
    "ty": "type", "cd": "code", "tms": "timestamp", "tas": "total_ask_size", "tbs": "total_bid_size",
    "obu": "orderbook_units", "ap": "ask_price", "bp": "bid_price", "as": "ask_size", "bs": "bid_size",
    "lv": "level", "st": "stream_type", "td": "trade_date", "ttm": "trade_time", "ttms": "trade_timestamp",
    "tp": "trade_price", "tv": "trade_volume", "ab": "ask_bid", "pcp": "prev_closing_price", "c": "change",
    "cp": "change_price", "sid": "sequential_id", "bac": "best_ask_price", "bas": "best_ask_size",
    "bbp": "best_bid_price", "bbs": "best_bid_size",
}
DEFAULT_TO_SIMPLE = {v: k for k, v in SIMPLE_TO_DEFAULT.items()}


def rename(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {names.get(k, k): rename(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [rename(v, names) for v in value]
    return value


class UpbitSim(SimVenue):
    name = "upbit"
    ws_paths: Sequence[str] = ("/websocket/v1",)
    binary_frames = True

    def on_message(self, conn: Connection, data: str | bytes) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        if text == "PING":
            conn.send('{"status":"UP"}', binary=True)
            return
        try:
            request = json.loads(text)
            if not isinstance(request, list):
                raise ValueError
        except ValueError:
            conn.send('{"error":{"name":"WRONG_FORMAT","message":"요청 형식 위반"}}', binary=True)
            return
        conn.options["format"] = "DEFAULT"
        for part in request:
            if "format" in part:
                conn.options["format"] = str(part["format"]).upper()
            elif "type" in part:
                for code in part.get("codes", ()):
                    conn.keys.add((part["type"], str(code).split(".")[0]))

    def route(self, frame: bytes) -> Key | None:
        try:
            msg = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(msg, dict):
            return None
        kind, code = msg.get("ty", msg.get("type")), msg.get("cd", msg.get("code"))
        return (kind, code) if kind and code else None

    def render(self, conn: Connection, frame: bytes) -> bytes | str:
        simple = frame.startswith(b'{"ty"')
        wanted = conn.options.get("format", "DEFAULT")
        if wanted.startswith("SIMPLE") == simple:
            return frame
        names = DEFAULT_TO_SIMPLE if simple is False else SIMPLE_TO_DEFAULT
        return json.dumps(rename(json.loads(frame), names), separators=(",", ":"), ensure_ascii=False)
