"""Services as separate OS processes for a run of the whole pipeline (pipeline benchmark, parity test).

Each service is ``python -m services.<name>`` with the given environment, its output in a log
file; ``ready`` waits for its heartbeat and for the consumer groups it reads; ``stop`` sends
SIGTERM (each service finishes its batch), then kills what outlives the timeout.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import redis

from shared.config import Config
from shared.models import Heartbeat, decode
from shared.runtime.producer import FIELD
from shared.streams import KeySpace

# Who must have created which group before market data flows (groups start at "$" or "0").
READY_GROUPS: dict[str, list[tuple[str, str]]] = {
    "detector": [("md.BTC", "spatial")],
    "risk": [("signals", "risk")],
    "executor": [("orders", "executor")],
}


class Services:
    def __init__(self, cfg: Config, env: Mapping[str, str], log_dir: Path) -> None:
        self.cfg = cfg
        self.env = dict(env)
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis = redis.Redis.from_url(cfg.redis.url)
        self.keys = KeySpace(cfg.env, cfg.session)
        self.prefix = cfg.redis.stream_prefix

    def start(self, name: str, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env={**self.env, **(extra_env or {})},
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def heartbeats(self) -> dict[str, Heartbeat]:
        raw: Any = self.redis.hgetall(self.keys.heartbeats())
        out: dict[str, Heartbeat] = {}
        for value in (raw or {}).values():
            hb = decode(value)
            if isinstance(hb, Heartbeat) and hb.status != "stopping":
                out[hb.service] = hb
        return out

    def _has_group(self, stream: str, group: str) -> bool:
        try:
            groups: Any = self.redis.xinfo_groups(self.prefix + stream)
        except redis.ResponseError:
            return False
        return any((g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == group for g in groups)

    def ready(self, names: Iterable[str], timeout: float = 60.0) -> None:
        """Block until every service in ``names`` heartbeats and reads its streams."""
        wanted = list(names)
        deadline = time.monotonic() + timeout
        while True:
            for name in wanted:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir / (name + '.log')}")
            beats = self.heartbeats()
            if all(n in beats for n in wanted) and all(
                    self._has_group(s, g) for n in wanted for s, g in READY_GROUPS.get(n, [])):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"services not ready in {timeout:.0f} s: have {sorted(beats)}")
            time.sleep(0.1)

    def health(self, name: str) -> dict[str, Any]:
        """A service's /health document, at the address its heartbeat advertises."""
        import urllib.request

        hb = self.heartbeats().get(name)
        if hb is None or not hb.http_port:
            return {}
        with urllib.request.urlopen(f"http://{hb.host}:{hb.http_port}/health", timeout=2) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def read(self, stream: str) -> list[Any]:
        """Every message of a stream, decoded, in order."""
        out: list[Any] = []
        low = "-"
        while True:
            entries: Any = self.redis.xrange(self.prefix + stream, min=low, max="+", count=10_000)
            out.extend(decode(fields[FIELD]) for _, fields in entries)
            if len(entries) < 10_000:
                return out
            low = "(" + entries[-1][0].decode()

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.close()


@contextlib.contextmanager
def services(cfg: Config, env: Mapping[str, str], log_dir: Path) -> Iterator[Services]:
    running = Services(cfg, env, log_dir)
    try:
        yield running
    finally:
        running.stop()
