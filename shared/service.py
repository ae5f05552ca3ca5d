"""The shell every service shares: config, logging, bus, HTTP, heartbeats, consumers, shutdown.

A service subclasses ``Service``, declares its consumers and background tasks in
``setup()``, and keeps its decisions in a pure core elsewhere. ``run_service`` is the
process entry point (``python -m services.<name>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, ClassVar

from shared import metrics
from shared.config import Config, ConfigError, Secrets, load_config, service_port
from shared.http import HttpServer, Route
from shared.logs import setup_logging
from shared.models import Heartbeat, encode
from shared.ops.logstore import attach_log_handlers
from shared.runtime import Bus, Consumer, Delivery, Producer, default_consumer_name, is_redis_down
from shared.runtime.bus import wait_event
from shared.runtime.inspect import stream_stats
from shared.runtime.trim import trim_acknowledged
from shared.streams import dlq, policy

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_MAX_AGE_S = 10.0
LAG_INTERVAL_S = 5.0
TRIM_INTERVAL_S = 30.0


class Service:
    name: ClassVar[str] = "service"

    def __init__(self, cfg: Config, secrets: Secrets | None = None, *, instance: str | None = None) -> None:
        self.cfg = cfg
        self.secrets = secrets or Secrets({})
        self.instance = instance or default_consumer_name(self.name)
        self.bus = Bus.from_config(cfg)
        self.producer = Producer(self.bus)
        self.consumers: list[Consumer] = []
        self.started_ns = time.time_ns()
        self.http: HttpServer | None = None
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._degraded: str = ""

    # ------------------------------------------------------------------ declaration

    def consumer(
        self,
        group: str,
        streams: Iterable[str],
        handler: Callable[[Delivery], Awaitable[None]],
        **overrides: Any,
    ) -> Consumer:
        r = self.cfg.redis
        options: dict[str, Any] = dict(
            batch_size=r.batch_size,
            block_ms=r.block_ms,
            claim_idle_ms=r.claim_idle_ms,
            claim_interval_ms=r.claim_interval_ms,
            max_deliveries=r.max_deliveries,
            producer=self.producer,
            service=self.name,
        )
        options.update(overrides)
        c = Consumer(self.bus, group=group, streams=streams, handler=handler, name=self.instance, **options)
        self.consumers.append(c)
        return c

    def background(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn()`` for the life of the service (cancelled at shutdown)."""
        self._background.append(fn)

    def degrade(self, reason: str) -> None:
        """Report ``degraded`` in /health (e.g. a database is unreachable); '' clears it."""
        self._degraded = reason

    # ------------------------------------------------------------------ hooks

    async def setup(self) -> None:
        """Declare consumers and background tasks; open connections."""

    async def teardown(self) -> None:
        """Close what ``setup`` opened; runs after consumers stopped and outputs flushed."""

    async def extra_health(self) -> dict[str, Any]:
        return {}

    def http_routes(self) -> list[Route]:
        """Endpoints served next to /metrics and /health (e.g. a webhook)."""
        return []

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stopping.set()
        for c in self.consumers:
            c.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; returns False when stopping."""
        return not await wait_event(self._stopping, seconds)

    async def main(self) -> None:
        metrics.SERVICE_UP.labels(self.name).set(1)
        metrics.SERVICE_START_TIME.labels(self.name).set(self.started_ns / 1e9)
        self.http = HttpServer(self.cfg.http.host, service_port(self.cfg, self.name), self.health,
                               self.http_routes())
        port = await self.http.start()
        log.info("service starting", extra={"instance": self.instance, "http_port": port})
        try:
            await self.setup()
            self._tasks = [asyncio.create_task(self._heartbeats(), name="heartbeats"),
                           asyncio.create_task(self._lag_metrics(), name="lag"),
                           asyncio.create_task(self._trim_obligations(), name="trim")]
            self._tasks += [asyncio.create_task(fn(), name=fn.__name__) for fn in self._background]
            runs = [asyncio.create_task(c.run(), name=f"consumer:{c.group}") for c in self.consumers]
            waiter = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*runs, *self._tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and not task.cancelled() and task.exception() is not None:
                    log.error("task failed, stopping", exc_info=task.exception(),
                              extra={"task": task.get_name()})
                    self.stop()
                    raise task.exception()  # type: ignore[misc]
            self.stop()
            await asyncio.gather(*runs, return_exceptions=True)  # each finishes its batch
            waiter.cancel()
        finally:
            self.stop()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.producer.close()
            await self.teardown()
            with contextlib.suppress(Exception):
                await self.bus.redis.hdel(self.bus.keys.heartbeats(), self.instance)
            await self.http.stop()
            await self.bus.close()
            metrics.SERVICE_UP.labels(self.name).set(0)
            log.info("service stopped", extra={"instance": self.instance})

    # ------------------------------------------------------------------ health

    async def _heartbeats(self) -> None:
        key = self.bus.keys.heartbeats()
        host = self._advertised_host()
        while not self.stopping:
            hb = Heartbeat(
                service=self.name,
                instance=self.instance,
                pid=os.getpid(),
                ts_ns=time.time_ns(),
                started_ns=self.started_ns,
                status="degraded" if self._degraded else "ok",
                http_port=self.http.port if self.http else 0,
                host=host,
            )
            try:
                await self.bus.redis.hset(key, self.instance, encode(hb))
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
            await self.sleep(HEARTBEAT_INTERVAL_S)

    def _advertised_host(self) -> str:
        """Where other processes reach this one's /health and /metrics: the bound address, or
        this host's own address when bound to all interfaces (a container's IP in compose)."""
        host = self.cfg.http.host
        if host not in ("0.0.0.0", "::", ""):
            return host
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return socket.gethostname()

    async def _lag_metrics(self) -> None:
        while not self.stopping:
            with contextlib.suppress(Exception):
                await self.group_stats()
            await self.sleep(LAG_INTERVAL_S)

    async def _trim_obligations(self) -> None:
        """Trim what this service produced into obligation streams, once every group has it."""
        while await self.sleep(TRIM_INTERVAL_S):
            for stream in self.producer.streams:
                if policy(stream).keep_unacked:
                    with contextlib.suppress(Exception):
                        await trim_acknowledged(self.bus, stream)

    async def group_stats(self) -> list[dict[str, Any]]:
        out = []
        for c in self.consumers:
            for stream in c.streams:
                stats = await stream_stats(self.bus, stream)
                if stats is not None:
                    metrics.STREAM_LENGTH.labels(stream).set(stats.length)
                metrics.DLQ_LENGTH.labels(stream).set(await self.bus.redis.xlen(self.bus.stream(dlq(stream))))
                for g in stats.groups if stats else ():
                    if g.group == c.group:
                        metrics.CONSUMER_LAG.labels(stream, g.group).set(g.lag)
                        metrics.CONSUMER_PENDING.labels(stream, g.group).set(g.pending)
                        out.append({"stream": stream, "group": g.group, "lag": g.lag, "pending": g.pending})
        return out

    async def health(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "service": self.name,
            "instance": self.instance,
            "status": "ok",
            "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 3),
        }
        try:
            t0 = time.perf_counter()
            await asyncio.wait_for(self.bus.redis.ping(), timeout=1.0)
            doc["redis"] = {"reachable": True, "ping_ms": round((time.perf_counter() - t0) * 1000, 3)}
            doc["consumers"] = await asyncio.wait_for(self.group_stats(), timeout=2.0)
        except Exception as exc:
            doc["redis"] = {"reachable": False, "error": type(exc).__name__}
            doc["status"] = "degraded"
        if self._degraded:
            doc["status"] = "degraded"
            doc["reason"] = self._degraded
        if self.stopping:
            doc["status"] = "stopping"
        doc.update(await self.extra_health())
        return doc


def run_service(cls: type[Service], argv: list[str] | None = None) -> None:
    """Process entry point: load config (exit 2 on a bad one), then run until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{cls.name}")
    parser.add_argument("--config", help="TOML config file (default: $ARB_CONFIG or ./arb.toml)")
    parser.add_argument("--instance", help="consumer name (default: <service>-<host>-<pid>)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        secrets = Secrets.load()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    redactor = setup_logging(cls.name, cfg.session, cfg.log.level, secrets.redaction_values())
    log_handlers = attach_log_handlers(cfg, cls.name, redactor)
    service = cls(cfg, secrets, instance=args.instance)
    install_event_loop_policy()

    async def _run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.main()

    try:
        asyncio.run(_run())
    except ConfigError as err:  # refused by the service's own setup()
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        log_handlers.close()


def install_event_loop_policy() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
