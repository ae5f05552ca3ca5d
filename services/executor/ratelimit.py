"""Client-side rate limits of a venue, and what the exchange says about them.

Two sources decide when the next request may go:
- our own count of what we sent in the sliding window (weights per minute on Binance,
  requests per second per group on Upbit), so we rarely hit the exchange's limit;
- the exchange's answers: Binance reports the weight it counted (``X-MBX-USED-WEIGHT-1M``),
  Upbit the requests left this second (``Remaining-Req: group=order; min=..; sec=N``); a 429
  carries ``Retry-After`` (seconds) on Binance, and a 418 (banned for ignoring 429s) carries
  the ban's length. After either, nothing is sent before the time is up: repeating requests
  into a 429 is what turns it into a ban.

The core is synchronous and takes ``now`` (seconds, wall clock) as an argument.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.runtime import is_redis_down

log = logging.getLogger(__name__)

_REMAINING_SEC = re.compile(r"sec=(\d+)")


@dataclass
class RateLimiter:
    name: str
    capacity: int
    """Units (weight or requests) allowed per window."""
    window_s: float
    default_retry_after_s: float = 1.0
    """Back-off after a 429 that carries no ``Retry-After``."""
    default_ban_s: float = 60.0
    """Back-off after a 418 that carries no ``Retry-After``."""
    blocked_until: float = 0.0
    throttled: int = 0
    """429s received."""
    banned: int = 0
    """418s received."""
    _sent: deque[tuple[float, int]] = field(default_factory=deque)
    _server_used: int = 0
    _server_window: float = -1.0

    def wait_time(self, weight: int, now: float) -> float:
        """Seconds to wait before a request of ``weight`` may be sent (0 = now)."""
        if now < self.blocked_until:
            return self.blocked_until - now
        while self._sent and self._sent[0][0] <= now - self.window_s:
            self._sent.popleft()
        wait = 0.0
        own = sum(w for _, w in self._sent)
        if own + weight > self.capacity:  # until enough of our own requests leave the sliding window
            excess = own + weight - self.capacity
            for sent_at, w in self._sent:
                excess -= w
                if excess <= 0:
                    wait = sent_at + self.window_s - now
                    break
        window_start = math.floor(now / self.window_s) * self.window_s
        if self._server_window == window_start and self._server_used + weight > self.capacity:
            wait = max(wait, window_start + self.window_s - now)  # the exchange counts per fixed window
        return max(wait, 1e-3) if wait > 0 else 0.0

    def record(self, weight: int, now: float) -> None:
        self._sent.append((now, weight))

    def on_response(self, status: int, headers: Mapping[str, str], now: float) -> None:
        used = headers.get("X-MBX-USED-WEIGHT-1M") or headers.get("x-mbx-used-weight-1m")
        if used is not None and used.isdigit():
            self._server_window = math.floor(now / self.window_s) * self.window_s
            self._server_used = int(used)
        remaining = headers.get("Remaining-Req") or headers.get("remaining-req")
        if remaining:
            m = _REMAINING_SEC.search(remaining)
            if m and int(m.group(1)) == 0:
                self.blocked_until = max(self.blocked_until, math.floor(now) + 1.0)
        if status in (429, 418):
            if status == 429:
                self.throttled += 1
            else:
                self.banned += 1
            retry_after = _seconds(headers.get("Retry-After") or headers.get("retry-after"))
            if retry_after is None:
                retry_after = self.default_retry_after_s if status == 429 else self.default_ban_s
            self.blocked_until = max(self.blocked_until, now + retry_after)


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class SharedBudget:
    """A venue's request budget and back-off, shared by every executor replica through Redis.

    Exchanges count per IP or per account, not per process: replicas must spend one budget,
    and a 429 seen by one must hold back all of them (the others sending on is what earns the
    418 ban). Each request takes its weight from a counter of the exchange's current fixed
    window (Lua, atomic); a 429/418 stores the end of the back-off for everyone. Both keys of
    one venue share a hash tag. When Redis is unreachable the local limiter alone decides.
    """

    _TAKE = """
    local now = tonumber(ARGV[1])
    local blocked = tonumber(redis.call('GET', KEYS[1]) or '0')
    if blocked > now then return blocked - now end
    local weight = tonumber(ARGV[2])
    local used = redis.call('INCRBY', KEYS[2], weight)
    if used == weight then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
    if used > tonumber(ARGV[3]) then
      redis.call('DECRBY', KEYS[2], weight)
      return math.max(1, tonumber(ARGV[4]) - now)
    end
    return 0
    """
    _BLOCK = """
    if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    end
    return 0
    """

    def __init__(self, redis: Any, key: Callable[[str, str], str]) -> None:
        self.redis = redis
        self.key = key
        """(limiter name, field) -> Redis key; the fields of one limiter must share a hash tag."""
        self._take = redis.register_script(self._TAKE)
        self._block = redis.register_script(self._BLOCK)

    async def take(self, limiter: RateLimiter, weight: int, now: float) -> float:
        """Seconds to wait before sending (0: the weight is taken, send now)."""
        window = int(now // limiter.window_s)
        window_end_ms = int((window + 1) * limiter.window_s * 1000)
        try:
            wait_ms = await self._take(
                keys=[self.key(limiter.name, "blocked"), self.key(limiter.name, f"w{window}")],
                args=[int(now * 1000), weight, limiter.capacity, window_end_ms,
                      int(limiter.window_s * 1000) + 1000])
        except Exception as exc:
            if not is_redis_down(exc):
                raise
            log.warning("shared rate budget unavailable, limiting locally", extra={"limiter": limiter.name})
            return 0.0
        return int(wait_ms) / 1000

    async def block(self, limiter: RateLimiter, until: float, now: float) -> None:
        try:
            await self._block(keys=[self.key(limiter.name, "blocked")],
                              args=[int(until * 1000), max(1, int((until - now) * 1000) + 1000)])
        except Exception as exc:
            if not is_redis_down(exc):
                raise
