"""What the operator tools look at: the running stack's servers and service instances.

On the embedded stack `arb up` records its servers and services in ``var/run/stack.json``;
under docker compose there is no such file and the environment (``REDIS_URL``,
``DATABASE_URL``, ``CLICKHOUSE_URL``) or the config names the servers, and every enabled
service is expected. Instances are found through their heartbeats either way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from shared.config import Config
from shared.models import Heartbeat
from shared.runtime import Bus
from shared.service import HEARTBEAT_MAX_AGE_S
from shared.status import base_url, heartbeats
from shared.streams import KeySpace

GONE_AFTER_S = 3 * HEARTBEAT_MAX_AGE_S
"""A heartbeat older than this belongs to an instance that is gone (killed, or replaced)."""


@dataclass(frozen=True, slots=True)
class Targets:
    redis_url: str
    database_url: str
    clickhouse_url: str
    expected_services: tuple[str, ...]
    var_dir: Path
    embedded: bool
    """True when `arb up` runs the stack on this machine (state in var/run/stack.json)."""

    def bus(self, cfg: Config) -> Bus:
        return Bus.from_url(self.redis_url, prefix=cfg.redis.stream_prefix, keys=KeySpace(cfg.env, cfg.session))

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"


def resolve(cfg: Config) -> Targets:
    from shared.launcher import Stack

    var_dir = Path(cfg.var_dir).resolve()
    stack = Stack.read(var_dir)
    if stack is not None:
        return Targets(stack.redis_url, stack.database_url, stack.clickhouse_url, tuple(stack.services),
                       var_dir, embedded=True)
    return Targets(
        os.environ.get("REDIS_URL", cfg.redis.url),
        os.environ.get("DATABASE_URL", cfg.postgres.url),
        os.environ.get("CLICKHOUSE_URL", cfg.clickhouse.url),
        tuple(cfg.services.enabled),
        var_dir,
        embedded=False,
    )


@dataclass(frozen=True, slots=True)
class Instance:
    beat: Heartbeat
    age_s: float

    @property
    def base_url(self) -> str:
        return base_url(self.beat)


async def instances(bus: Bus, *, include_gone: bool = False) -> list[Instance]:
    """Instances with a heartbeat younger than ``GONE_AFTER_S`` (or all), by service then instance."""
    now = time.time_ns()
    out = [Instance(hb, (now - hb.ts_ns) / 1e9) for hb in await heartbeats(bus)]
    if not include_gone:
        out = [i for i in out if i.age_s < GONE_AFTER_S]
    out.sort(key=lambda i: (i.beat.service, i.beat.instance))
    return out
