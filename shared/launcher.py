"""`arb up` / `arb down` / `arb status`: run the whole system on one machine.

``arb up`` starts, for each of REDIS_URL, DATABASE_URL and CLICKHOUSE_URL that is unset, the
embedded server under ``var/``; applies migrations; starts every enabled service as its own
OS process (logs in ``var/log/<service>.log``); restarts a crashed service with exponential
backoff; and on Ctrl-C / SIGTERM / ``arb down`` stops services first (each finishes its
batch), then Redis, then PostgreSQL, leaving no process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.config import Config, ConfigError, load_config

STATE_FILE = "run/stack.json"


@dataclass
class Stack:
    launcher_pid: int
    redis_url: str
    database_url: str
    clickhouse_url: str
    var_dir: str
    services: dict[str, int] = field(default_factory=dict)
    embedded_redis_pid: int | None = None
    embedded_pg_dir: str | None = None
    started_at: float = field(default_factory=time.time)

    @classmethod
    def read(cls, var_dir: Path) -> Stack | None:
        try:
            return cls(**json.loads((var_dir / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self) -> None:
        path = Path(self.var_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if the launcher dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Supervised:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Launcher:
    def __init__(self, cfg: Config, services: list[str], *, out: Any = sys.stdout) -> None:
        self.cfg = cfg
        self.services = services
        self.var_dir = Path(cfg.var_dir).resolve()
        self.out = out
        self.children: list[Supervised] = []
        self.redis: Any = None
        self.pg: Any = None
        self.stack: Stack | None = None
        self._stop = False

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    # ------------------------------------------------------------------ start

    def start_backends(self) -> dict[str, str]:
        from shared import embedded
        from shared.db import migrate

        env = os.environ
        urls: dict[str, str] = {}
        if env.get("REDIS_URL"):
            urls["REDIS_URL"] = env["REDIS_URL"]
        else:
            self.redis = embedded.start_redis(self.var_dir / "redis", log_file=self.var_dir / "log" / "redis.log")
            urls["REDIS_URL"] = self.redis.url
            self.say(f"redis       embedded  {self.redis.url}")
        if env.get("DATABASE_URL"):
            urls["DATABASE_URL"] = env["DATABASE_URL"]
        else:
            self.pg = embedded.start_postgres(self.var_dir / "pg")
            urls["DATABASE_URL"] = self.pg.database_url("arb")
            self.say(f"postgresql  embedded  {self.var_dir / 'pg'}")
        if env.get("CLICKHOUSE_URL"):
            urls["CLICKHOUSE_URL"] = env["CLICKHOUSE_URL"]
        else:
            urls["CLICKHOUSE_URL"] = embedded.chdb_url(self.var_dir / "clickhouse")
            self.say(f"clickhouse  embedded  {urls['CLICKHOUSE_URL']} (owned by the collector process)")
        applied = migrate(urls["DATABASE_URL"])
        self.say(f"migrations  {', '.join(applied) if applied else 'up to date'}")
        return urls

    def start_services(self, urls: dict[str, str]) -> None:
        env = {**os.environ, **urls, "PYTHONUNBUFFERED": "1"}
        for name in self.services:
            child = Supervised(name, [sys.executable, "-m", f"services.{name}"], env,
                               self.var_dir / "log" / f"{name}.log")
            child.start()
            self.children.append(child)
            self.say(f"service     {name:<11} pid {child.pid}  log {child.log_path}")

    def write_state(self, urls: dict[str, str]) -> None:
        self.stack = Stack(
            launcher_pid=os.getpid(),
            redis_url=urls["REDIS_URL"],
            database_url=urls["DATABASE_URL"],
            clickhouse_url=urls["CLICKHOUSE_URL"],
            var_dir=str(self.var_dir),
            services={c.name: c.pid or 0 for c in self.children},
            embedded_redis_pid=self.redis.process.pid if self.redis else None,
            embedded_pg_dir=str(self.pg.data_dir.resolve()) if self.pg else None,
        )
        self.stack.write()

    # ------------------------------------------------------------------ supervise

    def supervise(self) -> None:
        base = self.cfg.services.restart_backoff_s
        cap = self.cfg.services.restart_backoff_max_s
        while not self._stop:
            now = time.monotonic()
            changed = False
            for child in self.children:
                if child.running():
                    if child.restarts and now - child.started > 60:
                        child.restarts = 0  # stable again: next crash restarts quickly
                    continue
                if child.next_start == 0.0:
                    code = child.process.returncode if child.process else None
                    delay = min(cap, base * (2 ** child.restarts))
                    child.next_start = now + delay
                    self.say(f"service     {child.name} exited with {code}; restarting in {delay:.1f}s")
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
                    changed = True
                    self.say(f"service     {child.name} restarted, pid {child.pid}")
            if changed and self.stack is not None:
                self.stack.services = {c.name: c.pid or 0 for c in self.children}
                self.stack.write()
            time.sleep(0.2)

    # ------------------------------------------------------------------ stop

    def shutdown(self) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=15)
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()
        with contextlib.suppress(OSError):
            (self.var_dir / STATE_FILE).unlink()
        self.say("stack down")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        try:
            urls = self.start_backends()
            if not self._stop:
                self.start_services(urls)
                self.write_state(urls)
                self.say("stack up: `arb status` shows health, `arb down` (or Ctrl-C) stops it")
                self.supervise()
        finally:
            self.shutdown()
        return 0


# ---------------------------------------------------------------------------- live feeds


def exchange_urls(cfg: Config) -> dict[str, str]:
    """The REST base URL the collector will use for each enabled exchange."""
    from services.collector.exchanges import VENUES, venue_class  # only when a live start is asked for

    return {name: cfg.exchanges.get(name).rest_url or venue_class(name).rest_url
            for name in cfg.exchanges.enabled() if name in VENUES}


def unreachable(urls: dict[str, str], timeout_s: float = 4.0) -> dict[str, str]:
    """Name -> why its URL cannot be reached (any HTTP answer counts as reachable); empty when all answer."""
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def probe(url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                return ""
        except urllib.error.HTTPError:
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"

    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        answers = dict(zip(urls, pool.map(probe, urls.values()), strict=True))
    return {name: why for name, why in answers.items() if why}


def live_feeds_unreachable(cfg: Config, prog: str) -> bool:
    """Say which exchanges cannot be reached, and how to run offline; True if any cannot."""
    urls = exchange_urls(cfg)
    down = unreachable(urls)
    for name, why in down.items():
        print(f"{prog}: cannot reach {name} at {urls[name]}: {why}", file=sys.stderr)
    if down:
        print(f"{prog}: the live public feeds need the internet; `make demo` runs the same pipeline offline on the "
              "bundled recording", file=sys.stderr)
    return bool(down)


# ---------------------------------------------------------------------------- commands


def _config_or_exit(path: str | None = None) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_up(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb up", description="Start the stack (embedded servers where no URL is set).")
    p.add_argument("--config")
    p.add_argument("--services", help="comma-separated subset of the enabled services")
    p.add_argument("--paper", action="store_true",
                   help="paper trading on the live public feeds; stops at once if the exchanges cannot be reached")
    args = p.parse_args(argv)
    if args.paper:
        os.environ["ARB_TRADING__MODE"] = "paper"
    cfg = _config_or_exit(args.config)
    var_dir = Path(cfg.var_dir).resolve()
    existing = Stack.read(var_dir)
    if existing and _alive(existing.launcher_pid):
        print(f"already running (launcher pid {existing.launcher_pid}); `arb down` first", file=sys.stderr)
        return 1
    services = [s for s in (args.services.split(",") if args.services else cfg.services.enabled) if s]
    unknown = [s for s in services if s not in cfg.services.enabled and s != "alerter"]
    if unknown:
        print(f"config error: --services {','.join(unknown)} not enabled in services.enabled", file=sys.stderr)
        return 2
    # --paper asks for live feeds: fail at once rather than run a stack whose books never sync.
    if args.paper and "collector" in services and not cfg.collector.replay and live_feeds_unreachable(cfg, "arb up"):
        return 1
    return Launcher(cfg, services).run()


def cmd_down(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb down", description="Stop the stack started by `arb up`.")
    p.add_argument("--config")
    p.add_argument("--timeout", type=float, default=40.0)
    args = p.parse_args(argv)
    cfg = _config_or_exit(args.config)
    var_dir = Path(cfg.var_dir).resolve()
    stack = Stack.read(var_dir)
    if stack is None:
        print("not running")
        return 0
    if _alive(stack.launcher_pid):
        os.kill(stack.launcher_pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _alive(stack.launcher_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    # Whatever outlived the launcher (it was killed, or timed out) goes now.
    leftovers = [pid for pid in [*stack.services.values(), stack.embedded_redis_pid] if pid and _alive(pid)]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in leftovers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in leftovers:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if stack.embedded_pg_dir:
        from shared.embedded import stop_postgres

        stop_postgres(Path(stack.embedded_pg_dir))
    if _alive(stack.launcher_pid):
        os.kill(stack.launcher_pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        (var_dir / STATE_FILE).unlink()
    print("stopped")
    return 0


def cmd_status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb status", description="Services, health, streams and consumer lag.")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = _config_or_exit(args.config)
    from shared.status import collect_status, render_status

    report = collect_status(cfg)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render_status(report))
    return 0 if report["healthy"] else 1
