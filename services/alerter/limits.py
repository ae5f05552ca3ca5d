"""De-duplication and rate limiting, kept in Redis so that alerter replicas share them."""

from __future__ import annotations

import hashlib
import json

from shared.models import Alert
from shared.runtime import Bus
from shared.streams import ANY, Domain


def fingerprint(alert: Alert) -> str:
    """What makes two alerts the same: kind, source, severity and labels (not the wording,
    which often carries a changing number)."""
    doc = [alert.kind, alert.source, alert.severity, sorted(alert.labels.items())]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:32]


class Deduplicator:
    """Per sink and fingerprint: ``reserve`` before sending, ``confirm`` after, ``release`` on failure.

    A reservation is short so that a crash mid-send lets the redelivered alert through; a
    confirmation lasts the whole window. Two replicas holding duplicates race on SET NX, so
    only one sends.
    """

    def __init__(self, bus: Bus, window_s: float, reserve_s: float = 60.0) -> None:
        self.bus = bus
        self.window_ms = int(window_s * 1000)
        self.reserve_ms = int(reserve_s * 1000)

    def _key(self, sink: str, fp: str) -> str:
        return self.bus.keys.key(Domain.COOLDOWN, ANY, f"alert:{sink}:{fp}")

    async def reserve(self, sink: str, fp: str) -> bool:
        """True when this caller should send (nobody sent or is sending it within the window)."""
        return bool(await self.bus.redis.set(self._key(sink, fp), b"sending", nx=True, px=self.reserve_ms))

    async def confirm(self, sink: str, fp: str) -> None:
        await self.bus.redis.set(self._key(sink, fp), b"sent", px=self.window_ms)

    async def release(self, sink: str, fp: str) -> None:
        await self.bus.redis.delete(self._key(sink, fp))


# Generic cell rate algorithm: one key holds the theoretical arrival time of the next
# message. Server time, so replicas on different hosts agree.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - interval * burst
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil(next_tat - now) + 1000)
return 0
"""


_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = now + tonumber(ARGV[1]) + tonumber(ARGV[2]) * (tonumber(ARGV[3]) - 1)
redis.call('SET', KEYS[1], tat, 'PX', math.ceil(tat - now) + 1000)
return 0
"""


class RateLimiter:
    """At most ``burst`` messages at once, then one per ``60 / per_minute`` seconds."""

    def __init__(self, bus: Bus, name: str, per_minute: int, burst: int) -> None:
        self.bus = bus
        self.key = bus.keys.key(Domain.COOLDOWN, ANY, f"alert-rate:{name}")
        self.interval_ms = 60_000 / per_minute
        self.burst = burst
        self._script = bus.redis.register_script(_GCRA)
        self._hold = bus.redis.register_script(_HOLD)

    async def acquire(self) -> float:
        """Take a slot: 0.0 when taken, else the seconds to wait before asking again."""
        wait_ms = await self._script(keys=[self.key], args=[self.interval_ms, self.burst])
        return float(wait_ms) / 1000

    async def hold_off(self, seconds: float) -> None:
        """The receiver asked us to wait (HTTP 429): no slot for anyone before then."""
        await self._hold(keys=[self.key], args=[int(seconds * 1000), self.interval_ms, self.burst])
