"""Risk state snapshots in PostgreSQL (``risk_guard_snapshots``): written on change and
periodically, read back when Redis lost the state.

A snapshot is the whole ``StateDump`` as JSONB plus the env it belongs to. The store keeps
one connection and reconnects on the next call after an error, so a PostgreSQL outage
costs snapshots (retried), never decisions.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import psycopg

from services.risk.state import StateDump

CONNECT_TIMEOUT_S = 3


class SnapshotStore:
    def __init__(self, url: str, *, session: str, env: str) -> None:
        self.url = url
        self.session = session
        self.env = env
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        return self._conn

    async def _run(self, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            async with conn.cursor() as cur:
                await cur.execute(query, params)
                return await cur.fetchall() if cur.description else []
        except psycopg.Error:
            await self.close()  # start from a fresh connection next time
            raise

    async def connect(self) -> None:
        """Open the connection now (raises if PostgreSQL is down), e.g. before dumping a state to save."""
        await self._connection()

    async def save(self, dump: StateDump, reason: str) -> int:
        doc = msgspec.to_builtins(dump)
        doc["env"] = self.env
        rows = await self._run(
            "INSERT INTO risk_guard_snapshots (session, ts, reason, state) "
            "VALUES (%s, to_timestamp(%s), %s, %s::jsonb) RETURNING id",
            (self.session, dump.ts_ms / 1000, reason, msgspec.json.encode(doc).decode()),
        )
        return int(rows[0][0])

    async def latest(self) -> tuple[int, StateDump] | None:
        rows = await self._run(
            "SELECT id, state::text FROM risk_guard_snapshots WHERE session = %s AND state->>'env' = %s "
            "ORDER BY id DESC LIMIT 1",
            (self.session, self.env),
        )
        if not rows:
            return None
        return int(rows[0][0]), msgspec.json.decode(rows[0][1], type=StateDump)

    async def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` snapshots of this session."""
        await self._run(
            "DELETE FROM risk_guard_snapshots WHERE session = %s AND id < ("
            "  SELECT id FROM risk_guard_snapshots WHERE session = %s ORDER BY id DESC OFFSET %s LIMIT 1)",
            (self.session, self.session, keep - 1),
        )

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                await conn.close()
