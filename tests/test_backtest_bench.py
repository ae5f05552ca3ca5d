"""The two benchmarks: `arb bench backtest` runs and counts events honestly; the pipeline
bench's latency and stage arithmetic is right on messages whose times are known."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from backtest.pipeline import WARMUP_NS, _latencies
from shared.models import BookSnapshot, Decision, OrderIntent, OrderLeg, OrderUpdate, Signal, SignalLeg

MS = 1_000_000


def test_arb_bench_backtest_prints_events_and_frames_per_second_with_its_same_run_baseline(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "shared.cli", "bench", "backtest", "--json", "--duration", "40",
                           "--repeat", "1"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    events = doc["dataset"]["events"]
    assert events["events"] == (events["binance_diff_levels"] + events["binance_snapshot_levels"] + events["bbo"]
                                + events["trades"] + events["upbit_levels"])
    assert events["binance_snapshot_levels"] == 2000 and events["upbit_levels"] > 0
    for run in ("engine", "books_only", "binance_only"):
        assert doc[run]["events_per_s"] > 0 and doc[run]["frames_per_s"] > 0
    assert doc["engine"]["books"] > 0


def _messages(i: int, origin: int) -> dict[str, object]:
    arb = f"{i:022d}"
    book = BookSnapshot(exchange="upbit", symbol="BTC/KRW", seq=i, bids=[(1.0, 1.0)], asks=[(2.0, 1.0)],
                        ts_exchange_ns=origin, ts_recv_ns=origin, ts_pub_ns=origin + 1 * MS)
    leg = SignalLeg(exchange="upbit", symbol="BTC/KRW", side="buy", price=Decimal(2), quantity=Decimal(1))
    signal = Signal(signal_id=f"s{i}", strategy="spatial", asset="BTC", legs=[leg, leg], gross_edge_bps=1,
                    net_edge_bps=1, expected_profit=1, profit_currency="USDT", notional=1,
                    ts_ns=origin + 3 * MS, ts_origin_ns=origin)
    decision = Decision(decision_id=f"d{arb}", signal_id=f"s{i}", strategy="spatial", approved=True,
                        reason="approved", ts_ns=origin + 6 * MS, ts_origin_ns=origin)
    order = OrderLeg(client_order_id=arb + "0", exchange="upbit", symbol="BTC/KRW", side="buy", price=Decimal(2),
                     quantity=Decimal(1))
    intent = OrderIntent(arb_id=arb, signal_id=f"s{i}", strategy="spatial", legs=[order], notional=1,
                         ts_ns=origin + 6 * MS, ts_origin_ns=origin)
    updates = [OrderUpdate(client_order_id=arb + "0", arb_id=arb, exchange="upbit", symbol="BTC/KRW", side="buy",
                           status=status, ts_ns=origin + ms * MS) for status, ms in (("NEW", 8), ("FILLED", 10))]
    return {"book": book, "signal": signal, "decision": decision, "intent": intent, "updates": updates}


def test_tick_to_order_is_the_send_time_minus_the_triggering_frames_receive_time_stage_by_stage() -> None:
    streams: dict[str, list[object]] = {"signals": [], "decisions": [], "orders": [], "order_updates": []}
    books = {}
    for i in range(20):
        origin = 1_000 * MS * (10 + i)  # one second apart: the first two are in the 1.5 s warm-up
        m = _messages(i, origin)
        streams["signals"].append(m["signal"])
        streams["decisions"].append(m["decision"])
        streams["orders"].append(m["intent"])
        streams["order_updates"] += m["updates"]  # type: ignore[operator]
        books[origin] = m["book"]
    out = _latencies(streams, books, 1000.0, {"played": 1, "frames_per_s": 999.0})  # type: ignore[arg-type]
    assert WARMUP_NS == 1_500 * MS
    assert out["tick_to_order"]["count"] == 18
    assert out["tick_to_order"]["p50_us"] == 10_000  # FILLED at +10 ms: the send time with a 0 ms paper latency
    stages = {name: s["p50_us"] for name, s in out["stages"].items()}
    assert stages == {"collector": 1_000, "to_detector_signal": 2_000, "to_risk_decision": 3_000,
                      "to_executor_start": 2_000, "to_executor_send": 2_000}
