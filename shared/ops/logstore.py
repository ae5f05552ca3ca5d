"""Where log records are kept, and how `arb monitor` reads them back.

Services write JSON lines to stdout. The embedded stack sends each service's stdout to
``var/log/<service>.log`` (every level, one machine); under docker compose Docker keeps
stdout per container, and loses it when a container is removed. So WARNING+ records are
also shipped to PostgreSQL ``system_logs``: `arb monitor --errors --since 1h` then sees
every replica, survives restarts, and works the same in both deployments. Files stay the
source for everything below WARNING (``--tail``, ``--search``) where they exist.

Shipping runs in its own thread behind a bounded queue, so a slow or absent database never
blocks the event loop: records that do not fit are dropped and counted
(``arb_log_records_dropped_total``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb

from shared import metrics
from shared.config import SERVICES, Config
from shared.logs import JsonFormatter, Redactor

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}

_INSERT = ("INSERT INTO system_logs (session, service, level, ts, message, context) "
           "VALUES (%s, %s, %s, %s, %s, %s)")
_HEADER_FIELDS = ("ts", "level", "service", "session", "msg")

# --------------------------------------------------------------------------- writing


class LevelCounter(logging.Handler):
    """Counts WARNING+ records, so dashboards and `arb monitor` show errors per minute."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        for level in ("WARNING", "ERROR", "CRITICAL"):  # present at 0 from the start
            metrics.LOG_RECORDS.labels(level)

    def emit(self, record: logging.LogRecord) -> None:
        metrics.LOG_RECORDS.labels(record.levelname).inc()


Row = tuple[str, str, str, datetime, str, Jsonb]


class PostgresLogHandler(logging.Handler):
    """Ships records to ``system_logs`` in batches from a background thread."""

    def __init__(
        self,
        database_url: str,
        service: str,
        session: str,
        redactor: Redactor,
        level: int = logging.WARNING,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 1.0,
        max_queue: int = 10_000,
    ) -> None:
        super().__init__(level)
        self.database_url = database_url
        self.service = service
        self.session = session
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._json = JsonFormatter(service, session, redactor)
        self._queue: queue.Queue[Row] = queue.Queue(max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)
        self._thread.start()
        self.shipped = 0

    def emit(self, record: logging.LogRecord) -> None:
        # The shipper's own troubles (psycopg warnings) must not feed back into the queue.
        if threading.current_thread() is self._thread or record.name.startswith("psycopg"):
            return
        try:
            doc: dict[str, Any] = msgspec.json.decode(self._json.format(record))  # redacted already
            context = {k: v for k, v in doc.items() if k not in _HEADER_FIELDS}
            row = (self.session, self.service, record.levelname,
                   datetime.fromtimestamp(record.created, UTC), str(doc.get("msg", "")), Jsonb(context))
            self._queue.put_nowait(row)
        except queue.Full:
            metrics.LOG_RECORDS_DROPPED.inc()
        except Exception:
            self.handleError(record)

    def _take(self) -> list[Row]:
        """Up to ``batch_size`` rows: waits for the first, then gathers for one flush interval."""
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + (0 if self._stop.is_set() else self.flush_interval_s)
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        backoff = 0.5
        warned = False
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take()
            while batch:
                try:
                    if conn is None:
                        conn = psycopg.connect(self.database_url, autocommit=True, connect_timeout=5)
                    with conn.cursor() as cur:
                        cur.executemany(_INSERT, batch)
                    self.shipped += len(batch)
                    batch, backoff = [], 0.5
                except (psycopg.Error, OSError) as exc:
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.close()
                        conn = None
                    if not warned:  # plain stderr: logging from here would loop back
                        print(f"log shipping to PostgreSQL failing: {type(exc).__name__}", file=sys.stderr)
                        warned = True
                    if self._stop.is_set() or self._queue.full():
                        metrics.LOG_RECORDS_DROPPED.inc(len(batch))
                        batch = []
                    else:
                        self._stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds) and stop the thread."""
        self._stop.set()
        self._thread.join(timeout)
        super().close()


@dataclass
class LogHandlers:
    handlers: list[logging.Handler] = field(default_factory=list)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()


def attach_log_handlers(cfg: Config, service: str, redactor: Redactor) -> LogHandlers:
    """Count WARNING+ records and (unless disabled) ship them to PostgreSQL."""
    attached = LogHandlers([LevelCounter()])
    if cfg.ops.log_to_postgres:
        attached.handlers.append(PostgresLogHandler(
            cfg.postgres.url, service, cfg.session, redactor, LEVELS[cfg.ops.log_to_postgres_level]))
    root = logging.getLogger()
    for handler in attached.handlers:
        root.addHandler(handler)
    return attached


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class LogLine:
    ts: datetime
    level: str
    service: str
    message: str
    context: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        ts = self.ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.ts.microsecond // 1000:03d}Z"
        extra = " ".join(f"{k}={v}" for k, v in self.context.items() if k not in ("logger",))
        return f"{ts} {self.level:<8} {self.service:<11} {self.message}" + (f"  {extra}" if extra else "")


@dataclass(frozen=True, slots=True)
class LogQuery:
    since: datetime | None = None
    min_level: str = "DEBUG"
    service: str | None = None
    pattern: str | None = None
    """Case-insensitive regular expression matched against the message and its fields."""
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.min_level not in LEVELS:
            raise ValueError(f"unknown level {self.min_level!r}")

    def regex(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern, re.IGNORECASE) if self.pattern else None

    def matches(self, line: LogLine, regex: re.Pattern[str] | None) -> bool:
        if LEVELS.get(line.level, 20) < LEVELS[self.min_level]:
            return False
        if self.service and line.service != self.service:
            return False
        if self.since is not None and line.ts < self.since:
            return False
        return not (regex and not regex.search(line.message) and not regex.search(str(line.context)))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30s``, ``15m``, ``1h``, ``2d`` -> the moment that long ago (UTC)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"--since {text!r}: use a number and s, m, h or d (e.g. 1h)")
    seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    now = now or datetime.now(UTC)
    return datetime.fromtimestamp(now.timestamp() - seconds, UTC)


def _parse_ts(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        return None


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
"""The last line of a Python traceback: ``ValueError: boom``."""


def parse_lines(lines: Iterable[str], service: str) -> Iterator[LogLine]:
    """JSON log lines -> records. Other text (a crash's traceback on stderr) becomes one
    record per block, timed like the record before it; a traceback counts as an ERROR."""
    last_ts = datetime.fromtimestamp(0, UTC)
    raw: list[str] = []

    def flush() -> Iterator[LogLine]:
        if raw:
            level = "ERROR" if raw[0].startswith("Traceback") or _EXCEPTION_LINE.match(raw[-1]) else "INFO"
            yield LogLine(last_ts, level, service, "\n".join(raw))
            raw.clear()

    for text in lines:
        text = text.rstrip("\n")
        if not text.strip():
            continue
        doc: Any = None
        if text.startswith("{"):
            with contextlib.suppress(msgspec.DecodeError):
                doc = msgspec.json.decode(text)
        ts = _parse_ts(str(doc.get("ts"))) if isinstance(doc, dict) else None
        if ts is None:
            raw.append(text)
            continue
        yield from flush()
        last_ts = ts
        context = {k: v for k, v in doc.items() if k not in _HEADER_FIELDS}
        yield LogLine(ts, str(doc.get("level", "INFO")), str(doc.get("service", service)),
                      str(doc.get("msg", "")), context)
    yield from flush()


def log_files(log_dir: Path) -> dict[str, Path]:
    """The services' log files of the embedded stack (``var/log/<service>.log``)."""
    return {name: log_dir / f"{name}.log" for name in SERVICES if (log_dir / f"{name}.log").is_file()}


_TAIL_SPARE_LINES = 200


def file_ends(log_dir: Path) -> dict[Path, int]:
    """Each log file's size now: read up to here, then follow from here, and nothing is
    printed twice or missed."""
    return {p: p.stat().st_size for p in log_files(log_dir).values()}


def _last_lines(path: Path, n: int, end: int, block: int = 65536) -> list[str]:
    with open(path, "rb") as fh:
        pos = end
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-n:] if pos == 0 else lines[1:][-n:]  # the first line may be cut


def _lines_until(path: Path, end: int) -> Iterator[str]:
    with open(path, "rb") as fh:
        while fh.tell() < end:
            raw = fh.readline()
            if not raw:
                return
            yield raw.decode("utf-8", "replace")


def read_files(log_dir: Path, query: LogQuery, ends: dict[Path, int] | None = None) -> list[LogLine]:
    """Matching records of every service's file (up to ``ends``), oldest first, the last ``limit``."""
    regex = query.regex()
    ends = ends if ends is not None else file_ends(log_dir)
    out: list[LogLine] = []
    for service, path in log_files(log_dir).items():
        if (query.service and service != query.service) or path not in ends:
            continue
        simple_tail = query.limit and query.since is None and query.pattern is None and query.min_level == "DEBUG"
        if simple_tail:  # plain --tail: read only the end of big files
            assert query.limit is not None
            # some spare lines, so a traceback at the cut is not split in two
            lines: Iterable[str] = _last_lines(path, query.limit + _TAIL_SPARE_LINES, ends[path])
            out.extend(list(parse_lines(lines, service))[-query.limit:])
        else:
            out.extend(line for line in parse_lines(_lines_until(path, ends[path]), service)
                       if query.matches(line, regex))
    out.sort(key=lambda line: line.ts)
    return out[-query.limit:] if query.limit else out


def follow_files(log_dir: Path, query: LogQuery, *, start: dict[Path, int] | None = None, poll_s: float = 0.5,
                 until: threading.Event | None = None) -> Iterator[LogLine]:
    """New records as they are written (like ``tail -F``), from ``start`` (default: the end)."""
    regex = query.regex()
    offsets = dict(start) if start is not None else file_ends(log_dir)
    partial: dict[Path, str] = {}
    while until is None or not until.is_set():
        fresh: list[LogLine] = []
        for service, path in log_files(log_dir).items():
            if query.service and service != query.service:
                continue
            size = path.stat().st_size
            begin = offsets.get(path, 0)
            if size < begin:  # truncated or replaced: start over
                begin = 0
            if size == begin:
                continue
            with open(path, "rb") as fh:
                fh.seek(begin)
                chunk = partial.pop(path, "") + fh.read(size - begin).decode("utf-8", "replace")
            offsets[path] = size
            lines = chunk.split("\n")
            if lines[-1]:
                partial[path] = lines[-1]  # wait for the rest of the line
            fresh.extend(line for line in parse_lines(lines[:-1], service) if query.matches(line, regex))
        fresh.sort(key=lambda line: line.ts)
        yield from fresh
        if until is not None:
            until.wait(poll_s)
        else:
            time.sleep(poll_s)


def last_log_id(database_url: str, *, timeout_s: float = 5.0) -> int:
    """The newest ``system_logs`` id now: read up to it, then follow after it."""
    with psycopg.connect(database_url, connect_timeout=int(max(1, timeout_s))) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM system_logs").fetchone()
    return int(row[0]) if row else 0


def read_postgres(database_url: str, session: str, query: LogQuery, *, up_to_id: int | None = None,
                  timeout_s: float = 5.0) -> list[LogLine]:
    """Matching records from ``system_logs`` (WARNING+ only are shipped), oldest first."""
    where = ["session = %s", "level = ANY(%s)"]
    params: list[Any] = [session, [lv for lv, n in LEVELS.items() if n >= LEVELS[query.min_level]]]
    if up_to_id is not None:
        where.append("id <= %s")
        params.append(up_to_id)
    if query.since is not None:
        where.append("ts >= %s")
        params.append(query.since)
    if query.service:
        where.append("service = %s")
        params.append(query.service)
    if query.pattern:
        where.append("(message ~* %s OR context::text ~* %s)")
        params += [query.pattern, query.pattern]
    sql = (f"SELECT ts, level, service, message, context FROM system_logs WHERE {' AND '.join(where)} "
           "ORDER BY ts DESC, id DESC LIMIT %s")
    params.append(query.limit or 10_000)
    with psycopg.connect(database_url, connect_timeout=int(max(1, timeout_s))) as conn:
        rows = conn.execute(sql.encode(), params).fetchall()
    return [LogLine(ts.astimezone(UTC), level, service, message, context or {})
            for ts, level, service, message, context in reversed(rows)]


def follow_postgres(database_url: str, session: str, query: LogQuery, *, after_id: int | None = None,
                    poll_s: float = 1.0, until: threading.Event | None = None) -> Iterator[LogLine]:
    """New ``system_logs`` rows as they arrive (after ``after_id``, default now), like ``tail -F``."""
    regex = query.regex()
    levels = [lv for lv, n in LEVELS.items() if n >= LEVELS[query.min_level]]
    last_id = after_id if after_id is not None else last_log_id(database_url)
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        while until is None or not until.is_set():
            rows = conn.execute(
                "SELECT id, ts, level, service, message, context FROM system_logs "
                "WHERE id > %s AND session = %s AND level = ANY(%s) ORDER BY id LIMIT 1000",
                (last_id, session, levels),
            ).fetchall()
            for row_id, ts, level, service, message, context in rows:
                last_id = row_id
                line = LogLine(ts.astimezone(UTC), level, service, message, context or {})
                if query.matches(line, regex):
                    yield line
            if not rows:
                if until is not None:
                    until.wait(poll_s)
                else:
                    time.sleep(poll_s)
