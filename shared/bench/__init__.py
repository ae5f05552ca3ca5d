"""`arb bench <what> --json`: benchmarks that print JSON and carry their own baseline.

Every benchmark measures a baseline in the same run (bare redis-py, a peer library), so a
figure is always read against the machine's mood of the moment.
"""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "bus": "shared.bench.bus:main",
    "collector": "services.collector.bench:main",
    "detector": "services.detector.bench:main",
    "risk": "services.risk.bench:main",
    "executor": "services.executor.bench:main",
    "rebalancer": "services.rebalancer.bench:main",
    "backtest": "backtest.bench:main",
    "pipeline": "backtest.pipeline:main",
}


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: arb bench <" + "|".join(BENCHES) + "> [--json] [options]")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        print(f"arb bench: unknown benchmark {name!r}; one of {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    module, _, func = BENCHES[name].partition(":")
    result: int = getattr(importlib.import_module(module), func)(argv[1:])
    return result
