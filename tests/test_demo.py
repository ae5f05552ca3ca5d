"""`make demo` from scratch: no servers, trades stored, PnL reconciled, nothing left running."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psutil
import psycopg
import pytest


def _fresh_env() -> dict[str, str]:
    drop = ("REDIS_URL", "DATABASE_URL", "CLICKHOUSE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ARB_")}
    env["ARB_HTTP__BASE_PORT"] = "0"  # other stacks may run on this machine
    return env


def _tree(root: int, var: Path) -> set[int]:
    pids = {root}
    with contextlib.suppress(psutil.Error):
        pids |= {p.pid for p in psutil.Process(root).children(recursive=True)}
    with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
        pg = psutil.Process(int((var / "pg" / "postmaster.pid").read_text().split()[0]))
        pids |= {pg.pid} | {p.pid for p in pg.children(recursive=True)}
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_the_demo_from_scratch_stores_trades_whose_sum_is_the_printed_pnl_and_leaves_no_process(
        tmp_path: Path) -> None:
    # 90 s of the scenario at 6x: a 15 s replay, enough for the premium to cross the fees.
    demo = subprocess.Popen([sys.executable, "-m", "shared.cli", "demo", "--duration", "90", "--no-view"],
                            cwd=tmp_path, env=_fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    while demo.poll() is None:
        seen |= _tree(demo.pid, tmp_path / "var")
        assert time.monotonic() < deadline, "the demo did not finish"
        time.sleep(0.3)
    out = demo.stdout.read().decode() if demo.stdout else ""
    assert demo.returncode == 0, out
    assert "SYNTHETIC" in out
    assert len(seen) >= 7, "launcher, redis, postgres and four services should have run"  # and were all seen
    leftover = [pid for pid in seen if _alive(pid)]
    assert leftover == [], [psutil.Process(p).cmdline() for p in leftover if _alive(p)]

    session = re.search(r"session (demo\d+)", out)
    printed = re.search(r"realised PnL\s+(-?[0-9.]+) USDT", out)
    assert session and printed, out
    assert "reconciles exactly" in out
    from shared.embedded import start_postgres

    pg = start_postgres(tmp_path / "var" / "pg")  # the demo stopped it: the data must still be there
    try:
        with psycopg.connect(pg.database_url("arb")) as conn:
            count, total = conn.execute("SELECT count(*), sum(realised_pnl) FROM trades WHERE session = %s",
                                        (session.group(1),)).fetchone()
            fills = conn.execute("SELECT count(*) FROM fills WHERE session = %s", (session.group(1),)).fetchone()
    finally:
        pg.stop()
    assert count >= 3 and fills[0] >= count
    assert Decimal(printed.group(1)) == total


def test_the_live_demo_and_arb_up_paper_stop_at_once_saying_why_when_the_exchanges_cannot_be_reached(
        tmp_path: Path) -> None:
    env = _fresh_env()
    # Nothing listens on these ports: the same answer as an offline machine, without relying on being offline.
    env.update({"ARB_EXCHANGES__BINANCE__REST_URL": "http://127.0.0.1:9", "ARB_EXCHANGES__UPBIT__REST_URL":
                "http://127.0.0.1:9"})
    for argv in (["demo", "--live"], ["up", "--paper", "--config", str(Path(__file__).parents[1] / "backtest" /
                                                                          "scenario.toml")]):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "shared.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done
        assert "cannot reach binance at http://127.0.0.1:9" in done.stderr
        assert "make demo" in done.stderr
        assert time.monotonic() - started < 20
        assert not (tmp_path / "var" / "run" / "stack.json").exists()
