"""Leases: exclusive, expiring ownership of a resource (e.g. one ``md.*`` stream per group).

``SET key owner NX PX ttl`` takes a free lease; the owner renews it well before it expires;
when the owner dies its leases expire and another replica takes them over. Renewal and
release check the owner atomically (Lua), so a replica that paused past its TTL cannot
extend or delete a lease someone else now holds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from shared import metrics
from shared.runtime.bus import Bus, backoff_delay, is_redis_down, wait_event

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, bus: Bus, key: str, owner: str, ttl_ms: int) -> None:
        self.bus = bus
        self.key = key
        self.owner = owner
        self.ttl_ms = ttl_ms

    async def acquire(self) -> bool:
        return bool(await self.bus.redis.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        return bool(await self.bus.redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms))

    async def release(self) -> bool:
        return bool(await self.bus.redis.eval(_RELEASE, 1, self.key, self.owner))

    async def holder(self) -> str | None:
        value: Any = await self.bus.redis.get(self.key)
        return value.decode() if value else None


Callback = Callable[[str], Awaitable[None] | None]


class LeaseKeeper:
    """Holds a fair share of a set of resources for one replica of a group.

    Every ``ttl/3`` it renews what it holds (dropping what it lost) and tries to take free
    resources until it holds ``ceil(resources / live replicas)``. Replicas announce
    themselves in a members hash, so a new replica gets its share as leases come free,
    and when one dies the survivors take over its resources within one TTL.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        group: str,
        owner: str,
        resources: Iterable[str],
        ttl_ms: int = 5_000,
        on_acquired: Callback | None = None,
        on_lost: Callback | None = None,
    ) -> None:
        self.bus = bus
        self.group = group
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.resources: list[str] = sorted(set(resources))
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.held: dict[str, Lease] = {}
        self._stop = asyncio.Event()

    def _lease(self, resource: str) -> Lease:
        return Lease(self.bus, self.bus.keys.lease(self.group, resource), self.owner, self.ttl_ms)

    @property
    def _members_key(self) -> str:
        return self.bus.keys.lease(self.group, "members")

    def set_resources(self, resources: Iterable[str]) -> None:
        self.resources = sorted(set(resources))

    async def live_members(self) -> int:
        now_ms = int(time.time() * 1000)
        raw = await self.bus.redis.hgetall(self._members_key)
        alive = [k for k, v in raw.items() if now_ms - int(v) < self.ttl_ms]
        stale = [k for k, v in raw.items() if now_ms - int(v) >= 3 * self.ttl_ms]
        if stale:
            await self.bus.redis.hdel(self._members_key, *stale)
        return max(1, len(alive))

    async def tick(self) -> None:
        """One round: announce, renew, take a fair share, give back any excess."""
        now_ms = int(time.time() * 1000)
        await self.bus.redis.hset(self._members_key, self.owner, now_ms)
        await self.bus.redis.pexpire(self._members_key, max(60_000, 10 * self.ttl_ms))
        for resource, lease in list(self.held.items()):
            if resource not in self.resources or not await lease.renew():
                if resource in self.resources:
                    log.warning("lease lost", extra={"group": self.group, "resource": resource})
                else:
                    await lease.release()
                del self.held[resource]
                await _call(self.on_lost, resource)
        share = math.ceil(len(self.resources) / await self.live_members())
        for resource in self.resources:
            if len(self.held) >= share:
                break
            if resource in self.held:
                continue
            lease = self._lease(resource)
            if await lease.acquire():
                self.held[resource] = lease
                log.info("lease acquired", extra={"group": self.group, "resource": resource})
                await _call(self.on_acquired, resource)
        while len(self.held) > share:  # a new replica joined: hand back the excess
            resource = sorted(self.held)[-1]
            await self.held.pop(resource).release()
            await _call(self.on_lost, resource)
        metrics.LEASES_HELD.labels(self.group).set(len(self.held))

    async def run(self) -> None:
        attempt = 0
        last_ok = time.monotonic()
        while not self._stop.is_set():
            try:
                await self.tick()
                attempt = 0
                last_ok = time.monotonic()
                delay = self.ttl_ms / 3000
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                attempt += 1
                delay = min(backoff_delay(attempt), self.ttl_ms / 3000)
                # Unrenewed past the TTL, our leases may belong to someone else: stop reading.
                if (time.monotonic() - last_ok) * 1000 > self.ttl_ms and self.held:
                    for resource in list(self.held):
                        del self.held[resource]
                        await _call(self.on_lost, resource)
            await wait_event(self._stop, delay)

    async def stop(self) -> None:
        self._stop.set()
        for resource, lease in list(self.held.items()):
            try:
                await lease.release()
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
            await _call(self.on_lost, resource)
        self.held.clear()
        try:
            await self.bus.redis.hdel(self._members_key, self.owner)
        except Exception as exc:
            if not is_redis_down(exc):
                raise


async def _call(cb: Callback | None, resource: str) -> None:
    if cb is None:
        return
    result = cb(resource)
    if result is not None:
        await result
