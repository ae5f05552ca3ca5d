"""Read-only views of streams and groups, for /health, `arb status` and the lag metrics."""

from __future__ import annotations

from typing import Any

import msgspec
import redis.exceptions as rexc

from shared.runtime.bus import Bus

_LAG_SCAN_LIMIT = 100_000


class GroupStats(msgspec.Struct):
    stream: str
    group: str
    consumers: int
    pending: int
    lag: int
    """Entries not yet delivered to the group (exact up to 100k; Redis < 7 has no lag field)."""
    last_delivered_id: str


class StreamStats(msgspec.Struct):
    stream: str
    length: int
    groups: list[GroupStats]
    last_id: str = ""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def stream_stats(bus: Bus, stream: str) -> StreamStats | None:
    key = bus.stream(stream)
    try:
        info = await bus.redis.xinfo_stream(key)
        groups = await bus.redis.xinfo_groups(key)
    except rexc.ResponseError:
        return None  # no such stream
    out: list[GroupStats] = []
    for g in groups:
        last = _s(g.get("last-delivered-id", "0-0"))
        lag = g.get("lag")
        if lag is None:  # Redis 6.2: count what is after the group's position
            entries: Any = await bus.redis.xrange(key, min=f"({last}", max="+", count=_LAG_SCAN_LIMIT)
            lag = len(entries)
        out.append(
            GroupStats(
                stream=stream,
                group=_s(g["name"]),
                consumers=int(g.get("consumers", 0)),
                pending=int(g.get("pending", 0)),
                lag=int(lag),
                last_delivered_id=last,
            )
        )
    return StreamStats(stream=stream, length=int(info.get("length", 0)), groups=out,
                       last_id=_s(info.get("last-generated-id", "")))


async def list_streams(bus: Bus, pattern: str = "*") -> list[str]:
    """Logical names of the streams under this bus's prefix (SCAN, for tools only)."""
    names: list[str] = []
    async for key in bus.redis.scan_iter(match=bus.prefix + pattern, count=1000, _type="stream"):
        names.append(bus.logical(key))
    return sorted(names)
