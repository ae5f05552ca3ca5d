"""`arb detect --books FILE`: the cores offline over dumped books, signals as JSON lines.

The kimchi cases use real order books: the Upbit KRW-BTC and Binance BTC/USDT snapshots of
2025-08-24 in tests/fixtures (see SOURCES.md), turned into dump lines."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.detector.cli import cmd_detect
from shared.models import Signal, decoder_for

FIXTURES = Path(__file__).parent / "fixtures"
SNAPSHOTS = (FIXTURES / "upbit" / "kimchi-premium-arbitrage_orderbook_upbit_BTC_KRW_20250824_06.jsonl.gz",
             FIXTURES / "binance" / "kimchi-premium-arbitrage_orderbook_binance_BTC_USDT_20250824_06.jsonl.gz")
decode_signal = decoder_for(Signal).decode


@pytest.fixture
def real_books(tmp_path: Path) -> Path:
    """The recorded snapshots of both venues in time order, as `arb replay --dump-books` lines."""
    rows = []
    for path in SNAPSHOTS:
        with gzip.open(path, "rt") as fh:
            for line in fh:
                snap = json.loads(line)
                rows.append((snap["timestamp"], {"exchange": snap["exchange"], "symbol": snap["symbol"],
                                                 "status": "synced", "bids": snap["bids"], "asks": snap["asks"]}))
    rows.sort(key=lambda r: r[0])
    out = tmp_path / "books.jsonl"
    out.write_text("".join(json.dumps({**row, "seq": i}) + "\n" for i, (_, row) in enumerate(rows, 1)))
    return out


def detect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[Signal], str]:
    assert cmd_detect(["--strategies", "spatial", *args]) == 0
    captured = capsys.readouterr()
    return [decode_signal(line) for line in captured.out.splitlines()], captured.err


def test_recorded_kimchi_books_trade_the_premium_in_the_direction_the_fx_rate_gives(
        real_books: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Upbit ~159.5M KRW vs Binance ~115,279 USDT: 1383.7 KRW per USDT implied by BTC.
    low, _ = detect(capsys, "--books", str(real_books), "--fx", "USDT/KRW=1375")
    high, _ = detect(capsys, "--books", str(real_books), "--fx", "USDT/KRW=1392")
    inside, _ = detect(capsys, "--books", str(real_books), "--fx", "USDT/KRW=1383.7")
    assert low and [(leg.exchange, leg.side) for leg in low[0].legs] == [("binance", "buy"), ("upbit", "sell")]
    assert high and [(leg.exchange, leg.side) for leg in high[0].legs] == [("upbit", "buy"), ("binance", "sell")]
    assert inside == []  # the premium matches the rate: nothing survives the two fees
    for sig in low + high:
        assert sig.net_edge_bps >= 5.0 and sig.notional <= 1_000.0 * (1 + 1e-9)
        assert sig.fx_rate in (1375.0, 1392.0) and sig.fx_age_ns == 0


def test_the_same_file_gives_the_same_signal_ids(real_books: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = detect(capsys, "--books", str(real_books), "--fx", "USDT/KRW=1375")
    two, _ = detect(capsys, "--books", str(real_books), "--fx", "USDT/KRW=1375")
    assert one and [s.signal_id for s in one] == [s.signal_id for s in two]


def write(tmp_path: Path, *rows: object) -> Path:
    path = tmp_path / "dump.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BINANCE = {"exchange": "binance", "symbol": "BTC/USDT", "seq": 1, "status": "synced",
           "bids": [[99_990.0, 1.0]], "asks": [[100_000.0, 1.0]]}
UPBIT = {"exchange": "upbit", "symbol": "BTC/KRW", "seq": 1, "status": "synced",
         "bids": [[139_500_000.0, 1.0]], "asks": [[139_600_000.0, 1.0]]}


def test_a_usdt_krw_book_in_the_file_gives_the_rate_by_its_mid(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    usdt = {"exchange": "upbit", "symbol": "USDT/KRW", "seq": 1, "status": "synced",
            "bids": [[1379.0, 10_000.0]], "asks": [[1381.0, 10_000.0]]}
    [sig], _ = detect(capsys, "--books", str(write(tmp_path, usdt, BINANCE, UPBIT)))
    assert sig.fx_rate == 1380.0 and sig.meta["fx"] == {"USDT/KRW": 1380.0}


def test_fx_lines_carry_their_time_and_a_stale_rate_gives_nothing(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fresh = write(tmp_path, {"pair": "USDT/KRW", "rate": 1380.0, "ts_ns": 1_000_000_000},
                  {**BINANCE, "ts_ns": 2_000_000_000}, {**UPBIT, "ts_ns": 2_000_000_000})
    signals, _ = detect(capsys, "--books", str(fresh))
    assert signals and signals[0].fx_age_ns == 1_000_000_000
    stale = write(tmp_path, {"pair": "USDT/KRW", "rate": 1380.0, "ts_ns": 1_000_000_000},
                  {**BINANCE, "ts_ns": 62_000_000_000}, {**UPBIT, "ts_ns": 62_000_000_000})
    assert detect(capsys, "--books", str(stale))[0] == []  # 61 s old: over the 60 s limit


def test_line_order_is_time_and_a_book_left_behind_goes_stale(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BINANCE, UPBIT)
    assert detect(capsys, "--books", str(path), "--fx", "USDT/KRW=1380", "--line-ms", "1")[0]
    assert detect(capsys, "--books", str(path), "--fx", "USDT/KRW=1380", "--line-ms", "2001")[0] == []


def test_malformed_and_unusable_lines_are_reported_by_number_and_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crossed = {**BINANCE, "exchange": "okx", "bids": [[101.0, 1.0]], "asks": [[100.0, 1.0]]}
    path = write(tmp_path, "{not json", {"hello": 1}, crossed, {**BINANCE, "bids": "x"}, BINANCE, UPBIT)
    signals, err = detect(capsys, "--books", str(path), "--fx", "USDT/KRW=1380")
    assert len(signals) == 1
    for number in (1, 2, 3, 4):
        assert f"line {number} skipped" in err
    assert "crossed" in err and "'skipped': 4" in err


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_detect(["--books", str(tmp_path / "missing.jsonl")]) == 2
    assert cmd_detect(["--books", str(write(tmp_path, BINANCE)), "--fx", "USDT/KRW"]) == 2
    assert "PAIR=RATE" in capsys.readouterr().err


def test_the_arb_command_runs_it(real_books: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "detect", "--books", str(real_books),
                           "--fx", "USDT/KRW=1375"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    signals = [decode_signal(line) for line in proc.stdout.splitlines()]
    assert signals and signals[0].strategy == "spatial"
