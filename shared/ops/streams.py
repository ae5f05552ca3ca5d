"""`arb streams`: per stream its length, groups, lag, pending, idle consumers and dead letters.

The same figures as ``redis-cli XINFO STREAM|GROUPS|CONSUMERS`` and ``XLEN dlq.<stream>``,
on one screen. A consumer counts as idle once it has not read for longer than
``redis.claim_idle_ms``: from then on other consumers of its group take over its pending
entries, so it is most likely dead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import msgspec
import redis.exceptions as rexc

from shared.config import ConfigError, load_config
from shared.ops.targets import resolve
from shared.runtime import Bus
from shared.runtime.inspect import list_streams, stream_stats
from shared.streams import DLQ_PREFIX, dlq


class GroupRow(msgspec.Struct):
    group: str
    lag: int
    pending: int
    consumers: int
    idle_consumers: list[str]


class StreamRow(msgspec.Struct):
    stream: str
    length: int
    last_entry_age_s: float | None
    groups: list[GroupRow]
    dlq_length: int


class DeadLetters(msgspec.Struct):
    stream: str
    length: int
    newest_age_s: float | None
    newest_group: str
    newest_error: str


class StreamsReport(msgspec.Struct):
    streams: list[StreamRow]
    dead_letters: list[DeadLetters]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _age_s(entry_id: str, now_ms: int) -> float | None:
    ms = entry_id.partition("-")[0]
    return max(0.0, (now_ms - int(ms)) / 1000) if ms.isdigit() and int(ms) > 0 else None


async def _idle_consumers(bus: Bus, stream: str, group: str, idle_ms: int) -> list[str]:
    try:
        consumers: Any = await bus.redis.xinfo_consumers(bus.stream(stream), group)
    except rexc.ResponseError:
        return []
    return sorted(_s(c["name"]) for c in consumers if int(c.get("idle", 0)) > idle_ms)


async def _dead_letters(bus: Bus, stream: str, now_ms: int) -> DeadLetters:
    key = bus.stream(stream)
    length = int(await bus.redis.xlen(key))
    newest: Any = await bus.redis.xrevrange(key, count=1)
    if not newest:
        return DeadLetters(stream, length, None, "", "")
    entry_id, fields = newest[0]
    return DeadLetters(stream, length, _age_s(_s(entry_id), now_ms),
                       _s(fields.get(b"group", b"")), _s(fields.get(b"error", b""))[:200])


async def collect(bus: Bus, idle_ms: int) -> StreamsReport:
    now_ms = int(time.time() * 1000)
    names = await list_streams(bus)
    rows: list[StreamRow] = []
    letters: list[DeadLetters] = []
    for name in names:
        if name.startswith(DLQ_PREFIX):
            letters.append(await _dead_letters(bus, name, now_ms))
            continue
        stats = await stream_stats(bus, name)
        if stats is None:
            continue
        groups = [GroupRow(g.group, g.lag, g.pending, g.consumers,
                           await _idle_consumers(bus, name, g.group, idle_ms)) for g in stats.groups]
        dlq_length = int(await bus.redis.xlen(bus.stream(dlq(name)))) if dlq(name) in names else 0
        rows.append(StreamRow(name, stats.length, _age_s(stats.last_id, now_ms), groups, dlq_length))
    return StreamsReport(rows, letters)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def render(report: StreamsReport) -> str:
    head = f"{'STREAM':<22} {'LENGTH':>8} {'LAST':>7}  {'GROUP':<13} {'LAG':>7} {'PENDING':>7} " \
           f"{'CONSUMERS':>9} {'IDLE':>4} {'DLQ':>5}"
    lines = [head]
    for row in report.streams:
        lead = f"{row.stream:<22} {row.length:>8} {_age(row.last_entry_age_s):>7}  "
        if not row.groups:
            lines.append(lead + f"{'-':<13} {'':>7} {'':>7} {'':>9} {'':>4} {row.dlq_length:>5}")
        for i, g in enumerate(row.groups):
            prefix = lead if i == 0 else " " * len(lead)
            lines.append(prefix + f"{g.group:<13} {g.lag:>7} {g.pending:>7} {g.consumers:>9} "
                         f"{len(g.idle_consumers):>4} {row.dlq_length if i == 0 else '':>5}")
    if not report.streams:
        lines.append("(no streams yet)")
    if report.dead_letters:
        lines += ["", f"{'DEAD LETTERS':<22} {'LENGTH':>8} {'NEWEST':>7}  {'GROUP':<13} ERROR"]
        for d in report.dead_letters:
            lines.append(f"{d.stream:<22} {d.length:>8} {_age(d.newest_age_s):>7}  {d.newest_group:<13} "
                         f"{d.newest_error.splitlines()[0] if d.newest_error else ''}")
    idle = [(row.stream, g.group, c) for row in report.streams for g in row.groups for c in g.idle_consumers]
    if idle:
        lines += ["", "IDLE CONSUMERS (pending entries are taken over by their group's live consumers)"]
        lines += [f"  {stream}/{group}: {consumer}" for stream, group, consumer in idle]
    return "\n".join(lines)


def cmd_streams(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb streams",
                                description="Per stream: length, groups, lag, pending, idle consumers, DLQ.")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--idle", type=float, metavar="SECONDS",
                   help="a consumer idle this long counts as idle (default: redis.claim_idle_ms)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    idle_ms = int(args.idle * 1000) if args.idle is not None else cfg.redis.claim_idle_ms

    async def run() -> StreamsReport:
        bus = resolve(cfg).bus(cfg)
        try:
            return await collect(bus, idle_ms)
        finally:
            await bus.close()

    try:
        report = asyncio.run(run())
    except Exception as exc:
        print(f"redis unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(json.dumps(msgspec.to_builtins(report), indent=2) if args.json else render(report))
    return 0
