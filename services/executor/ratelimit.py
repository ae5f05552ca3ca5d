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

import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

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
