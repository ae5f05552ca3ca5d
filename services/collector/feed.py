"""The live shell around one exchange's ``FeedCore``: WebSocket, REST, reconnects, resyncs.

``Feed.run`` loads the instruments (public REST, retried while the exchange is
unreachable), then keeps one WebSocket session alive: connect, subscribe, hand every frame
to the core with its receive time, pass the core's outputs to ``emit`` and carry out what
it asks for -- a REST snapshot (rate-limited, retried) or a resubscription. A session that
ends after receiving data reconnects at once (after a few ms of jitter); one that fails
backs off exponentially with jitter (tenacity), up to ``reconnect_max_s``. A watchdog marks
silent books stale and drops a connection that went quiet, so a dead socket is noticed
even when the OS does not say so.

Nothing here knows an exchange's rules: those come through the ``Venue`` interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlencode

import websockets
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from services.collector import metrics
from services.collector.core import FeedCore, FetchSnapshot, Resubscribe
from services.collector.rest import RestClient
from services.collector.venue import Fees, RestRequest, Venue
from shared.models import Instrument, Message

log = logging.getLogger(__name__)

Emit = Callable[[list[Message]], None]
MIN_SNAPSHOT_INTERVAL_S = 0.1


class FrameTap(Protocol):
    """Receives every frame and REST response as it arrives (``arb record``)."""

    def frame(self, recv_ns: int, frame: bytes) -> None: ...

    def rest(self, recv_ns: int, url: str, body: bytes) -> None: ...


class SessionFailed(Exception):
    """A session that ended before it delivered anything: back off before the next one."""


class Feed:
    def __init__(
        self,
        venue: Venue,
        core: FeedCore,
        rest: RestClient,
        *,
        ws_url: str,
        symbols: Sequence[str],
        fees: Fees,
        emit: Emit,
        on_instruments: Callable[[list[Instrument]], Awaitable[None]] | None = None,
        reconnect_initial_s: float = 0.05,
        reconnect_max_s: float = 30.0,
        silence_timeout_s: float = 30.0,
        check_interval_s: float = 0.1,
        resubscribe_interval_s: float = 1.0,
        tap: FrameTap | None = None,
        natives: Sequence[str] | None = None,
    ) -> None:
        """``natives``: subscribe these exchange symbols as they are, without loading instrument
        metadata (recording or replaying markets the metadata endpoint does not list)."""
        self.venue = venue
        self.core = core
        self.rest = rest
        self.ws_url = ws_url
        self.symbols = list(symbols)
        self.fees = fees
        self.emit = emit
        self.on_instruments = on_instruments
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.silence_timeout_s = silence_timeout_s
        self.check_interval_s = check_interval_s
        self.resubscribe_interval_s = resubscribe_interval_s
        self.tap = tap
        self.natives: list[str] = list(natives or ())
        self.state = "starting"
        self.sessions = 0
        self.last_error = ""
        self.last_frame_ns = 0
        self._ws: Any = None
        self._generation = 0
        self._fetching: set[str] = set()
        self._last_fetch: dict[str, float] = {}
        self._resubscribing: set[str] = set()
        self._resubscribe_again: set[str] = set()
        self._last_resubscribe: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._frames = metrics.FRAMES.labels(venue.name)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stopping.set()
        if self._ws is not None:
            self._spawn(self._ws.close())

    async def run(self) -> None:
        watchdog = asyncio.create_task(self._watch(), name=f"watchdog:{self.venue.name}")
        try:
            if not await self._load_instruments():
                return
            while not self._stopping.is_set():
                retrying = AsyncRetrying(
                    wait=wait_exponential_jitter(multiplier=self.reconnect_initial_s, max=self.reconnect_max_s,
                                                 jitter=self.reconnect_initial_s),
                    retry=retry_if_exception_type(Exception),
                    stop=self._stopped,
                    reraise=True,
                    before_sleep=self._before_retry,
                )
                async for attempt in retrying:
                    with attempt:
                        await self._session()
                # A session that delivered data ended: reconnect now, with a little jitter.
                await self._sleep(random.uniform(0, self.reconnect_initial_s))
        except Exception:
            if not self._stopping.is_set():
                raise
        finally:
            watchdog.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(watchdog, *self._tasks, return_exceptions=True)
            self.state = "stopped"

    def _stopped(self, retry_state: Any) -> bool:
        return self._stopping.is_set()

    def _before_retry(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        self.last_error = f"{type(exc).__name__}: {exc}" if exc else ""
        log.warning("exchange unreachable, retrying", extra={"exchange": self.venue.name, "error": self.last_error,
                                                             "attempt": retry_state.attempt_number})

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # ------------------------------------------------------------------ instruments

    async def _get(self, request: RestRequest) -> bytes:
        body = await self.rest.get(request)
        if self.tap is not None:
            query = f"?{urlencode(request.params)}" if request.params else ""
            self.tap.rest(time.time_ns(), self.rest.url(request) + query, body)
        return body

    async def _load_instruments(self) -> bool:
        if self.natives:
            self.core.track(self.natives, time.time_ns())
            self._flush()
            return True
        self.state = "loading instruments"
        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=self.reconnect_max_s, jitter=0.5),
            retry=retry_if_exception_type(Exception), stop=self._stopped, reraise=True,
            before_sleep=self._before_retry,
        ):
            with attempt:
                instruments = await self.venue.load_instruments(self._get, self.symbols, self.fees)
        found = {i.symbol for i in instruments}
        missing = sorted(set(self.symbols) - found)
        if missing:
            log.error("symbols not listed by the exchange", extra={"exchange": self.venue.name, "symbols": missing})
        self.core.set_instruments(instruments)
        self.natives = [i.native for i in instruments if i.symbol in set(self.symbols)]
        if self.on_instruments is not None:  # stored in the background: a slow store never holds the books
            self._spawn(self.on_instruments(instruments))
        if not self.natives:
            self.state = "no symbols"
            return False
        self.core.track(self.natives, time.time_ns())
        self._flush()
        return True

    # ------------------------------------------------------------------ session

    async def _session(self) -> None:
        url = await self.venue.open_url(self._get, self.ws_url, self.natives)
        rule = self.venue.ping
        ws_ping = rule.interval_s if rule.interval_s and rule.message is None else None
        self.state = "connecting"
        delivered = False
        reason = "closed"
        pinger: asyncio.Task[None] | None = None
        try:
            async with websockets.connect(url, ping_interval=ws_ping, ping_timeout=ws_ping, open_timeout=10,
                                          close_timeout=1, max_size=1 << 24, compression=None) as ws:
                self._ws = ws
                self._generation += 1
                self.sessions += 1
                self.state = "connected"
                self.last_frame_ns = time.time_ns()
                self.core.on_connected(self.last_frame_ns)
                for message in self.venue.subscribe(self.natives):
                    await ws.send(message)
                if rule.interval_s and rule.message is not None:
                    pinger = asyncio.create_task(self._ping(ws, rule.interval_s, rule.message))
                core, emit, tap, frames = self.core, self.emit, self.tap, self._frames
                while True:
                    frame = await ws.recv(decode=False)
                    recv_ns = time.time_ns()
                    self.last_frame_ns = recv_ns
                    frames.inc()
                    if tap is not None:
                        tap.frame(recv_ns, frame)
                    core.on_frame(frame, recv_ns)
                    delivered = True
                    if core.outputs:
                        emit(core.take())
                    if core.actions:
                        self._act()
        except websockets.ConnectionClosed as exc:
            reason = f"closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            reason = f"{type(exc).__name__}"
            self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ws = None
            if pinger is not None:
                pinger.cancel()
            if self.state == "connected":
                self.state = "reconnecting"
                metrics.RECONNECTS.labels(self.venue.name, reason.split(" ")[0]).inc()
                self.core.on_disconnected(time.time_ns(), "disconnected")
                self._flush()
        if not delivered and not self._stopping.is_set():
            raise SessionFailed(reason)

    async def _ping(self, ws: Any, interval_s: float, message: str) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await ws.send(message)

    async def _watch(self) -> None:
        """Silence: books without changes turn stale; a quiet connection is dropped."""
        while True:
            await asyncio.sleep(self.check_interval_s)
            now = time.time_ns()
            try:
                self.core.check_silence(now)
                self._flush()
            except Exception:  # the watchdog must outlive any one bad turn
                log.exception("silence check failed", extra={"exchange": self.venue.name})
            ws = self._ws
            if ws is not None and now - self.last_frame_ns > self.silence_timeout_s * 1e9:
                log.warning("connection silent, reconnecting", extra={"exchange": self.venue.name})
                self.last_frame_ns = now
                self._spawn(ws.close())

    def _flush(self) -> None:
        if self.core.outputs:
            self.emit(self.core.take())
        if self.core.actions:
            self._act()

    # ------------------------------------------------------------------ resync actions

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _act(self) -> None:
        for action in self.core.take_actions():
            native = action.native
            if type(action) is FetchSnapshot and native not in self._fetching:
                self._fetching.add(native)
                self._spawn(self._fetch(native, self._generation))
            elif type(action) is Resubscribe:
                if native in self._resubscribing:
                    self._resubscribe_again.add(native)  # asked again while one is under way
                else:
                    self._resubscribing.add(native)
                    self._spawn(self._resubscribe(native, self._generation))

    async def _fetch(self, native: str, generation: int) -> None:
        # A snapshot older than the stream is asked again (Binance's rule), but not in a tight loop.
        wait = self._last_fetch.get(native, -1e9) + MIN_SNAPSHOT_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_fetch[native] = time.monotonic()
        request = self.venue.snapshot_request(native)
        query = f"?{urlencode(request.params)}" if request.params else ""
        url = self.rest.url(request) + query
        try:
            async for attempt in AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.05, max=self.reconnect_max_s, jitter=0.05),
                retry=retry_if_exception_type(Exception), stop=self._stopped, reraise=True,
                before_sleep=self._before_retry,
            ):
                with attempt:
                    if generation != self._generation:
                        return  # the connection it was for is gone
                    body = await self.rest.get(request)
        finally:
            self._fetching.discard(native)
            # A new connection's book may have asked while this one was under way (and been
            # told one was coming): it gets its own.
            if generation != self._generation and not self._stopping.is_set():
                entry = self.core.books.get(native)
                if entry is not None and entry.sync.awaiting_snapshot:
                    self._fetching.add(native)
                    self._spawn(self._fetch(native, self._generation))
        recv_ns = time.time_ns()
        if generation != self._generation:
            return
        if self.tap is not None:
            self.tap.rest(recv_ns, url, body)
        self.core.on_rest(url, body, recv_ns, native=native)
        self._flush()

    async def _resubscribe(self, native: str, generation: int) -> None:
        # At most one resubscription per book per interval: OKX allows 480 (un)subscribes an hour.
        try:
            wait = self._last_resubscribe.get(native, -1e9) + self.resubscribe_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            ws = self._ws
            if ws is None or generation != self._generation:
                return  # a new connection subscribes afresh anyway
            self._last_resubscribe[native] = time.monotonic()
            for message in self.venue.resubscribe(native):
                await ws.send(message)
        finally:
            self._resubscribing.discard(native)
            if native in self._resubscribe_again and not self._stopping.is_set():
                self._resubscribe_again.discard(native)
                self._resubscribing.add(native)
                self._spawn(self._resubscribe(native, self._generation))

    # ------------------------------------------------------------------ reporting

    def health(self) -> dict[str, Any]:
        books = self.core.health(time.time_ns())
        for symbol in self.symbols:  # configured books not known yet (no metadata: offline)
            books.setdefault(symbol, {"status": "stale", "reason": self.state, "seq": 0, "age_s": None})
        return {
            "state": self.state,
            "sessions": self.sessions,
            "last_error": self.last_error,
            "books": books,
        }
