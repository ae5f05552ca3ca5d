"""Each service's HTTP endpoint: ``/metrics`` (Prometheus) and ``/health`` (JSON)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

HealthFn = Callable[[], Awaitable[dict[str, Any]]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, RouteHandler]
"""(method, path, handler): an endpoint a service adds next to /metrics and /health."""


class HttpServer:
    def __init__(self, host: str, port: int, health: HealthFn, routes: Sequence[Route] = ()) -> None:
        self.host = host
        self.port = port
        self._health = health
        self._routes = list(routes)
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health_view)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server: Any = site._server
        if server is not None and server.sockets:  # port 0: report the one the OS chose
            self.port = server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health_view(self, _: web.Request) -> web.Response:
        doc = await self._health()
        status = 200 if doc.get("status") == "ok" else 503
        return web.Response(body=msgspec.json.encode(doc), status=status, content_type="application/json")
