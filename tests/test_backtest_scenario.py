"""The bundled scenario: deterministic, calibrated on the real series, and read by the real Upbit code."""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path

from backtest.runner import SCENARIO_CONFIG
from backtest.scenario import BINANCE_CAPTURE, ScenarioParams, calibrate_premium, generate
from backtest.sources import CaptureSource
from shared.capture import read_capture
from shared.config import load_config
from shared.models import BookSnapshot


def _digest(path: str) -> str:
    with gzip.open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    params = ScenarioParams(duration_s=20.0)
    first = generate(params, tmp_path / "a")
    again = generate(params, tmp_path / "b")
    other = generate(ScenarioParams(duration_s=20.0, seed=8), tmp_path / "c")
    assert _digest(first.captures["upbit"][0]) == _digest(again.captures["upbit"][0])
    assert _digest(first.captures["upbit"][0]) != _digest(other.captures["upbit"][0])
    # the Binance side is the recording's first lines, unchanged
    recorded = [r for r in read_capture(BINANCE_CAPTURE) if r.recv_ns <= first.end_ns]
    assert [(r.recv_ns, r.data) for r in read_capture(first.captures["binance"][0])] == \
        [(r.recv_ns, r.data) for r in recorded]


def test_the_premium_is_calibrated_on_the_real_five_minute_series() -> None:
    model = calibrate_premium()
    assert model.bars == 5_200 and model.runs == 27  # the Upbit series' 26 gaps cut it into 27 runs
    assert 1370 < math.exp(model.mean_log) < 1390  # KRW per USDT-equivalent, mid-2025
    assert 0.001 < model.sigma < 0.01 and 0.0 < model.noise < model.sigma
    assert 10 < model.half_life_bars < 1_000


def test_the_synthetic_upbit_books_go_through_the_real_upbit_decoding_and_sync(tmp_path: Path) -> None:
    scenario = generate(ScenarioParams(duration_s=30.0), tmp_path)
    cfg = load_config(str(SCENARIO_CONFIG))
    source = CaptureSource.load(scenario.captures, cfg)
    books = [m for _, _, out in source.batches() for m in out if isinstance(m, BookSnapshot)]
    upbit = [b for b in books if b.exchange == "upbit" and b.symbol == "BTC/KRW"]
    fx = [b for b in books if b.symbol == "USDT/KRW"]
    assert len(upbit) == scenario.counts["upbit_btc"] and len(fx) == scenario.counts["upbit_usdt"]
    for book in upbit:
        assert book.bids[0][0] % 1000 == 0 and book.asks[0][0] > book.bids[0][0]  # Upbit's 1,000 KRW tick
        assert len(book.bids) == len(book.asks) == 15
    assert all(core.malformed == 0 for core in source.replay.cores.values())
    assert {i.symbol for i in source.instruments["upbit"]} == {"BTC/KRW", "USDT/KRW"}
