"""Public REST requests under the exchange's weight budget.

``WeightBudget`` is the pure part: a token bucket refilled continuously at
``weight / per_s``, answering "how long until this request may go" for a given time.
``RestClient`` waits that long, sends the request (signed at that moment when it needs a
key), and honours the exchange's own brakes:
HTTP 429/418 with ``Retry-After`` pause every request to that exchange until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from urllib.parse import urlencode

import aiohttp

from services.collector import metrics
from services.collector.venue import RestLimit, RestRequest

log = logging.getLogger(__name__)


class RestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class WeightBudget:
    def __init__(self, limit: RestLimit, now: float) -> None:
        self.capacity = float(limit.weight)
        self.rate = limit.weight / limit.per_s
        self.tokens = self.capacity
        self.updated = now
        self.paused_until = 0.0

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def delay(self, weight: int, now: float) -> float:
        """Seconds to wait before a request of ``weight`` may be sent (0: send now, and it is charged)."""
        cost = min(float(weight), self.capacity)  # a request bigger than the bucket waits for a full one
        if now < self.paused_until:
            return self.paused_until - now
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def pause(self, seconds: float, now: float) -> None:
        self.paused_until = max(self.paused_until, now + seconds)


class RestClient:
    def __init__(
        self,
        exchange: str,
        base_url: str,
        limit: RestLimit,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exchange = exchange
        self.base_url = base_url.rstrip("/")
        self.budget = WeightBudget(limit, clock())
        self.clock = clock
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def url(self, request: RestRequest) -> str:
        return self.base_url + request.path

    async def get(self, request: RestRequest) -> bytes:
        while True:
            wait = self.budget.delay(request.weight, self.clock())
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = None
        if request.sign is not None:
            query = f"?{urlencode(request.params)}" if request.params else ""
            headers = request.sign(request.method, request.path + query)
        try:
            async with self._session.request(request.method, self.url(request), params=request.params or None,
                                             headers=headers) as resp:
                body = await resp.read()
                if resp.status in (418, 429):
                    retry_after = float(resp.headers.get("Retry-After", "60"))
                    self.budget.pause(retry_after, self.clock())
                    metrics.REST_REQUESTS.labels(self.exchange, "rate_limited").inc()
                    log.warning("rate limited by the exchange", extra={"exchange": self.exchange,
                                                                       "status": resp.status,
                                                                       "retry_after_s": retry_after})
                    raise RestError(resp.status, "rate limited")
                if resp.status >= 400:
                    metrics.REST_REQUESTS.labels(self.exchange, "error").inc()
                    raise RestError(resp.status, body[:200].decode(errors="replace"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.REST_REQUESTS.labels(self.exchange, "unreachable").inc()
            raise RestError(0, f"{type(exc).__name__}: {exc}") from None
        metrics.REST_REQUESTS.labels(self.exchange, "ok").inc()
        return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
