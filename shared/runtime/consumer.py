"""The consumer loop every service uses: one consumer of one group over one or more streams.

Guarantees:
- groups are created idempotently (MKSTREAM), so start order does not matter;
- an entry is acknowledged only after its handler returned and everything the handler
  published (and ``before_ack``, e.g. a database commit) is durable; outputs and acks
  travel in one pipeline, outputs first; outputs published before the end of a batch are
  sent at once rather than held until the batch is handled (``before_ack`` may acknowledge
  entries itself, atomically with their outputs, and return them: they are not acknowledged
  again);
- an entry whose handler raises stays pending; it is retried when it has been idle for
  ``claim_idle_ms`` (XAUTOCLAIM, which also takes over entries of dead consumers) and moves
  to ``dlq.<stream>`` with its error once Redis has delivered it ``max_deliveries`` times;
  an entry that does not decode moves there at once;
- a handler raising ``Retryable`` (or losing Redis) is not the message's fault: the same
  entry is retried in place with backoff, without counting a delivery;
- when Redis goes away the loop backs off with jitter and resumes by itself, first
  re-reading its own pending entries;
- ``stop()`` (SIGTERM/SIGINT in services) finishes the batch in hand, acks it, and returns.

With ``concurrency`` > 1 up to that many entries are handled at once, so one slow entry
(a database round trip, an exchange) does not hold up the independent ones read after it:
the loop reads only as many entries as there are free slots, and each entry is
acknowledged by itself as soon as it is handled and its outputs are stored (XACK order
does not matter to Redis). Entries whose ``key`` is equal (e.g. one arbitrage) are still
handled one after another, in the order they were read. An entry in hand is never handed
out twice: re-reads of the pending list and claims skip it, and the claim pass first
refreshes the idle time of entries in hand (XCLAIM JUSTID, which counts no delivery), so a
handler retrying in place through a long outage does not look abandoned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import redis.exceptions as rexc
from redis.asyncio.client import Pipeline

from shared import metrics
from shared.models import decode
from shared.runtime.bus import Bus, backoff_delay, is_redis_down, wait_event
from shared.runtime.producer import FIELD, Producer
from shared.streams import dlq

log = logging.getLogger(__name__)


class Retryable(Exception):
    """Raised by a handler when a dependency (database, exchange) is down: retry, don't count."""


@dataclass(slots=True)
class Delivery:
    stream: str
    """Logical stream name (without the bus prefix)."""
    entry_id: bytes
    message: Any
    deliveries: int
    """How many times Redis has delivered this entry to the group, this time included."""


Handler = Callable[[Delivery], Awaitable[None]]
BeforeAck = Callable[[], Awaitable[Collection[tuple[str, bytes]] | None]]
"""Runs before a batch is acknowledged; returns the (stream, entry id)s it acknowledged itself, if any."""
T = TypeVar("T")

_SKIP = object()
"""``_admit``'s answer for an entry that is not handled (acknowledged or dead-lettered as it is)."""


@dataclass(slots=True)
class _Entry:
    stream: str
    entry_id: bytes
    fields: dict[bytes, bytes] | None
    deliveries: int


def default_consumer_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


class Consumer:
    def __init__(
        self,
        bus: Bus,
        *,
        group: str,
        streams: Iterable[str],
        handler: Handler,
        name: str,
        decoder: Callable[[bytes], Any] = decode,
        producer: Producer | None = None,
        before_ack: BeforeAck | None = None,
        batch_size: int = 256,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        claim_interval_ms: int = 5_000,
        max_deliveries: int = 5,
        start_id: str = "0",
        prune_idle_consumers_ms: int = 3_600_000,
        service: str = "",
        concurrency: int = 1,
        key: Callable[[Any], Hashable] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.bus = bus
        self.group = group
        self.name = name
        self.handler = handler
        self.decoder = decoder
        self.producer = producer
        self.before_ack = before_ack
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_ms = claim_interval_ms
        self.max_deliveries = max_deliveries
        self.start_id = start_id
        self.prune_idle_consumers_ms = prune_idle_consumers_ms
        self.service = service or group
        self._streams: list[str] = list(dict.fromkeys(streams))
        self._grouped: set[str] = set()
        self._stop = asyncio.Event()
        self._errors: dict[bytes, str] = {}
        self._recover = True
        self._next_claim = 0.0
        self._next_prune = time.monotonic() + 60.0
        self._outage = 0
        self.handled = 0
        self._children: dict[str, tuple[Any, Any, Any]] = {}
        self.last_read_ns = 0
        self.concurrency = concurrency
        self.key = key
        # concurrent mode: entries in hand (stream, id) -> when handed out (monotonic s)
        self._in_hand: dict[tuple[str, bytes], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._freed = asyncio.Event()
        self._failure: BaseException | None = None
        self._recover_from: dict[str, str] = {}

    # ------------------------------------------------------------------ membership

    @property
    def streams(self) -> list[str]:
        return list(self._streams)

    def add_stream(self, stream: str) -> None:
        if stream not in self._streams:
            self._streams.append(stream)
            self._recover = True

    def remove_stream(self, stream: str) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    async def ensure_groups(self) -> None:
        for stream in self._streams:
            if stream in self._grouped:
                continue
            await ensure_group(self.bus, stream, self.group, self.start_id)
            self._grouped.add(stream)

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        if self.concurrency > 1:
            await self._run_concurrent()
            return
        while not self._stop.is_set():
            try:
                await self.ensure_groups()
                if not self._streams:
                    await self._sleep(self.block_ms / 1000)
                    continue
                entries = await self._next_entries()
                if entries:
                    await self._process(entries)
                if self._outage:
                    log.info("redis reachable again", extra={"group": self.group})
                    metrics.REDIS_RECONNECTS.labels(self.service).inc()
                    self._outage = 0
            except rexc.ResponseError as exc:
                if "NOGROUP" in str(exc):  # stream or group vanished (e.g. Redis lost its data)
                    self._grouped.clear()
                    self._recover = True
                    continue
                if not is_redis_down(exc):
                    raise
                await self._backoff(exc)
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                await self._backoff(exc)

    async def _backoff(self, exc: BaseException) -> None:
        self._outage += 1
        if self._outage == 1:
            log.warning("redis unreachable, backing off", extra={"group": self.group, "error": str(exc)})
        self._recover = True
        self._recover_from = {}
        await self._sleep(backoff_delay(self._outage))

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._stop, seconds)

    async def _next_entries(self) -> list[_Entry]:
        if self._recover:
            entries = await self._read("0", block=None)
            if entries:
                await self._fill_delivery_counts(entries)
                return entries
            self._recover = False
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self.claim_interval_ms / 1000
            entries = await self._claim()
            if entries:
                return entries
        return await self._read(">", block=self.block_ms)

    async def _read(self, from_id: str | dict[str, str], block: int | None, count: int | None = None) -> list[_Entry]:
        ids = from_id if isinstance(from_id, dict) else dict.fromkeys(self._streams, from_id)
        reply: Any = await self.bus.redis.xreadgroup(
            self.group,
            self.name,
            {self.bus.stream(s): i for s, i in ids.items()},
            count=count or self.batch_size,
            block=block,
        )
        self.last_read_ns = time.time_ns()
        out: list[_Entry] = []
        for key, items in reply or ():
            stream = self.bus.logical(key)
            for entry_id, fields in items:
                out.append(_Entry(stream, entry_id, fields or None, 1))
        return out

    async def _claim(self, count: int | None = None) -> list[_Entry]:
        out: list[_Entry] = []
        for stream in list(self._streams):
            reply: Any = await self.bus.redis.xautoclaim(
                self.bus.stream(stream), self.group, self.name, self.claim_idle_ms, "0-0",
                count=count or self.batch_size,
            )
            items = reply[1] if reply else []
            claimed = [_Entry(stream, eid, fields or None, 1) for eid, fields in items
                       if (stream, eid) not in self._in_hand]
            if claimed:
                metrics.CLAIMED.labels(stream, self.group).inc(len(claimed))
                out.extend(claimed)
        if out:
            await self._fill_delivery_counts(out)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 600.0
            for stream in self._streams:
                await prune_idle_consumers(self.bus, stream, self.group, self.prune_idle_consumers_ms)
        return out

    async def _fill_delivery_counts(self, entries: list[_Entry]) -> None:
        by_stream: dict[str, list[_Entry]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e)
        for stream, group_entries in by_stream.items():
            ids = [e.entry_id for e in group_entries]
            rows = await self.bus.redis.xpending_range(
                self.bus.stream(stream), self.group, min=min(ids, key=_id_key), max=max(ids, key=_id_key),
                count=len(ids) + 1000, consumername=self.name,
            )
            counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
            for e in group_entries:
                e.deliveries = counts.get(e.entry_id, e.deliveries)

    # ------------------------------------------------------------------ handling

    async def _process(self, entries: list[_Entry]) -> None:
        acks: dict[str, list[bytes]] = {}
        dead: list[tuple[_Entry, str]] = []
        for i, entry in enumerate(entries):
            message = self._admit(entry, acks, dead)
            if message is _SKIP:
                continue
            ok = await self._handle_timed(entry, message)
            if ok is None:  # stopping while a dependency is down: leave the rest pending
                break
            self._settle(entry, ok, acks, dead)
            if self.producer is not None and self.producer.buffered and i + 1 < len(entries):
                # Outputs (a detector's signal) leave now, not after the rest of the batch: a
                # handler that never suspends would otherwise hold them back. Costs a round
                # trip only for batches that publish something before their end.
                await self._until_done(self.producer.flush)
        await self._commit(acks, dead)

    def _admit(self, entry: _Entry, acks: dict[str, list[bytes]], dead: list[tuple[_Entry, str]]) -> Any:
        """The decoded message to handle, or ``_SKIP`` with the entry put in ``acks`` or ``dead``."""
        if entry.fields is None:  # trimmed or deleted while pending: nothing left to do
            acks.setdefault(entry.stream, []).append(entry.entry_id)
            return _SKIP
        raw = entry.fields.get(FIELD, b"")
        try:
            message = self.decoder(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError, TypeError) as exc:
            dead.append((entry, f"decode: {exc}"))
            return _SKIP
        if entry.deliveries > self.max_deliveries:
            dead.append((entry, self._errors.pop(entry.entry_id, f"delivered {entry.deliveries} times")))
            return _SKIP
        return message

    async def _handle_timed(self, entry: _Entry, message: Any) -> bool | None:
        counted, hop, handle_time = self._metrics(entry.stream)
        counted.inc()
        published = getattr(message, "ts_pub_ns", 0) or getattr(message, "ts_ns", 0)
        if published:
            hop.observe(max(0, time.time_ns() - published) / 1e9)
        started = time.perf_counter()
        ok = await self._handle(Delivery(entry.stream, entry.entry_id, message, entry.deliveries))
        handle_time.observe(time.perf_counter() - started)
        return ok

    def _settle(self, entry: _Entry, ok: bool, acks: dict[str, list[bytes]], dead: list[tuple[_Entry, str]]) -> None:
        if ok:
            self._errors.pop(entry.entry_id, None)
            acks.setdefault(entry.stream, []).append(entry.entry_id)
            self.handled += 1
        elif entry.deliveries >= self.max_deliveries:
            dead.append((entry, self._errors.pop(entry.entry_id, "handler failed")))

    # ------------------------------------------------------------------ concurrent handling

    async def _run_concurrent(self) -> None:
        try:
            while not self._stop.is_set():
                if self._failure is not None:
                    raise self._failure
                try:
                    await self.ensure_groups()
                    if not self._streams:
                        await self._sleep(self.block_ms / 1000)
                        continue
                    free = self.concurrency - len(self._in_hand)
                    if free <= 0:
                        # every slot busy: read nothing more until one frees (or we are stopped)
                        self._freed.clear()
                        await wait_event(self._freed, self.block_ms / 1000)
                        continue
                    for entry in await self._next_concurrent(free):
                        await self._dispatch(entry)
                    if self._outage:
                        log.info("redis reachable again", extra={"group": self.group})
                        metrics.REDIS_RECONNECTS.labels(self.service).inc()
                        self._outage = 0
                except rexc.ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        self._grouped.clear()
                        self._recover = True
                        continue
                    if not is_redis_down(exc):
                        raise
                    await self._backoff(exc)
                except Exception as exc:
                    if not is_redis_down(exc):
                        raise
                    await self._backoff(exc)
        finally:
            # stopping (or failing): what is in hand finishes and acknowledges itself
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    async def _next_concurrent(self, free: int) -> list[_Entry]:
        if self._recover:
            # Page through our own pending entries (those in hand are skipped, not re-read forever).
            if not self._recover_from:
                self._recover_from = dict.fromkeys(self._streams, "0")
            entries = await self._read(self._recover_from, block=None, count=free)
            returned = {e.stream for e in entries}
            for stream in list(self._recover_from):
                if stream not in returned:
                    del self._recover_from[stream]
            for e in entries:
                self._recover_from[e.stream] = e.entry_id.decode()
            if not self._recover_from:
                self._recover = False
            entries = [e for e in entries if (e.stream, e.entry_id) not in self._in_hand]
            if entries:
                await self._fill_delivery_counts(entries)
            return entries
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self.claim_interval_ms / 1000
            await self._refresh_in_hand(now)
            entries = await self._claim(count=free)
            if entries:
                return entries
        return await self._read(">", block=self.block_ms, count=free)

    async def _refresh_in_hand(self, now: float) -> None:
        """Reset the idle time of entries handled for a long time (a handler retrying in place),
        so no claim, ours or another replica's, takes them; JUSTID counts no delivery."""
        old: dict[str, list[Any]] = {}
        for (stream, entry_id), since in self._in_hand.items():
            if now - since > self.claim_idle_ms / 2000:
                old.setdefault(stream, []).append(entry_id)
        for stream, ids in old.items():
            await self.bus.redis.xclaim(self.bus.stream(stream), self.group, self.name, 0, ids, justid=True)
            for entry_id in ids:
                self._in_hand[(stream, entry_id)] = now

    async def _dispatch(self, entry: _Entry) -> None:
        acks: dict[str, list[bytes]] = {}
        dead: list[tuple[_Entry, str]] = []
        message = self._admit(entry, acks, dead)
        if message is _SKIP:
            await self._commit(acks, dead)
            return
        slot = (entry.stream, entry.entry_id)
        self._in_hand[slot] = time.monotonic()
        key = self.key(message) if self.key is not None else None
        before = self._tails.get(key) if key is not None else None
        task = asyncio.create_task(self._work(entry, message, before))
        self._tasks.add(task)
        if key is not None:
            self._tails[key] = task

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._in_hand.pop(slot, None)
            if key is not None and self._tails.get(key) is t:
                del self._tails[key]
            if not t.cancelled() and t.exception() is not None and self._failure is None:
                self._failure = t.exception()
                self._stop.set()  # a failure the sequential loop would raise stops this one too
            self._freed.set()

        task.add_done_callback(done)

    async def _work(self, entry: _Entry, message: Any, before: asyncio.Task[None] | None) -> None:
        if before is not None:  # the same key is handled in the order it was read
            await asyncio.wait([before])
        ok = await self._handle_timed(entry, message)
        if ok is None:  # stopping while a dependency is down: leave it pending
            return
        acks: dict[str, list[bytes]] = {}
        dead: list[tuple[_Entry, str]] = []
        self._settle(entry, ok, acks, dead)
        await self._commit(acks, dead)

    def _metrics(self, stream: str) -> tuple[Any, Any, Any]:
        children = self._children.get(stream)
        if children is None:
            children = self._children[stream] = (
                metrics.MESSAGES_IN.labels(stream, self.group),
                metrics.HOP_LATENCY.labels(stream, self.group),
                metrics.HANDLE_SECONDS.labels(stream, self.group),
            )
        return children

    async def _handle(self, delivery: Delivery) -> bool | None:
        attempt = 0
        while True:
            try:
                await self.handler(delivery)
                return True
            except Exception as exc:
                if isinstance(exc, Retryable) or is_redis_down(exc):
                    attempt += 1
                    if self._stop.is_set():
                        return None
                    if attempt == 1:
                        log.warning("dependency down, retrying in place",
                                    extra={"group": self.group, "stream": delivery.stream, "error": str(exc)})
                    await self._sleep(backoff_delay(attempt))
                    continue
                metrics.HANDLER_ERRORS.labels(delivery.stream, self.group).inc()
                self._errors[delivery.entry_id] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "handler failed",
                    extra={"group": self.group, "stream": delivery.stream,
                           "entry": delivery.entry_id.decode(), "deliveries": delivery.deliveries,
                           "error": f"{type(exc).__name__}: {exc}"},
                )
                return False

    async def _commit(self, acks: dict[str, list[bytes]], dead: list[tuple[_Entry, str]]) -> None:
        if self.before_ack is not None and (acks or dead):
            acked = await self._until_done(self.before_ack)
            if acked:
                acks = {s: kept for s, ids in acks.items() if (kept := [i for i in ids if (s, i) not in acked])}

        def add_acks(pipe: Pipeline) -> None:
            for entry, error in dead:
                pipe.xadd(
                    self.bus.stream(dlq(entry.stream)),
                    {
                        FIELD: (entry.fields or {}).get(FIELD, b""),
                        b"stream": entry.stream,
                        b"id": entry.entry_id,
                        b"group": self.group,
                        b"consumer": self.name,
                        b"error": error[:2000],
                        b"deliveries": str(entry.deliveries),
                        b"ts_ns": str(time.time_ns()),
                    },
                    maxlen=100_000,
                    approximate=True,
                )
                pipe.xack(self.bus.stream(entry.stream), self.group, entry.entry_id)
            for stream, ids in acks.items():
                pipe.xack(self.bus.stream(stream), self.group, *ids)

        async def commit() -> None:
            if self.producer is not None and self.producer.buffered:
                await self.producer.flush(then=add_acks)
            elif not dead and len(acks) == 1:  # the common case: one XACK, no pipeline
                [(stream, ids)] = acks.items()
                await self.bus.redis.xack(self.bus.stream(stream), self.group, *ids)
            else:
                pipe = self.bus.redis.pipeline(transaction=False)
                add_acks(pipe)
                await pipe.execute()

        if acks or dead or (self.producer is not None and self.producer.buffered):
            await self._until_done(commit)
        for entry, error in dead:
            reason = "decode" if error.startswith("decode:") else "deliveries"
            metrics.DLQ_MESSAGES.labels(entry.stream, self.group, reason).inc()
            log.error("moved to dead-letter stream",
                      extra={"stream": entry.stream, "group": self.group, "entry": entry.entry_id.decode(),
                             "error": error, "deliveries": entry.deliveries})

    async def _until_done(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` until it succeeds: acks are retried, never dropped, while Redis is away."""
        attempt = 0
        while True:
            try:
                return await op()
            except Exception as exc:
                if not (isinstance(exc, Retryable) or is_redis_down(exc)):
                    raise
                attempt += 1
                if self._stop.is_set() and attempt > 3:
                    raise
                await asyncio.sleep(backoff_delay(attempt))


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def ensure_group(bus: Bus, stream: str, group: str, start_id: str = "0") -> bool:
    """Create the group (and the stream) if missing; True if it was created."""
    try:
        await bus.redis.xgroup_create(bus.stream(stream), group, id=start_id, mkstream=True)
        return True
    except rexc.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


async def prune_idle_consumers(bus: Bus, stream: str, group: str, idle_ms: int) -> int:
    """Forget consumers with nothing pending that have been idle longer than ``idle_ms``."""
    removed = 0
    try:
        consumers = await bus.redis.xinfo_consumers(bus.stream(stream), group)
    except rexc.ResponseError:
        return 0
    for c in consumers:
        if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_ms:
            await bus.redis.xgroup_delconsumer(bus.stream(stream), group, c["name"])
            removed += 1
    return removed
