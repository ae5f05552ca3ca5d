"""Ticks to ClickHouse through clickhouse-connect's HTTP client, against ClickHouse (chDB)
behind the ClickHouse HTTP protocol (``tests/clickhouse_http.py``), in its own process:
chDB admits one data directory per process, so this test process never opens one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.collector.clickhouse_sink import ClickHouseSink
from services.collector.publisher import Publisher
from services.collector.venue import VenueOptions
from shared import clickhouse
from shared.models import BookSnapshot, Message, Trade
from shared.runtime import Bus, Producer
from tests.collector_helpers import CAPTURES, KUCOIN_KEY, METADATA, run_against_simulator

FRONTEND = Path(__file__).resolve().parent / "clickhouse_http.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def clickhouse_server(data_dir: Path, port: int = 0) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(FRONTEND), str(data_dir), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"ClickHouse HTTP front-end did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield f"http://127.0.0.1:{line}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _count(url: str, table: str) -> int:
    client = clickhouse.connect(url)
    try:
        return int(client.command(f"SELECT count() FROM {table}"))
    finally:
        client.close()


def _gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    return float(value or 0.0)


def _book(i: int) -> BookSnapshot:
    now = time.time_ns()
    return BookSnapshot(exchange="binance", symbol="BTC/USDT", seq=i, bids=[(100.0 - i * 1e-3, 1.0)],
                        asks=[(100.1, 2.0)], ts_exchange_ns=now, ts_recv_ns=now, ts_pub_ns=now)


def _trade(i: int) -> Trade:
    now = time.time_ns()
    return Trade(exchange="binance", symbol="BTC/USDT", trade_id=str(i), price=100.0, size=0.5, side="buy",
                 ts_exchange_ns=now, ts_recv_ns=now)


async def test_ticks_from_a_replay_are_queryable_and_their_counts_equal_what_was_published(
    bus: Bus, tmp_path: Path
) -> None:
    with clickhouse_server(tmp_path / "ch") as url:
        sink = ClickHouseSink(url, batch_rows=2_000, flush_interval_s=0.2, spill_dir=tmp_path / "spill")
        writer = asyncio.create_task(sink.run())
        producer = Producer(bus)
        publisher = Publisher(producer, bus.keys, ticks=sink)
        published = {"book": 0, "trade": 0}

        def emit(msgs: list[Message]) -> None:
            publisher(msgs)
            published["book"] += sum(1 for m in msgs if type(m) is BookSnapshot)
            published["trade"] += sum(1 for m in msgs if type(m) is Trade)

        run = await run_against_simulator("binance", [*CAPTURES["binance"][0], METADATA["binance"]],
                                          symbols=["BTC/USDT"], strict=True, emit=emit,
                                          options=VenueOptions(bbo=False))
        await producer.flush()
        writer.cancel()
        await sink.close()
        assert run.core.stats["frames"] > 13_000
        # Diffs buffered until the REST snapshot arrives become one book: how many depends on timing.
        assert 3400 < published["book"] <= 3449 and published["trade"] == 9757
        assert _count(url, "orderbook_snapshots") == published["book"]
        assert _count(url, "tick_trades") == published["trade"]
        client = clickhouse.connect(url)
        rows = client.query("SELECT exchange, symbol, max(seq), length(any(bid_prices)) FROM orderbook_snapshots "
                            "GROUP BY exchange, symbol").result_rows
        client.close()
        assert rows == [("binance", "BTC/USDT", max(m.seq for m in run.outputs if type(m) is BookSnapshot), 20)]
        assert sink.spill.rows == 0
        await producer.close()


async def test_clickhouse_down_spills_to_disk_and_everything_loads_when_it_is_back(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"  # nothing listens there yet
    sink = ClickHouseSink(url, batch_rows=100, spill_dir=tmp_path / "spill")
    for i in range(250):
        sink.add_book(_book(i))
    for i in range(40):
        sink.add_trade(_trade(i))
    await sink.flush()
    assert sink.spill.rows == 290
    assert len(sink.spill.files()) == 2
    assert _gauge("arb_collector_clickhouse_spilled_rows") == 290
    assert _gauge("arb_collector_clickhouse_spilled_bytes") == sink.spill.bytes > 0
    for i in range(250, 260):  # still down: more spills, nothing lost
        sink.add_book(_book(i))
    await sink.flush()
    assert sink.spill.rows == 300
    with clickhouse_server(tmp_path / "ch", port):
        sink.add_trade(_trade(40))
        await sink.flush()  # the new batch goes in, then the spilled ones are loaded
        assert sink.spill.rows == 0 and not sink.spill.files()
        assert _gauge("arb_collector_clickhouse_spilled_bytes") == 0
        assert _count(url, "orderbook_snapshots") == 260
        assert _count(url, "tick_trades") == 41
        client = clickhouse.connect(url)
        seqs = client.query("SELECT groupArray(seq) FROM (SELECT seq FROM orderbook_snapshots ORDER BY seq)")
        seqs = seqs.result_rows
        client.close()
        assert list(seqs[0][0]) == list(range(260))
    await sink.close()


async def test_spilled_batches_left_by_a_previous_run_are_loaded_by_the_next(tmp_path: Path) -> None:
    port = _free_port()
    first = ClickHouseSink(f"http://127.0.0.1:{port}", spill_dir=tmp_path / "spill")
    for i in range(30):
        first.add_book(_book(i))
    await first.close()  # ClickHouse down at shutdown: the batch waits on disk
    second = ClickHouseSink(f"http://127.0.0.1:{port}", spill_dir=tmp_path / "spill")
    assert second.spill.rows == 30
    with clickhouse_server(tmp_path / "ch", port) as url:
        await second.flush()
        assert _count(url, "orderbook_snapshots") == 30
    await second.close()


async def test_past_the_disk_bound_batches_are_dropped_and_counted(tmp_path: Path) -> None:
    sink = ClickHouseSink(f"http://127.0.0.1:{_free_port()}", spill_dir=tmp_path / "spill", spill_max_bytes=6_000)
    before = REGISTRY.get_sample_value("arb_collector_clickhouse_dropped_rows_total",
                                       {"table": "orderbook_snapshots"}) or 0.0
    for round_ in range(4):
        for i in range(50):
            sink.add_book(_book(round_ * 50 + i))
        await sink.flush()
    assert 0 < sink.spill.bytes <= 6_000
    dropped = (REGISTRY.get_sample_value("arb_collector_clickhouse_dropped_rows_total",
                                         {"table": "orderbook_snapshots"}) or 0.0) - before
    assert dropped > 0
    assert sink.spill.rows + dropped == 200
    await sink.close()


@pytest.mark.parametrize("dsn", ["chdb", "http"])
def test_the_same_code_writes_through_both_dsns(tmp_path: Path, dsn: str) -> None:
    """chDB in a child process (one data directory per process), HTTP against the front-end."""
    script = (
        "import asyncio, sys, time\n"
        "from services.collector.clickhouse_sink import ClickHouseSink\n"
        "from shared.models import Trade\n"
        "async def main():\n"
        "    sink = ClickHouseSink(sys.argv[1], spill_dir=sys.argv[2])\n"
        "    now = time.time_ns()\n"
        "    for i in range(123):\n"
        "        sink.add_trade(Trade(exchange='okx', symbol='BTC/USDT', trade_id=str(i), price=1.0, size=1.0,\n"
        "                             side='sell', ts_exchange_ns=now, ts_recv_ns=now))\n"
        "    await sink.close()\n"
        "    from shared import clickhouse\n"
        "    print(clickhouse.connect(sys.argv[1]).command('SELECT count() FROM tick_trades'))\n"
        "asyncio.run(main())\n"
    )
    if dsn == "chdb":
        url = f"chdb://{tmp_path / 'chdb'}"
        out = subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "spill")], capture_output=True,
                             text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == "123"
    else:
        with clickhouse_server(tmp_path / "ch") as url:
            out = subprocess.run([sys.executable, "-c", script, url, str(tmp_path / "spill")], capture_output=True,
                                 text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip().splitlines()[-1] == "123"


NEW_EXCHANGES = {
    # exchange: (capture + metadata, unified symbols, venue options)
    "kucoin": ([*CAPTURES["kucoin"][0], METADATA["kucoin"]], ["BSV/USDT", "SNX/BTC", "DAPPT/BTC"],
               VenueOptions(credentials=KUCOIN_KEY)),
    "gateio": ([*CAPTURES["gateio"][0], METADATA["gateio"]], ["OMG/USDT", "NEO/BTC", "DIS/USDT"], VenueOptions()),
    "bitget": ([*CAPTURES["bitget"][0], METADATA["bitget"]], ["EOS/USDT", "AVAX/USDT", "HOT/USDT"], VenueOptions()),
    "bithumb": ([*CAPTURES["bithumb"][0], METADATA["bithumb"]], ["ETH/BTC", "CHZ/KRW", "CON/KRW", "GOM2/KRW"],
                VenueOptions(book_channel="orderbookdepth")),
}


async def test_ticks_of_kucoin_gate_bitget_and_bithumb_are_queryable_with_the_published_counts(
    bus: Bus, tmp_path: Path
) -> None:
    """The four exchanges replayed at once through their simulators into one sink; every
    published book snapshot (Bithumb's legacy ones marked stale) and trade is a row."""
    with clickhouse_server(tmp_path / "ch") as url:
        sink = ClickHouseSink(url, batch_rows=2_000, flush_interval_s=0.2, spill_dir=tmp_path / "spill")
        writer = asyncio.create_task(sink.run())
        producer = Producer(bus)
        publisher = Publisher(producer, bus.keys, ticks=sink)
        published: dict[tuple[str, str], int] = {}

        def emit(msgs: list[Message]) -> None:
            publisher(msgs)
            for m in msgs:
                if type(m) is BookSnapshot or type(m) is Trade:
                    key = (m.exchange, "trade" if type(m) is Trade else f"book:{m.status}")
                    published[key] = published.get(key, 0) + 1

        runs = await asyncio.gather(*(
            run_against_simulator(exchange, captures, symbols=symbols, strict=True, emit=emit, options=options)
            for exchange, (captures, symbols, options) in NEW_EXCHANGES.items()))
        await producer.flush()
        writer.cancel()
        await sink.close()
        assert all(run.core.malformed == 0 for run in runs)
        client = clickhouse.connect(url)
        books = {(e, f"book:{s}"): n for e, s, n in client.query(
            "SELECT exchange, status, count() FROM orderbook_snapshots GROUP BY exchange, status").result_rows}
        trades = {(e, "trade"): n for e, n in client.query(
            "SELECT exchange, count() FROM tick_trades GROUP BY exchange").result_rows}
        symbols = {(e, s) for e, s in client.query("SELECT DISTINCT exchange, symbol FROM orderbook_snapshots")
                   .result_rows}
        client.close()
        assert {**books, **trades} == published
        assert {e for e, _ in published} == set(NEW_EXCHANGES)
        assert published[("bithumb", "book:stale")] > 50 and ("bithumb", "book:synced") not in published
        assert all(published[(e, "book:synced")] > 20 for e in ("kucoin", "gateio", "bitget"))
        assert {s for e, s in symbols} >= {"BSV/USDT", "OMG/USDT", "EOS/USDT", "CHZ/KRW"}
        await producer.close()
