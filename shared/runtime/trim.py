"""Trimming streams that carry obligations (signals, orders, fills, ...).

Those streams are never cut by MAXLEN: an entry goes only once every consumer group has
had it delivered and acknowledged. ``XTRIM MINID`` drops everything older than the oldest
entry some group still owes.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions as rexc

from shared.runtime.bus import Bus


def _parse(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def acknowledged_floor(bus: Bus, stream: str) -> tuple[int, int] | None:
    """The smallest id some group still needs, or None when there is no group to ask."""
    key = bus.stream(stream)
    try:
        groups: Any = await bus.redis.xinfo_groups(key)
    except rexc.ResponseError:
        return None
    if not groups:
        return None
    floor: tuple[int, int] | None = None
    for g in groups:
        name = g["name"]
        summary: Any = await bus.redis.xpending(key, name)
        if summary["pending"]:
            needed = _parse(summary["min"])
        else:
            ms, seq = _parse(g["last-delivered-id"])
            needed = (ms, seq + 1)
        floor = needed if floor is None or needed < floor else floor
    return floor


async def trim_acknowledged(bus: Bus, stream: str) -> int:
    """Drop the entries every group has acknowledged; returns how many went."""
    floor = await acknowledged_floor(bus, stream)
    if floor is None:
        return 0
    removed: int = await bus.redis.xtrim(bus.stream(stream), minid=f"{floor[0]}-{floor[1]}", approximate=False)
    return removed
