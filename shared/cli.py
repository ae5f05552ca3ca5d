"""The `arb` command. Each sub-command lives in the module that owns it and is imported
only when used, so `arb status` does not pay for the backtest's imports.

A sub-command is ``"module:function"`` where ``function(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("shared.launcher:cmd_up", "start the stack (embedded Redis/PostgreSQL/chDB where no URL is set)"),
    "down": ("shared.launcher:cmd_down", "stop the stack started by `arb up`"),
    "status": ("shared.launcher:cmd_status", "services, health, streams and consumer-group lag (--json)"),
    "health": ("shared.ops.health:cmd_health", "one line per check (OK/WARN/ERROR/SKIP/DISABLED); exit 0 healthy"),
    "monitor": ("shared.ops.monitor:cmd_monitor", "live dashboard (--metrics) or logs (--tail, --errors, --search)"),
    "streams": ("shared.ops.streams:cmd_streams", "per stream: length, groups, lag, pending, idle consumers, DLQ"),
    "db": ("shared.cli_tools:cmd_db", "database tools: `arb db migrate`"),
    "config": ("shared.cli_tools:cmd_config", "check the configuration and print it (secrets never shown)"),
    "bench": ("shared.bench:cmd_bench", "benchmarks printing JSON (bus, collector, ..., backtest, pipeline)"),
    "backtest": ("backtest.cli:cmd_backtest",
                  "the cores over recorded data on a simulated clock (--sweep, --walk-forward)"),
    "demo": ("backtest.demo:cmd_demo", "the whole pipeline in paper mode over the bundled scenario, live view"),
    # collector
    "record": ("services.collector.cli:cmd_record", "record raw exchange frames to a gzip capture"),
    "replay": ("services.collector.cli:cmd_replay", "replay a capture through the book code (--dump-books)"),
    "simulator": ("shared.simulator.cli:cmd_simulator", "serve recorded exchange traffic on 127.0.0.1"),
    # detector
    "detect": ("services.detector.cli:cmd_detect", "run the detectors offline over dumped books"),
    # risk
    "halt": ("services.risk.cli:cmd_halt", "kill switch: stop all approvals now"),
    "resume": ("services.risk.cli:cmd_resume", "lift a manual halt"),
    "risk": ("services.risk.cli:cmd_risk", "risk state and limits: `arb risk status | reload`"),
    # rebalancer
    "transfers": ("services.rebalancer.cli:cmd_transfers", "list | plan | approve | cancel transfers"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: arb <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<10} {doc}")
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"arb: unknown command {name!r} (try `arb --help`)", file=sys.stderr)
        raise SystemExit(2)
    module, _, func = COMMANDS[name][0].partition(":")
    raise SystemExit(getattr(importlib.import_module(module), func)(rest))


if __name__ == "__main__":
    main()
