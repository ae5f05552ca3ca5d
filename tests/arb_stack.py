"""Running `arb up` in a test: start, wait until every service answers, run `arb` commands, stop."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARB = [sys.executable, "-m", "shared.cli"]
ALL_SERVICES = ("collector", "detector", "risk", "executor", "rebalancer", "alerter")


@dataclass
class RunningStack:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    cwd: Path

    @property
    def var_dir(self) -> Path:
        return Path(self.env["ARB_VAR_DIR"])

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.var_dir / "run" / "stack.json").read_text())
        return data

    def arb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(ARB + list(args), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def status(self) -> dict[str, Any]:
        out = self.arb("status", "--json")
        return json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout and self.proc.poll() is not None else ""


@contextlib.contextmanager
def running_stack(env: dict[str, str], cwd: Path, services: tuple[str, ...] = ALL_SERVICES,
                  ready_timeout: float = 60.0) -> Iterator[RunningStack]:
    """`arb up --services ...` until every service reports ok, then `arb down`."""
    proc = subprocess.Popen(ARB + ["up", "--services", ",".join(services)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stack = RunningStack(proc, env, cwd)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            assert proc.poll() is None, f"arb up exited: {stack.output()}"
            report = stack.status()
            running = {s["service"] for s in report.get("services", []) if s["status"] == "ok"}
            if report.get("healthy") and running >= set(services):
                break
            assert time.monotonic() < deadline, f"stack not healthy in {ready_timeout}s: {report}"
            time.sleep(0.3)
        yield stack
    finally:
        subprocess.run(ARB + ["down"], cwd=cwd, env=env, capture_output=True, timeout=90)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
