"""What `arb status` reports: services (heartbeat + /health), streams and consumer-group lag."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from shared.config import Config
from shared.logs import Redactor
from shared.models import Heartbeat
from shared.runtime import Bus
from shared.runtime.inspect import list_streams, stream_stats
from shared.service import HEARTBEAT_MAX_AGE_S
from shared.streams import KeySpace


def redis_url_for(cfg: Config) -> tuple[str, list[str] | None]:
    """The Redis of the running stack, and the services it started (None: not started by us)."""
    from shared.launcher import Stack

    stack = Stack.read(Path(cfg.var_dir).resolve())
    if stack is not None:
        return stack.redis_url, list(stack.services)
    return os.environ.get("REDIS_URL", cfg.redis.url), None


async def heartbeats(bus: Bus) -> list[Heartbeat]:
    raw = await bus.redis.hgetall(bus.keys.heartbeats())
    out = []
    for value in raw.values():
        try:
            out.append(msgspec.json.decode(value, type=Heartbeat))
        except msgspec.DecodeError:
            continue
    return out


def base_url(hb: Heartbeat) -> str:
    """Where an instance serves /health and /metrics: the address its heartbeat advertises
    (a container's IP under compose), or this machine."""
    host = "127.0.0.1" if hb.host in ("", socket.gethostname()) else hb.host
    return f"http://{host}:{hb.http_port}"


async def fetch_health(session: aiohttp.ClientSession, hb: Heartbeat) -> dict[str, Any]:
    if not hb.http_port:
        return {"status": "unknown", "error": "no http port"}
    url = f"{base_url(hb)}/health"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            doc: dict[str, Any] = await resp.json()
            return doc
    except Exception as exc:
        return {"status": "unreachable", "error": type(exc).__name__}


async def _collect(cfg: Config) -> dict[str, Any]:
    url, started = redis_url_for(cfg)
    expected = started if started is not None else list(cfg.services.enabled)
    bus = Bus.from_url(url, prefix=cfg.redis.stream_prefix, keys=KeySpace(cfg.env, cfg.session))
    report: dict[str, Any] = {"redis": Redactor()(url), "services": [], "streams": [], "healthy": False}
    try:
        t0 = time.perf_counter()
        await asyncio.wait_for(bus.redis.ping(), timeout=2)
        report["redis_ping_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    except Exception as exc:
        report["error"] = f"redis unreachable: {type(exc).__name__}"
        await bus.close()
        return report
    try:
        now = time.time_ns()
        beats = [hb for hb in await heartbeats(bus) if (now - hb.ts_ns) / 1e9 < 3 * HEARTBEAT_MAX_AGE_S]
        async with aiohttp.ClientSession() as session:
            healths = await asyncio.gather(*(fetch_health(session, hb) for hb in beats))
        for hb, health in zip(beats, healths, strict=True):
            age = (now - hb.ts_ns) / 1e9
            report["services"].append({
                "service": hb.service,
                "instance": hb.instance,
                "pid": hb.pid,
                "heartbeat_age_s": round(age, 3),
                "status": health.get("status", "unknown") if age < HEARTBEAT_MAX_AGE_S else "stale",
                "uptime_s": health.get("uptime_s"),
                "http_port": hb.http_port,
            })
        for name in await list_streams(bus):
            stats = await stream_stats(bus, name)
            if stats is not None:
                report["streams"].append(msgspec.to_builtins(stats))
        running = {s["service"] for s in report["services"] if s["status"] == "ok"}
        report["missing"] = sorted(set(expected) - running)
        report["healthy"] = not report["missing"] and all(s["status"] == "ok" for s in report["services"])
    finally:
        await bus.close()
    return report


def collect_status(cfg: Config) -> dict[str, Any]:
    return asyncio.run(_collect(cfg))


def render_status(report: dict[str, Any]) -> str:
    lines = [f"redis {report['redis']}  ping {report.get('redis_ping_ms', '-')} ms"]
    if "error" in report:
        lines.append(f"ERROR {report['error']}")
        return "\n".join(lines)
    lines.append(f"{'SERVICE':<12} {'INSTANCE':<40} {'STATUS':<10} {'HEARTBEAT':>9} {'UPTIME':>9}")
    for s in sorted(report["services"], key=lambda s: (s["service"], s["instance"])):
        lines.append(f"{s['service']:<12} {s['instance']:<40} {s['status']:<10} "
                     f"{s['heartbeat_age_s']:>8.1f}s {s['uptime_s'] or 0:>8.0f}s")
    for name in report.get("missing", []):
        lines.append(f"{name:<12} {'-':<40} {'missing':<10}")
    lines.append("")
    lines.append(f"{'STREAM':<24} {'LENGTH':>9}  {'GROUP':<14} {'LAG':>8} {'PENDING':>8} {'CONSUMERS':>9}")
    for st in report["streams"]:
        if not st["groups"]:
            lines.append(f"{st['stream']:<24} {st['length']:>9}  {'-':<14}")
        for g in st["groups"]:
            lines.append(f"{st['stream']:<24} {st['length']:>9}  {g['group']:<14} {g['lag']:>8} "
                         f"{g['pending']:>8} {g['consumers']:>9}")
    lines.append("")
    lines.append("healthy" if report["healthy"] else "NOT healthy")
    return "\n".join(lines)
