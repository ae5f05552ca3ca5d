"""One simulated exchange on 127.0.0.1: recorded frames over a real WebSocket, REST from
recorded bodies, and injectable faults.

The recording is one timeline of received frames (the exchange's history). A single pump
walks it, in order, for everyone: each frame first updates the simulated exchange's state
(``SimVenue.observe``: the books it would serve to a client that resyncs), then goes to
every connection subscribed to it, in the exchange's own protocol. The pump waits while no
connection is subscribed, so nothing is played to nobody; it runs as fast as the clients
read, or at the recorded pace (``speed``).

Faults are keyed by the frame's index in the timeline (0-based, received frames only):
``drop`` (the frame is never sent, but the exchange's state moves on: a gap),
``close_at`` (the connections that got the frame are closed right after it),
``corrupt_checksum`` (the frame is sent with a wrong checksum), ``garble`` (the frame is
sent cut in half, so it no longer parses, while the exchange's state moves on: a corrupted
message) and ``stall`` (the pump sleeps after the frame, as a frozen exchange would).

Extra REST routes (e.g. signed order endpoints) plug in through ``extra_routes`` or
``app`` before ``start()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import WSMsgType, web

from shared.capture import Record

log = logging.getLogger(__name__)

Key = Hashable
"""What a client subscribes to and a frame belongs to, in the venue's terms."""


@dataclass
class Faults:
    drop: set[int] = field(default_factory=set)
    close_at: set[int] = field(default_factory=set)
    corrupt_checksum: set[int] = field(default_factory=set)
    garble: set[int] = field(default_factory=set)
    stall: dict[int, float] = field(default_factory=dict)


_CLOSE = object()


class Connection:
    """One client: its subscriptions, protocol options and an ordered outbox."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self.id = uuid.uuid4().hex[:12]
        self.keys: set[Key] = set()
        self.options: dict[str, Any] = {}
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.frames_sent = 0

    def send(self, frame: bytes | str, *, binary: bool = False) -> None:
        """Queue a frame; queued frames leave in order (control replies and pumped frames alike)."""
        self.outbox.put_nowait((frame, binary))

    def close(self) -> None:
        self.outbox.put_nowait(_CLOSE)


class SimVenue(ABC):
    """One exchange's protocol, as the simulator speaks it."""

    name: str
    ws_paths: Sequence[str]
    binary_frames: bool = False
    server_ping_s: float | None = None
    """The server pings clients this often (Binance: 20 s)."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = records

    def routes(self, app: web.Application, sim: Simulator) -> None:
        """Exchange-specific REST routes, added before the generic recorded-body route."""
        return None

    def on_open(self, conn: Connection) -> None:
        """A client connected (Binance reads ``?streams=`` here)."""
        return None

    @abstractmethod
    def on_message(self, conn: Connection, data: str | bytes) -> None:
        """A client message: subscribe, unsubscribe, ping. Replies go through ``conn.send``."""

    @abstractmethod
    def route(self, frame: bytes) -> Key | None:
        """The subscription a recorded frame belongs to (None: not a market-data frame)."""

    def observe(self, frame: bytes) -> None:
        """Advance the exchange's state with a frame of its history (sent or not)."""
        return None

    def render(self, conn: Connection, frame: bytes) -> bytes | str:
        """The frame as this client asked to receive it."""
        return frame

    def corrupt_checksum(self, frame: bytes) -> bytes:
        raise ValueError(f"{self.name} frames carry no checksum")


class Simulator:
    def __init__(
        self,
        venue: SimVenue,
        *,
        faults: Faults | None = None,
        speed: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        rest_bodies: dict[str, bytes] | None = None,
        extra_routes: Iterable[Callable[[web.Application], None]] = (),
    ) -> None:
        self.venue = venue
        self.timeline: list[Record] = [r for r in venue.records if r.kind == "ws"]
        self.faults = faults or Faults()
        self.speed = speed
        self.host = host
        self.port = port
        self.rest_bodies = dict(rest_bodies or {})
        self.app = web.Application()
        self.connections: list[Connection] = []
        self.cursor = 0
        self.sent: list[int] = []
        """Timeline indices sent to at least one client, in order."""
        self.connects = 0
        self.rest_requests: list[str] = []
        self.finished = asyncio.Event()
        self._active = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._pump_task: asyncio.Task[None] | None = None
        venue.routes(self.app, self)
        for path in venue.ws_paths:
            self.app.router.add_get(path, self._ws)
        for add in extra_routes:
            add(self.app)

    # ------------------------------------------------------------------ lifecycle

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> Simulator:
        # The recorded-body route goes last so that exchange routes and extra routes win.
        self.app.router.add_route("*", "/{tail:.*}", self._recorded_rest)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        self._pump_task = asyncio.create_task(self._pump(), name=f"sim-pump:{self.venue.name}")
        return self

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Simulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def indices(self, predicate: Callable[[Record], bool]) -> list[int]:
        """Timeline indices of the frames matching ``predicate`` (to aim faults)."""
        return [i for i, r in enumerate(self.timeline) if predicate(r)]

    def subscribed(self) -> bool:
        return any(c.keys for c in self.connections)

    def activity(self) -> None:
        """Subscriptions changed: let the pump run if anyone listens."""
        if self.subscribed():
            self._active.set()
        else:
            self._active.clear()

    # ------------------------------------------------------------------ WebSocket

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.venue.server_ping_s, autoping=True, max_msg_size=1 << 22)
        await ws.prepare(request)
        conn = Connection(ws, request)
        self.connections.append(conn)
        self.connects += 1
        writer = asyncio.create_task(self._write(conn))
        try:
            self.venue.on_open(conn)
            self.activity()
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.venue.on_message(conn, msg.data)
                    self.activity()
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.connections.remove(conn)
            self.activity()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        return ws

    async def _write(self, conn: Connection) -> None:
        ws = conn.ws
        while True:
            item = await conn.outbox.get()
            if item is _CLOSE:
                await ws.close()
                return
            frame, binary = item
            try:
                if binary:
                    await ws.send_bytes(frame if isinstance(frame, bytes) else frame.encode())
                else:
                    await ws.send_str(frame if isinstance(frame, str) else frame.decode())
            except (ConnectionResetError, RuntimeError):
                return
            conn.frames_sent += 1

    async def _pump(self) -> None:
        faults = self.faults
        started_wall = started_rec = 0.0
        while self.cursor < len(self.timeline):
            if not self._active.is_set():
                await self._active.wait()
                started_wall = 0.0  # recorded pacing restarts after a pause
            i = self.cursor
            self.cursor += 1
            record = self.timeline[i]
            frame = record.data
            self.venue.observe(frame)
            if i in faults.drop:
                continue
            key = self.venue.route(frame)
            targets = [c for c in self.connections if key is not None and key in c.keys]
            if not targets:
                continue
            if self.speed is not None and record.recv_ns:
                if not started_wall:
                    started_wall, started_rec = time.perf_counter(), record.recv_ns
                due = started_wall + (record.recv_ns - started_rec) / 1e9 / self.speed
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if i in faults.corrupt_checksum:
                frame = self.venue.corrupt_checksum(frame)
            for conn in targets:
                out = self.venue.render(conn, frame)
                if i in faults.garble:
                    out = out[: len(out) // 2]
                conn.send(out, binary=self.venue.binary_frames)
                if i in faults.close_at:
                    conn.keys.clear()
                    conn.close()
            self.sent.append(i)
            if i in faults.close_at:
                self.activity()
            if i in faults.stall:
                await asyncio.sleep(faults.stall[i])
            # Let the writers drain: the pump never runs far ahead of the slowest client.
            while any(c.outbox.qsize() > 512 for c in targets if not c.ws.closed):
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)
        self.finished.set()

    # ------------------------------------------------------------------ REST

    async def _recorded_rest(self, request: web.Request) -> web.StreamResponse:
        """Any GET answered from a recorded REST response with the same path whose query
        parameters the request includes (or from ``rest_bodies`` by path)."""
        self.rest_requests.append(request.path_qs)
        if request.path in self.rest_bodies:
            return web.Response(body=self.rest_bodies[request.path], content_type="application/json")
        asked = dict(request.query)
        for record in self.venue.records:
            if record.kind != "rest" or not record.url:
                continue
            parts = urlsplit(record.url)
            if parts.path == request.path and set(parse_qsl(parts.query)) <= set(asked.items()):
                return web.Response(body=record.data, content_type="application/json")
        return web.json_response({"error": "not recorded", "path": request.path_qs}, status=404)
