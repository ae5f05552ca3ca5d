"""`arb halt`, `arb resume`, `arb risk status|reload`: the operator's handles on the risk state.

They find Redis like `arb status` does (the running stack's, else REDIS_URL, else the
config's) and act through the same Lua scripts as the service, so a halt is seen by the
very next decision of every replica. Each halt and resume is also published on ``alerts``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from typing import Any

from services.risk.limits import RiskLimits
from services.risk.redis_state import RedisRiskState
from services.risk.summary import summarize
from shared.config import Config, ConfigError, load_config
from shared.models import Alert
from shared.runtime import Bus, Producer
from shared.status import redis_url_for
from shared.streams import ALERTS, KeySpace


def _config(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None


def _bus(cfg: Config) -> Bus:
    url, _ = redis_url_for(cfg)
    return Bus.from_url(url, prefix=cfg.redis.stream_prefix, keys=KeySpace(cfg.env, cfg.session))


async def _alert(bus: Bus, kind: str, severity: str, message: str) -> None:
    producer = Producer(bus)
    producer.publish(ALERTS, Alert(alert_id=f"risk:{kind}:{time.time_ns()}", severity=severity,  # type: ignore[arg-type]
                                   source="arb-cli", kind=kind, message=message, ts_ns=time.time_ns(),
                                   labels={"user": getpass.getuser()}))
    await producer.flush()


def _run(cfg: Config, action: Any) -> int:
    async def main() -> int:
        bus = _bus(cfg)
        try:
            result: int = await action(bus, RedisRiskState(bus))
            return result
        finally:
            await bus.close()

    try:
        return asyncio.run(main())
    except (ConnectionError, OSError) as exc:
        print(f"redis unreachable: {type(exc).__name__}", file=sys.stderr)
        return 1


def cmd_halt(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb halt", description="Kill switch: every risk replica rejects every "
                                "signal from its next decision on, until `arb resume`.")
    p.add_argument("--reason", default="manual halt")
    p.add_argument("--config")
    args = p.parse_args(argv)
    cfg = _config(args.config)
    if cfg is None:
        return 2
    reason = " ".join(args.reason.split())[:200]

    async def halt(bus: Bus, state: RedisRiskState) -> int:
        payload = json.dumps({"source": "manual", "reason": reason, "by": getpass.getuser(),
                              "ts_ns": time.time_ns()}, sort_keys=True)
        was = await state.set_halt(payload)
        await _alert(bus, "kill_switch", "critical", f"trading halted by {getpass.getuser()}: {reason}")
        print(json.dumps({"halted": True, "was_halted": was, "reason": reason}))
        return 0

    return _run(cfg, halt)


def cmd_resume(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb resume", description="Lift the kill switch (manual or automatic).")
    p.add_argument("--guards", action="store_true",
                   help="also reset the circuit breaker and the drawdown (peak equity := current equity)")
    p.add_argument("--config")
    args = p.parse_args(argv)
    cfg = _config(args.config)
    if cfg is None:
        return 2

    async def resume(bus: Bus, state: RedisRiskState) -> int:
        was = await state.clear_halt(guards=args.guards)
        what = "kill switch, circuit breaker and drawdown" if args.guards else "kill switch"
        await _alert(bus, "resume", "warning", f"trading resumed by {getpass.getuser()} ({what} lifted)")
        print(json.dumps({"halted": False, "was_halted": was, "guards_reset": args.guards}))
        return 0

    return _run(cfg, resume)


def cmd_risk(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb risk")
    sub = p.add_subparsers(dest="action", required=True)
    status = sub.add_parser("status", help="halts, exposure, PnL, drawdown, cooldowns")
    status.add_argument("--json", action="store_true")
    status.add_argument("--config")
    reload = sub.add_parser("reload", help="make every risk replica re-read its config (validated first)")
    reload.add_argument("--config")
    args = p.parse_args(argv)
    cfg = _config(args.config)
    if cfg is None:
        return 2

    async def show(bus: Bus, state: RedisRiskState) -> int:
        doc = summarize(await state.overview(), RiskLimits.from_config(cfg), time.time_ns() // 1_000_000)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            for key, value in doc.items():
                print(f"{key}: {json.dumps(value)}")
        return 0

    async def ask_reload(bus: Bus, state: RedisRiskState) -> int:
        n = await bus.redis.incr(state.keys.reload)
        print(json.dumps({"reload_requested": int(n)}))
        return 0

    return _run(cfg, show if args.action == "status" else ask_reload)
