"""`arb health`: one line per check, exit 0 when nothing is in ERROR, 1 otherwise.

Checks: Redis (reachable, ping latency), PostgreSQL (reachable, migrations applied),
ClickHouse, every expected service (heartbeat age and its /health), anything a service
reports about its own parts (e.g. the alerter's sinks), and every consumer group's lag
and every dead-letter stream. WARN never fails the run: it is worth a look, not a page.

``arb health --service NAME`` checks only that service's /health on this machine, like
the container HEALTHCHECK (``python -m shared.ops.probe``, which imports far less).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import psycopg

from shared.config import SERVICES, Config, ConfigError, load_config
from shared.db import migrations
from shared.logs import Redactor
from shared.ops.targets import GONE_AFTER_S, Instance, Targets, instances, resolve
from shared.runtime import Bus
from shared.runtime.inspect import list_streams, stream_stats
from shared.service import HEARTBEAT_MAX_AGE_S
from shared.streams import DLQ_PREFIX

Status = Literal["OK", "WARN", "ERROR", "SKIP", "DISABLED"]
STATUSES: tuple[Status, ...] = ("OK", "WARN", "ERROR", "SKIP", "DISABLED")


@dataclass(frozen=True, slots=True)
class Check:
    status: Status
    name: str
    detail: str = ""


def healthy(checks: list[Check]) -> bool:
    return not any(c.status == "ERROR" for c in checks)


def render(checks: list[Check]) -> str:
    return "\n".join(f"{c.status:<9}{c.name:<30} {c.detail}".rstrip() for c in checks)


# --------------------------------------------------------------------------- checks


async def check_redis(bus: Bus, cfg: Config, url: str) -> Check:
    where = Redactor()(url)
    try:
        await bus.redis.ping()  # connects; the timed pings below measure round trips only
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            await bus.redis.ping()
            samples.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        return Check("ERROR", "redis", f"unreachable at {where} ({type(exc).__name__})")
    ms = statistics.median(samples)
    limit = cfg.ops.redis_ping_warn_ms
    status: Status = "OK" if ms < limit else "WARN"
    return Check(status, "redis", f"ping {ms:.2f} ms (limit {limit:g} ms) at {where}")


async def check_postgres(url: str, timeout_s: float) -> Check:
    latest = max((m.version for m in migrations()), default=0)
    try:
        t0 = time.perf_counter()
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True)
        async with conn:
            await conn.execute("SELECT 1")
            ms = (time.perf_counter() - t0) * 1000
            try:
                cur = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
                row = await cur.fetchone()
                applied = int(row[0]) if row else 0
            except psycopg.errors.UndefinedTable:
                applied = 0
    except Exception as exc:
        return Check("ERROR", "postgresql", f"unreachable ({type(exc).__name__})")
    if applied < latest:
        return Check("ERROR", "postgresql", f"schema at migration {applied}, code needs {latest}: run `arb db migrate`")
    return Check("OK", "postgresql", f"connect+query {ms:.1f} ms, migrations up to date ({latest})")


async def check_clickhouse(cfg: Config, targets: Targets, http: aiohttp.ClientSession) -> Check:
    url = targets.clickhouse_url
    if not cfg.clickhouse.enabled:
        return Check("DISABLED", "clickhouse", "clickhouse.enabled = false")
    if url.startswith("chdb://"):
        owner = "the collector process" if "collector" in targets.expected_services else "its writer process"
        return Check("SKIP", "clickhouse",
                     f"embedded chDB at {url[len('chdb://'):]} is opened only by {owner} (one process per directory)")
    parts = urlsplit(url)
    ping = f"{parts.scheme}://{parts.hostname}:{parts.port or 8123}/ping"
    try:
        t0 = time.perf_counter()
        async with http.get(ping) as resp:
            body = await resp.text()
            ms = (time.perf_counter() - t0) * 1000
    except Exception as exc:
        return Check("ERROR", "clickhouse", f"unreachable at {parts.hostname}:{parts.port} ({type(exc).__name__})")
    if resp.status != 200:
        return Check("ERROR", "clickhouse", f"/ping answered {resp.status}: {body.strip()[:80]}")
    return Check("OK", "clickhouse", f"/ping {ms:.1f} ms")


async def _fetch_health(http: aiohttp.ClientSession, inst: Instance) -> dict[str, Any] | str:
    try:
        async with http.get(inst.base_url + "/health") as resp:
            doc: dict[str, Any] = await resp.json()
            return doc
    except Exception as exc:
        return type(exc).__name__


def _instance_check(inst: Instance, health: dict[str, Any] | str) -> list[Check]:
    name = f"service {inst.beat.service}"
    who = inst.beat.instance
    beat = f"heartbeat {inst.age_s:.1f}s"
    if inst.age_s > HEARTBEAT_MAX_AGE_S:
        return [Check("ERROR", name, f"{who}: {beat} old (limit {HEARTBEAT_MAX_AGE_S:g}s)")]
    if isinstance(health, str):
        return [Check("ERROR", name, f"{who}: {beat}, /health unreachable ({health})")]
    status = health.get("status")
    detail = f"{who}: {beat}, /health {status}, up {float(health.get('uptime_s') or 0):.0f}s"
    if health.get("reason"):
        detail += f" ({health['reason']})"
    out = [Check("OK" if status == "ok" else "WARN" if status in ("degraded", "stopping") else "ERROR", name, detail)]
    for part in health.get("checks", []):  # what the service reports about its own parts
        part_status: Status = part["status"] if part.get("status") in STATUSES else "WARN"
        out.append(Check(part_status, f"{name}/{part.get('name', '?')}", str(part.get("detail", ""))))
    return out


async def check_services(bus: Bus, targets: Targets, http: aiohttp.ClientSession) -> list[Check]:
    everyone = await instances(bus, include_gone=True)
    live = [i for i in everyone if i.age_s < GONE_AFTER_S]
    healths = await asyncio.gather(*(_fetch_health(http, i) for i in live))
    out: list[Check] = []
    for service in SERVICES:
        name = f"service {service}"
        if service not in targets.expected_services:
            out.append(Check("DISABLED", name, "not among the services this stack runs"))
            continue
        mine = [(i, h) for i, h in zip(live, healths, strict=True) if i.beat.service == service]
        if not mine:
            gone = [i.age_s for i in everyone if i.beat.service == service]
            detail = f"no live instance; last heartbeat {min(gone):.0f}s ago" if gone else "no heartbeat: not running"
            out.append(Check("ERROR", name, detail))
            continue
        for inst, health in mine:
            out.extend(_instance_check(inst, health))
    return out


async def check_streams(bus: Bus, cfg: Config) -> list[Check]:
    out: list[Check] = []
    warn, limit = cfg.ops.consumer_lag_warn, cfg.ops.consumer_lag_max
    for stream in await list_streams(bus):
        stats = await stream_stats(bus, stream)
        if stats is None:
            continue
        if stream.startswith(DLQ_PREFIX):
            if stats.length:
                out.append(Check("WARN", f"dlq {stream}", f"{stats.length} dead letters (`arb streams` shows them)"))
            continue
        for g in stats.groups:
            status: Status = "ERROR" if g.lag > limit else "WARN" if g.lag > warn else "OK"
            out.append(Check(status, f"lag {stream}/{g.group}",
                             f"lag {g.lag} (warn {warn}, limit {limit}), pending {g.pending}, consumers {g.consumers}"))
    if not out:
        out.append(Check("OK", "lag", "no consumer groups yet"))
    return out


async def _bounded(coro: Any, timeout: float, name: str) -> list[Check]:
    try:
        result = await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        return [Check("ERROR", name, f"no answer within {timeout:g}s")]
    return result if isinstance(result, list) else [result]


async def run_checks(cfg: Config, targets: Targets) -> list[Check]:
    timeout = cfg.ops.check_timeout_s
    bus = targets.bus(cfg)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            redis_check, pg_check, ch_check = await asyncio.gather(
                _bounded(check_redis(bus, cfg, targets.redis_url), timeout, "redis"),
                _bounded(check_postgres(targets.database_url, timeout), timeout + 1, "postgresql"),
                _bounded(check_clickhouse(cfg, targets, http), timeout + 1, "clickhouse"),
            )
            checks = redis_check + pg_check + ch_check
            if redis_check[0].status == "ERROR":
                checks.append(Check("SKIP", "services", "heartbeats live in Redis, which is unreachable"))
                checks.append(Check("SKIP", "lag", "Redis is unreachable"))
                return checks
            checks += await _bounded(check_services(bus, targets, http), 2 * timeout, "services")
            checks += await _bounded(check_streams(bus, cfg), 2 * timeout, "lag")
            return checks
    finally:
        await bus.close()


# --------------------------------------------------------------------------- command


def cmd_health(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="arb health",
        description="Check Redis, PostgreSQL, ClickHouse, every service and consumer lag; exit 0 when healthy.")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--service", choices=SERVICES,
                   help="check only this service's /health on this machine (a container HEALTHCHECK)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.service:
        from shared.ops.probe import probe

        ok, detail = probe(cfg, args.service)
        checks = [Check("OK" if ok else "ERROR", f"service {args.service}", detail)]
    else:
        checks = asyncio.run(run_checks(cfg, resolve(cfg)))
    if args.json:
        print(json.dumps({"healthy": healthy(checks), "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks))
    return 0 if healthy(checks) else 1
