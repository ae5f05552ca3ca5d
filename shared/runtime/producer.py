"""Publishing to streams: XADDs buffered and pipelined once per event-loop turn.

One XADD per await caps a producer near 4-5k msg/s; sending everything published during
one loop turn in one pipeline reaches tens of thousands. ``publish`` only buffers and
schedules a flush at the end of the current turn; ``flush`` waits until everything
buffered so far is in Redis (call it before acknowledging the input that caused it).

Streams with a MAXLEN policy are trimmed with ``XTRIM MAXLEN ~`` once every
``TRIM_EVERY`` messages rather than on each XADD, which keeps the trim off the per-message
latency path; the bound overshoots by at most that many entries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio.client import Pipeline

from shared import metrics
from shared.models import Message, encode
from shared.runtime.bus import Bus, is_redis_down
from shared.streams import policy

log = logging.getLogger(__name__)

FIELD = b"d"
"""Every stream entry has one field holding the JSON message."""

TRIM_EVERY = 500


class Producer:
    def __init__(self, bus: Bus, *, max_buffer: int = 200_000) -> None:
        self.bus = bus
        self.max_buffer = max_buffer
        self._buffer: list[tuple[str, bytes]] = []
        self._keys: dict[str, tuple[bytes, int]] = {}
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.last_error: BaseException | None = None
        self._streams: dict[str, _StreamState] = {}

    def publish(self, stream: str, msg: Message | bytes) -> None:
        """Queue one message; it is sent with the rest of this loop turn's messages."""
        if len(self._buffer) >= self.max_buffer:
            raise BufferError(f"producer buffer full ({self.max_buffer} messages): Redis unreachable?")
        payload = msg if isinstance(msg, bytes) else encode(msg)
        self._buffer.append((stream, payload))
        # The task's first step runs after everything else ready in this loop turn, so
        # all messages published during the turn leave in one pipeline.
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._background_flush())

    def set_key(self, key: str, value: bytes, px_ms: int) -> None:
        """``SET key value PX px_ms`` in the same pipeline as this loop turn's XADDs.

        Only the newest value per key is kept until it is sent (a latest-value key needs no
        history), so a burst of updates costs one SET per key per round trip.
        """
        self._keys[key] = (value, px_ms)
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._background_flush())

    def publish_many(self, stream: str, msgs: Iterable[Message | bytes]) -> None:
        for msg in msgs:
            self.publish(stream, msg)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def streams(self) -> list[str]:
        """Logical names of every stream this producer has written to."""
        return list(self._streams)

    async def _background_flush(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # kept buffered; the next flush (or the owner's) retries
            self.last_error = exc
            if not is_redis_down(exc):
                log.exception("publishing failed")

    async def flush(self, then: Callable[[Pipeline], None] | None = None) -> None:
        """Send everything buffered; raises if Redis is unreachable (nothing is dropped).

        ``then`` adds commands that run after the XADDs in the same round trip: the
        consumer passes its XACKs, so outputs are stored before their inputs are acked.
        """
        async with self._lock:
            while self._buffer or self._keys or then is not None:
                batch, self._buffer = self._buffer, []
                keys, self._keys = self._keys, {}
                try:
                    await self._send(batch, then, keys)
                except BaseException:
                    self._buffer[:0] = batch  # put back, in order, ahead of newer messages
                    for key, value in keys.items():  # unless a newer value arrived meanwhile
                        self._keys.setdefault(key, value)
                    raise
                then = None
            self.last_error = None

    def _state(self, stream: str) -> _StreamState:
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _StreamState(
                key=self.bus.stream(stream), maxlen=policy(stream).maxlen, counter=metrics.MESSAGES_OUT.labels(stream)
            )
        return state

    async def _send(
        self,
        batch: list[tuple[str, bytes]],
        then: Callable[[Pipeline], None] | None,
        keys: dict[str, tuple[bytes, int]] | None = None,
    ) -> None:
        redis = self.bus.redis
        if len(batch) == 1 and then is None and not keys:  # a lone message skips the pipeline machinery
            stream, payload = batch[0]
            state = self._state(stream)
            if state.unsent_trim + 1 < TRIM_EVERY or state.maxlen is None:
                await redis.xadd(state.key, {FIELD: payload})
                state.sent(1)
                return
        pipe = redis.pipeline(transaction=False)
        counts: dict[str, int] = {}
        for stream, payload in batch:
            pipe.xadd(self._state(stream).key, {FIELD: payload})
            counts[stream] = counts.get(stream, 0) + 1
        for stream, n in counts.items():
            state = self._streams[stream]
            if state.maxlen is not None and state.unsent_trim + n >= TRIM_EVERY:
                pipe.xtrim(state.key, maxlen=state.maxlen, approximate=True)
        for key, (value, px_ms) in (keys or {}).items():
            pipe.set(key, value, px=px_ms)
        if then is not None:
            then(pipe)
        await pipe.execute()
        for stream, n in counts.items():
            self._streams[stream].sent(n)

    async def close(self) -> None:
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)
        try:
            await self.flush()
        except Exception as exc:
            log.error("messages still buffered at shutdown", extra={"count": len(self._buffer), "error": str(exc)})


class _StreamState:
    __slots__ = ("counter", "key", "maxlen", "unsent_trim")

    def __init__(self, key: str, maxlen: int | None, counter: Any) -> None:
        self.key = key
        self.maxlen = maxlen
        self.counter = counter
        self.unsent_trim = 0
        """Messages added since the last XTRIM."""

    def sent(self, n: int) -> None:
        self.counter.inc(n)
        self.unsent_trim = 0 if self.unsent_trim + n >= TRIM_EVERY else self.unsent_trim + n
