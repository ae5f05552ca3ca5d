"""Helpers shared by the benchmarks: a Redis to measure against, percentiles, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max/mean of nanosecond samples, in microseconds."""
    if not samples_ns:
        return {"count": 0}
    data = sorted(samples_ns)
    n = len(data)

    def pick(q: float) -> float:
        return round(data[min(n - 1, int(q * n))] / 1000, 1)

    return {
        "count": n,
        "p50_us": pick(0.50),
        "p90_us": pick(0.90),
        "p99_us": pick(0.99),
        "max_us": round(data[-1] / 1000, 1),
        "mean_us": round(sum(data) / n / 1000, 1),
    }


@contextlib.contextmanager
def bench_redis(url: str | None = None) -> Iterator[str]:
    """A Redis to measure against: ``url``, else $REDIS_URL, else a private embedded one."""
    url = url or os.environ.get("REDIS_URL")
    if url:
        redis.Redis.from_url(url).ping()
        yield url
        return
    from shared.embedded import start_redis

    with tempfile.TemporaryDirectory(prefix="arb-bench-redis-") as tmp:
        server = start_redis(Path(tmp), appendfsync="no")
        try:
            yield server.url
        finally:
            server.stop()


def unique_prefix(name: str) -> str:
    return f"bench:{name}:{uuid.uuid4().hex[:8]}:"


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    client.close()


def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
