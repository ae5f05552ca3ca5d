"""Test fixtures: real Redis, PostgreSQL and chDB, each test isolated and cleaned up.

- Redis: ``$REDIS_URL``, else the machine's 127.0.0.1:6379 if it answers, else a private
  embedded redis-server. Each test gets its own stream prefix and key-space session, and
  everything under them is deleted afterwards.
- PostgreSQL: ``$DATABASE_URL``, else 127.0.0.1:5432/test if it answers, else a private
  pgserver. Each test that asks for ``pg_url`` gets its own schema, migrated, dropped after.
- ClickHouse: chDB in a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from shared.config import Config, load_config
from shared.runtime import Bus
from shared.streams import KeySpace

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
    elif _reachable("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        from shared.embedded import start_redis

        server = start_redis(tmp_path_factory.mktemp("redis"))
        yield server.url
        server.stop()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
    elif _reachable("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/test"
    else:
        from shared.embedded import start_postgres

        pg = start_postgres(tmp_path_factory.mktemp("pg"))
        yield pg.database_url("test")
        pg.stop()


@pytest.fixture
def namespace() -> str:
    """A unique name for this test's streams, key-space session and schema."""
    return f"t{uuid.uuid4().hex[:12]}"


def drop_redis_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for pattern in (f"{namespace}:*", f"arbitrage:*{namespace}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i:i + 500])
    finally:
        client.close()


@pytest.fixture
async def bus(redis_url: str, namespace: str) -> AsyncIterator[Bus]:
    b = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("test", namespace))
    yield b
    await b.close()
    drop_redis_namespace(redis_url, namespace)


@pytest.fixture
def pg_url(database_url: str, namespace: str) -> Iterator[str]:
    """A migrated schema of its own, dropped after the test."""
    from shared.db import migrate, with_schema

    url = with_schema(database_url, namespace)
    migrate(url)
    yield url
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.fixture
def service_env(redis_url: str, database_url: str, namespace: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for running services/CLI as subprocesses inside this test's namespace."""
    from shared.db import with_schema

    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env.update({
        "REDIS_URL": redis_url,
        "DATABASE_URL": with_schema(database_url, namespace),
        "CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}",
        "ARB_ENV": "development",
        "ARB_SESSION": namespace,
        "ARB_REDIS__STREAM_PREFIX": f"{namespace}:",
        "ARB_HTTP__BASE_PORT": "0",
        "ARB_VAR_DIR": str(tmp_path / "var"),
        "PYTHONUNBUFFERED": "1",
    })
    yield env
    drop_redis_namespace(redis_url, namespace)
    with contextlib.suppress(Exception), psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


def make_config(env: dict[str, str], **overrides: Any) -> Config:
    return load_config(environ=env, overrides=overrides or None)


PYTHON = sys.executable
