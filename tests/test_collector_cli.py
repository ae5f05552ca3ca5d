"""Capture formats, `arb replay --dump-books`, `arb record`, and `arb simulator`, as commands."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.capture import CaptureError, CaptureWriter, parse_line, read_capture, read_captures
from tests.collector_helpers import CAPTURES, METADATA, paths, records
from tests.collector_reference import reference_books

ROOT = Path(__file__).resolve().parents[1]
ARB = [sys.executable, "-c", "from shared.cli import main; main()"]


def _arb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ARB, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_every_capture_layout_reads_back_as_records() -> None:
    hft = records(CAPTURES["binance"][0])
    assert len(hft) == 41_249 and hft[0].recv_ns == 1723161253937085768 and hft[0].kind == "ws"
    upbit = list(read_capture(paths(CAPTURES["upbit"][0])[0]))
    assert [r.kind for r in upbit[:3]] == ["open", "sent", "ws"]
    assert upbit[2].data.startswith(b'{"ty":"trade"')  # Python bytes literal decoded
    rest = records([METADATA["okx"]])
    assert [r.url.rsplit("=", 1)[-1] for r in rest][:2] == ["SPOT", "SWAP"] and rest[0].recv_ns == 1652458996256593000
    ndjson = records(CAPTURES["bybit"][0])
    assert len(ndjson) == 50 and {r.recv_ns for r in ndjson} == {0}
    merged = read_captures(paths(["binance/cryptofeed_BINANCE.ws.1.0.txt", "binance/cryptofeed_BINANCE.http.0.0.txt"]))
    assert [r.recv_ns for r in merged] == sorted(r.recv_ns for r in merged)
    with pytest.raises(CaptureError):
        parse_line(b"not a capture line")


def test_a_written_capture_reads_back_byte_for_byte(tmp_path: Path) -> None:
    frame = b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","b":[["1.10","0.0"]]}}'
    body = b'{"lastUpdateId":5,"bids":[["1.00000000","2.00000000"]],"asks":[]}'
    with CaptureWriter(tmp_path / "c.gz") as writer:
        writer.frame(1, frame)
        writer.rest(2, "https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000", body)
    with gzip.open(tmp_path / "c.gz") as fh:
        assert fh.read().split(b"\n")[0] == b"1 " + frame
    back = list(read_capture(tmp_path / "c.gz"))
    assert [(r.recv_ns, r.kind, r.data, r.url) for r in back] == [
        (1, "ws", frame, ""), (2, "rest", body, "https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000")]


REPLAYED = [("okx", CAPTURES["okx"][0]), ("upbit", CAPTURES["upbit"][0]), ("kucoin", CAPTURES["kucoin"][0]),
            ("gateio", CAPTURES["gateio"][0]), ("bitget", CAPTURES["bitget"][0]), ("bitget", CAPTURES["bitget"][1]),
            ("bithumb", CAPTURES["bithumb"][0])]


@pytest.mark.parametrize(("exchange", "capture"), REPLAYED, ids=[c[0].split("/")[1] for _, c in REPLAYED])
def test_replay_dumps_one_line_per_book_change_equal_to_the_reference(exchange: str, capture: list[str]) -> None:
    args = [a for p in paths(capture) for a in ("--capture", str(p))]
    # A long silence threshold: the recordings have quiet books, and a silent book's line says stale.
    out = _arb("replay", "--exchange", exchange, *args, "--dump-books", "--depth", "5", "--stale-after-ms", "600000")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert set(lines[0]) == {"exchange", "symbol", "seq", "status", "bids", "asks"}
    reference = reference_books(exchange, records(capture), depth=5)
    # Bithumb's legacy books have no sync point: every line of them says stale, and none synced.
    status = "stale" if exchange == "bithumb" else "synced"
    assert {d["status"] for d in lines} == {status}
    synced = [(d["symbol"], d["seq"], [tuple(x) for x in d["bids"]], [tuple(x) for x in d["asks"]])
              for d in lines if d["status"] == status]
    if exchange in ("kucoin", "gateio"):
        # A REST snapshot arrives after the first pushes it may already include: the first book
        # published is the reference's at that point, and every later one follows it exactly.
        for symbol, entries in reference.books.items():
            got = [line[1:] for line in synced if line[0] == symbol]
            first = entries.index(got[0])
            assert got == entries[first:] and first <= 1
    else:
        expected = [(s, *e) for s, entries in reference.books.items() for e in entries]
        assert sorted(synced) == sorted(expected)
    assert all(d["bids"] == sorted(d["bids"], reverse=True) and d["asks"] == sorted(d["asks"]) for d in lines)
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert summary["records"] > 0 and summary["exchange"] == exchange


def test_replay_of_the_hftbacktest_capture_stays_synced_to_the_end() -> None:
    out = _arb("replay", "--exchange", "binance", "--capture", str(paths(CAPTURES["binance"][0])[0]),
               "--dump-books", "--depth", "1")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3449 and {d["status"] for d in lines} == {"synced"}
    assert lines[-1]["seq"] == 50093421584


async def test_a_recording_made_from_the_simulator_replays_to_the_same_books(tmp_path: Path) -> None:
    from shared.simulator import simulator

    sim = simulator("okx", paths([*CAPTURES["okx"][0], METADATA["okx"]]))
    await sim.start()
    out_file = tmp_path / "okx.gz"
    proc = await asyncio.create_subprocess_exec(
        *ARB, "record", "--exchange", "okx", "--symbols", "BTC/USDT", "--out", str(out_file),
        "--ws-url", sim.ws_url, "--rest-url", sim.rest_url, "--duration", "30", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(sim.finished.wait(), timeout=60)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        await sim.stop()
    assert proc.returncode == 0, err.decode()
    recorded = list(read_capture(out_file))
    assert recorded[0].kind == "rest" and "instruments" in recorded[0].url  # metadata first: symbols replay unified
    replayed = _arb("replay", "--exchange", "okx", "--capture", str(out_file), "--dump-books", "--depth", "20")
    assert replayed.returncode == 0, replayed.stderr
    books = [json.loads(line) for line in replayed.stdout.splitlines() if '"synced"' in line]
    reference = reference_books("okx", records(CAPTURES["okx"][0]))
    assert [(b["seq"], [tuple(x) for x in b["bids"]], [tuple(x) for x in b["asks"]]) for b in books] == \
        reference.books["BTC-USDT"]
    assert {b["symbol"] for b in books} == {"BTC/USDT"}


def test_the_simulator_command_serves_until_interrupted() -> None:
    proc = subprocess.Popen([*ARB, "simulator", f"binance={paths(CAPTURES['binance'][0])[0]}", "--drop", "7"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["exchange"] == "binance" and info["ws_url"].startswith("ws://127.0.0.1:")
        assert info["frames"] == 41_249
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    bad = _arb("simulator", "nowhere=file.txt")
    assert bad.returncode == 2 and "expected EXCHANGE=FILE" in bad.stderr


def test_the_simulator_command_serves_the_four_newer_exchanges() -> None:
    serve = [f"{name}={','.join(str(p) for p in paths(CAPTURES[name][0]))}"
             for name in ("kucoin", "gateio", "bitget", "bithumb")]
    proc = subprocess.Popen([*ARB, "simulator", *serve, "--close-at", "5"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        served = {info["exchange"]: info for info in (json.loads(proc.stdout.readline()) for _ in serve)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    expected = {name: sum(1 for r in records(CAPTURES[name][0]) if r.kind == "ws")
                for name in ("kucoin", "gateio", "bitget", "bithumb")}
    assert {name: info["frames"] for name, info in served.items()} == expected
    assert len({info["rest_url"] for info in served.values()}) == 4


async def test_recording_kucoin_through_its_bullet_token_replays_to_the_exchanges_books(tmp_path: Path) -> None:
    """``arb record`` against the simulator without a key: a token from the bullet endpoint, the
    public partial snapshot; the recording replays to books the exchange had, level for level."""
    from shared.simulator import simulator

    sim = simulator("kucoin", paths([*CAPTURES["kucoin"][0], METADATA["kucoin"]]))
    await sim.start()
    out_file = tmp_path / "kucoin.gz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUCOIN_")}
    proc = await asyncio.create_subprocess_exec(
        *ARB, "record", "--exchange", "kucoin", "--symbols", "BSV/USDT,SNX/BTC", "--out", str(out_file),
        "--rest-url", sim.rest_url, "--duration", "30", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(sim.finished.wait(), timeout=60)
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    finally:
        await sim.stop()
    assert proc.returncode == 0, err.decode()
    recorded = list(read_capture(out_file))
    urls = [r.url for r in recorded if r.kind == "rest"]
    assert urls[0].endswith("/api/v2/symbols") and urls[1].endswith("/api/v1/bullet-public")
    assert sum("/market/orderbook/level2_100?symbol=" in u for u in urls) == 2
    replayed = _arb("replay", "--exchange", "kucoin", "--capture", str(out_file), "--dump-books", "--depth", "20",
                    "--stale-after-ms", "600000")
    assert replayed.returncode == 0, replayed.stderr
    books = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert {b["symbol"] for b in books} == {"BSV/USDT", "SNX/BTC"}
    reference = reference_books("kucoin", records(CAPTURES["kucoin"][0]))
    natives = {"BSV/USDT": "BCHSV-USDT", "SNX/BTC": "SNX-BTC"}
    known = {(natives[s], e[0]): e for s in natives for e in reference.books[natives[s]]}
    known.update({(natives[s], e[0]): e for s in natives for e in reference.quiet.get(natives[s], [])})
    for b in books:
        assert (b["seq"], [tuple(x) for x in b["bids"]], [tuple(x) for x in b["asks"]]) == known[
            (natives[b["symbol"]], b["seq"])]
    assert len(books) > 500
