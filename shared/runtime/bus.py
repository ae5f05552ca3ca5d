"""The Redis connection every service shares, and the stream-name prefix it applies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rexc
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential_jitter

from shared.config import Config
from shared.streams import KeySpace

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "Redis went away" looks like from redis-py: the socket broke, timed out, or the
# server is still loading its data after a restart.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    ConnectionError,  # refused / reset / broken pipe below redis-py
)


_BACKOFF = wait_exponential_jitter(multiplier=0.05, max=5.0, jitter=0.1)


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): jittered exponential, capped at 5 s."""
    return float(_BACKOFF(SimpleNamespace(attempt_number=attempt)))  # type: ignore[arg-type]


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; True if it was set.

    ``asyncio.timeout`` rather than ``wait_for``: before Python 3.12 ``wait_for`` can
    swallow a cancellation that lands while the timeout fires, leaving a task unstoppable.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
        return True
    except TimeoutError:
        return event.is_set()


def is_redis_down(exc: BaseException) -> bool:
    return isinstance(exc, REDIS_DOWN) or (
        isinstance(exc, rexc.ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))
    )


class Bus:
    """A Redis client plus the stream prefix and key space of this deployment."""

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "", keys: KeySpace | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = keys or KeySpace("development", "default")

    @classmethod
    def from_config(cls, cfg: Config) -> Bus:
        return cls(connect(cfg.redis.url), prefix=cfg.redis.stream_prefix, keys=KeySpace(cfg.env, cfg.session))

    @classmethod
    def from_url(cls, url: str, prefix: str = "", keys: KeySpace | None = None) -> Bus:
        return cls(connect(url), prefix=prefix, keys=keys)

    def stream(self, name: str) -> str:
        """The Redis key of a logical stream name."""
        return self.prefix + name

    def logical(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        return text[len(self.prefix):] if self.prefix and text.startswith(self.prefix) else text

    async def close(self) -> None:
        await self.redis.aclose()


def connect(url: str) -> aioredis.Redis:
    # No client-side retries: the runtime decides what a lost connection means (re-read
    # pending entries, back off), and redis-py retrying underneath would hide that.
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_keepalive=True,
        socket_connect_timeout=2.0,
        health_check_interval=0,
        retry_on_timeout=False,
    )


async def retry_redis(
    op: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[BaseException], None] | None = None,
    max_wait_s: float = 5.0,
    stop: Callable[[], bool] | None = None,
) -> T:
    """Run ``op`` until it succeeds, backing off with jitter while Redis is unreachable."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(REDIS_DOWN),
        wait=wait_exponential_jitter(multiplier=0.05, max=max_wait_s, jitter=0.1),
        stop=stop_never,
        reraise=True,
        before_sleep=(lambda rs: on_retry(rs.outcome.exception()) if on_retry and rs.outcome else None),  # type: ignore[arg-type]
    ):
        with attempt:
            if stop is not None and stop():
                raise asyncio.CancelledError
            return await op()
    raise AssertionError("unreachable")
