"""PostgreSQL: versioned migrations (``arb db migrate``) and connection helpers.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in order, each in
its own transaction, and recorded in ``schema_migrations`` with a checksum; applying twice
is a no-op, and editing an applied migration is refused. The schema is the first entry of
the connection's ``search_path`` (created if missing), so tests can isolate themselves
with ``?options=-csearch_path%3D<schema>``.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    out = []
    for entry in resources.files("shared.db").joinpath("migrations").iterdir():
        m = re.match(r"^(\d{4})_(\w+)\.sql$", entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return out


def ensure_database(url: str) -> bool:
    """Create the URL's database if it does not exist; True if created."""
    parts = urlsplit(url)
    dbname = parts.path.lstrip("/") or "postgres"
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(url, connect_timeout=5):
            return False
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg.errors.DuplicateDatabase:
            return False
    return True


def current_schema(conn: psycopg.Connection) -> str:
    path = conn.execute("SHOW search_path").fetchone()[0]  # type: ignore[index]
    first = path.split(",")[0].strip().strip('"')
    return "public" if first in ("$user", "") else first


def migrate(url: str) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date)."""
    ensure_database(url)
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        schema = current_schema(conn)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        lock = zlib.crc32(f"arb-migrate:{schema}".encode())
        conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    INTEGER PRIMARY KEY,
                       name       TEXT NOT NULL,
                       checksum   TEXT NOT NULL,
                       applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
            )
            done = {v: c for v, c in conn.execute("SELECT version, checksum FROM schema_migrations")}
            for m in migrations():
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise MigrationError(
                            f"migration {m.version:04d}_{m.name} changed after it was applied; add a new one instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                applied.append(f"{m.version:04d}_{m.name}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))
    return applied


def with_schema(url: str, schema: str) -> str:
    """The same database URL with ``search_path`` set to ``schema``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"
