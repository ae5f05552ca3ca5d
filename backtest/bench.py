"""`arb bench backtest --json`: how fast the backtest engine replays market data.

Over the bundled scenario (Binance BTCUSDT recorded: snapshot, depth diffs, bookTicker,
trades; Upbit KRW-BTC and KRW-USDT synthetic), all in one run, best of ``--repeat`` passes
(each on fresh cores; reading and parsing the capture files is not timed):

- ``engine``: the full backtest: every frame through the collector's decoding and L2 book
  sync (``FeedCore``), FX from the Upbit USDT book, the spatial detector on every book, risk
  and the executor's fills on what it signals.
- ``books_only`` (same run, the baseline): the same frames through the collector cores
  alone, no detector, no trading: what the engine adds is the difference.
- ``binance_only``: the engine on the real recording alone (one venue: the detector has
  nothing to compare, so this is book maintenance plus the engine's dispatch).

**Events** are counted as NautilusTrader counts data points: one per order-book level
change carried by a message (each level of a Binance diff, each level of the REST snapshot,
each level of an Upbit full-book message, since the core rebuilds the book from all of
them), plus one per BBO (``bookTicker``) and one per trade. ``upbit_changed_levels`` is the
stricter count of Upbit levels that differ from the previous message (reported, not used).
**Frames** are the recorded messages (WebSocket frames and REST bodies).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from backtest.engine import Engine
from backtest.latency import LatencyModel
from backtest.runner import SCENARIO_CONFIG
from backtest.scenario import ScenarioParams, ensure
from backtest.sources import CaptureSource
from shared.bench.common import emit
from shared.capture import Record
from shared.config import load_config

_any = msgspec.json.Decoder()


def count_events(timeline: list[tuple[int, str, Record]]) -> dict[str, int]:
    """Events in the recording, by kind (an untimed pass over the raw frames)."""
    counts = {"frames": 0, "binance_diff_levels": 0, "binance_snapshot_levels": 0, "bbo": 0, "trades": 0,
              "upbit_levels": 0, "upbit_changed_levels": 0, "other": 0}
    previous: dict[str, set[tuple[str, float, float]]] = {}
    for _, _, record in timeline:
        counts["frames"] += 1
        data = record.data
        doc = _any.decode(data) if data[:1] == b"{" else None
        if not isinstance(doc, dict):
            counts["other"] += 1
            continue
        inner: dict[str, Any] = doc["data"] if isinstance(doc.get("data"), dict) else doc
        if "lastUpdateId" in doc:
            counts["binance_snapshot_levels"] += len(doc["bids"]) + len(doc["asks"])
        elif inner.get("e") == "depthUpdate":
            counts["binance_diff_levels"] += len(inner["b"]) + len(inner["a"])
        elif inner.get("e") in ("trade", "aggTrade") or doc.get("ty") == "trade":
            counts["trades"] += 1
        elif {"b", "a", "B", "A"} <= inner.keys():
            counts["bbo"] += 1
        elif doc.get("ty") == "orderbook":
            units = doc["obu"]
            levels = {("b", u["bp"], u["bs"]) for u in units if u["bs"]} | {("a", u["ap"], u["as"]) for u in units
                                                                            if u["as"]}
            counts["upbit_levels"] += len(levels)
            before = previous.get(doc["cd"], set())
            counts["upbit_changed_levels"] += len({(side, price) for side, price, _ in levels ^ before})
            previous[doc["cd"]] = levels
        else:
            counts["other"] += 1
    counts["events"] = (counts["binance_diff_levels"] + counts["binance_snapshot_levels"] + counts["bbo"]
                        + counts["trades"] + counts["upbit_levels"])
    return counts


def _best(label: str, repeat: int, make: Callable[[], Callable[[], Any]]) -> tuple[float, list[float], Any]:
    times = []
    out: Any = None
    for _ in range(repeat):
        job = make()  # loading is not timed
        gc.collect()
        gc.disable()  # as the engine runs (Engine.run turns the cyclic collector off): same conditions for all
        try:
            t0 = time.perf_counter()
            out = job()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return min(times), times, out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench backtest", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--duration", type=float, default=None, help="seconds of the scenario (default: all)")
    args = p.parse_args(argv)
    cfg = load_config(str(SCENARIO_CONFIG))
    scenario = ensure(ScenarioParams(duration_s=args.duration), Path(cfg.var_dir) / "scenarios")
    latency = LatencyModel.build(order={"*": str(cfg.executor.order_latency_ms)})
    captures = scenario.captures

    def engine_job(which: dict[str, list[str]]) -> Callable[[], Callable[[], Any]]:
        def make() -> Callable[[], Any]:
            source = CaptureSource.load(which, cfg)
            engine = Engine(cfg, source, latency=latency)
            return engine.run
        return make

    def books_job() -> Callable[[], Any]:
        source = CaptureSource.load(captures, cfg)

        def job() -> int:
            n = 0
            for _, _, outputs in source.batches():
                n += len(outputs)
            return n
        return job

    counts = count_events(CaptureSource.load(captures, cfg).replay.timeline)
    binance = {"binance": captures["binance"]}
    binance_counts = count_events(CaptureSource.load(binance, cfg).replay.timeline)
    results: dict[str, Any] = {}
    for name, make, c in (("books_only", books_job, counts), ("engine", engine_job(captures), counts),
                          ("binance_only", engine_job(binance), binance_counts)):
        best, times, out = _best(name, args.repeat, make)
        entry: dict[str, Any] = {
            "seconds": round(best, 4), "median_seconds": round(statistics.median(times), 4),
            "events_per_s": round(c["events"] / best), "frames_per_s": round(c["frames"] / best),
            "us_per_frame": round(best / c["frames"] * 1e6, 2),
        }
        if name != "books_only":
            entry.update(books=out.stats.books, signals=dict(out.stats.signals), arbitrages=len(out.outcomes))
        results[name] = entry
    results["engine"]["vs_books_only"] = round(results["books_only"]["seconds"] / results["engine"]["seconds"], 3)
    doc = {
        "benchmark": "backtest",
        "dataset": {"scenario": scenario.note, "duration_s": round(scenario.duration_s, 1), "events": counts,
                    "binance_only_events": binance_counts},
        "event_definition": ("one per order-book level carried by a message (Binance diff levels, REST snapshot "
                             "levels, Upbit full-book levels) + one per BBO + one per trade; frames = recorded "
                             "messages"),
        "target_events_per_s": 1_000_000,
        "reference": "NautilusTrader publishes ~3M data points/s (Rust engine), ~6x less on its Python path",
        "repeat": args.repeat,
        **results,
    }
    emit(doc, args.json)
    return 0
