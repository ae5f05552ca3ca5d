"""`arb bench collector --exchange binance --json`: how fast the collector keeps a book.

All measurements in the same run, over the recorded Binance BTCUSDT capture (hftbacktest:
the REST snapshot, 3,451 ``depth@100ms`` diffs, 28,040 ``bookTicker``, 9,757 ``trade``):

- ``core``: every frame through decode + the exchange's sync rules + the L2 book + the
  top-N ``BookSnapshot`` build (and ``Trade``/``TopOfBook`` for the other frames): exactly
  what the live shell calls per frame. ``core_depth_only``: the snapshot and diffs alone.
- ``peer_cryptofeed``: cryptofeed 2.4 maintaining the same book from the same frames (its
  Binance feed's ``message_handler``; the REST snapshot served from the recording; an L2
  callback that reads the top N as ours does); ``peer_cryptofeed_depth_only`` likewise.
  Needs the optional ``bench`` extra (``pip install -e '.[bench]'``); reported as
  unavailable otherwise.
- ``publish``: the snapshots, trades and BBOs produced above published to Redis through
  the real ``Publisher`` and ``Producer`` (pipelined XADD + latest-book SET), measured
  separately from the core.
- ``resync``: the live shell against the local simulator: the connection is closed at
  several points of the recording and the time from the disconnect to the book being
  synced again (new connection, subscribe, REST snapshot, buffered diffs) is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

from shared.bench.common import bench_redis, drop_prefix, emit, unique_prefix
from shared.capture import Record, read_captures

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "binance"
DEFAULT_CAPTURE = FIXTURES / "hftbacktest_spot_btcusdt_20240808.gz"
DEFAULT_INFO = FIXTURES / "cryptofeed_BINANCE.0.txt"


def _is_depth(record: Record) -> bool:
    return b"@depth" in record.data[:40] or record.data.startswith(b'{"lastUpdateId"')


def run_core(
    exchange: str, records: list[Record], depth: int, repeat: int, metadata: Sequence[Record] = ()
) -> tuple[dict[str, Any], list[Any]]:
    """Frames/s of FeedCore over ``records`` (best of ``repeat`` passes, a fresh core each)."""
    from services.collector.core import FeedCore
    from services.collector.exchanges import make_venue

    frames = [(r.data, r.recv_ns) for r in records if r.kind == "ws"]
    best = float("inf")
    outputs: list[Any] = []
    for i in range(repeat):
        core = FeedCore(make_venue(exchange), depth=depth, strict=False)
        for r in metadata:  # instrument lists: unified symbols, as the live collector has them
            core.on_rest(r.url, r.data, r.recv_ns)
        on_frame, take = core.on_frame, core.take
        produced: list[Any] = []
        keep = produced.extend if i == 0 else None
        t0 = time.perf_counter()
        for data, recv_ns in frames:
            on_frame(data, recv_ns)
            out = take()
            if keep is not None:
                keep(out)
        best = min(best, time.perf_counter() - t0)
        if i == 0:
            outputs = produced
    books = sum(1 for o in outputs if type(o).__name__ == "BookSnapshot")
    return {
        "frames": len(frames),
        "book_snapshots": books,
        "seconds": round(best, 4),
        "frames_per_s": round(len(frames) / best),
        "us_per_frame": round(best / len(frames) * 1e6, 2),
    }, outputs


def run_cryptofeed(
    records: list[Record], info_records: list[Record], depth: int, repeat: int, depth_only: bool
) -> dict[str, Any]:
    try:
        from cryptofeed.defines import L2_BOOK
        from cryptofeed.exchanges import Binance
        from cryptofeed.symbols import Symbols
    except ImportError as exc:
        return {"available": False, "reason": f"cryptofeed not installed ({exc}); pip install -e '.[bench]'"}
    import json
    import logging

    logging.getLogger("feedhandler").setLevel(logging.ERROR)
    info = next((r.data for r in info_records if r.kind == "rest" and "exchangeInfo" in r.url), None)
    snapshot = next((r.data for r in records if r.data.startswith(b'{"lastUpdateId"')), None)
    if info is None or snapshot is None:
        return {"available": False, "reason": "needs the exchangeInfo recording and the capture's REST snapshot"}
    syms, sym_info = Binance._parse_symbol_data(json.loads(info))
    Symbols.set(Binance.id, syms, sym_info)
    # The REST snapshot reaches cryptofeed through its HTTP client (below), not as a frame.
    wanted = [r for r in records if r.kind == "ws" and r.data.startswith(b'{"stream"')
              and (not depth_only or b"@depth" in r.data[:40])]
    frames = [r.data.decode() for r in wanted]
    stamps = [r.recv_ns / 1e9 for r in wanted]
    tops = 0

    async def on_book(book: Any, receipt_timestamp: float) -> None:
        nonlocal tops
        bids, asks = book.book.bids, book.book.asks
        [bids.index(i) for i in range(min(depth, len(bids)))]
        [asks.index(i) for i in range(min(depth, len(asks)))]
        tops += 1

    async def snapshot_reply(*args: Any, **kwargs: Any) -> str:
        return snapshot.decode()

    async def one_pass() -> float:
        feed = Binance(symbols=["BTC-USDT"], channels=[L2_BOOK], callbacks={L2_BOOK: on_book})
        feed.http_conn.read = snapshot_reply  # the recorded REST snapshot instead of the network
        handler = feed.message_handler
        t0 = time.perf_counter()
        for frame, ts in zip(frames, stamps, strict=True):
            await handler(frame, None, ts)
        elapsed = time.perf_counter() - t0
        await feed.http_conn.close()
        return elapsed

    best = min(asyncio.run(one_pass()) for _ in range(repeat))
    return {
        "available": True,
        "version": metadata.version("cryptofeed"),
        "frames": len(frames),
        "book_callbacks": tops // repeat,
        "seconds": round(best, 4),
        "frames_per_s": round(len(frames) / best),
        "us_per_frame": round(best / len(frames) * 1e6, 2),
    }


async def run_publish(outputs: list[Any], redis_url: str) -> dict[str, Any]:
    from services.collector.publisher import Publisher
    from shared.runtime import Bus, Producer
    from shared.streams import KeySpace

    prefix = unique_prefix("collector")
    bus = Bus.from_url(redis_url, prefix=prefix, keys=KeySpace("bench", prefix.strip(":").replace(":", "-")))
    producer = Producer(bus)
    publisher = Publisher(producer, bus.keys)
    chunk = 64  # about what one loop turn carries at a busy moment
    try:
        t0 = time.perf_counter()
        for i in range(0, len(outputs), chunk):
            publisher(outputs[i:i + chunk])
            await asyncio.sleep(0)  # end of a loop turn: the producer pipelines what it has
        await producer.flush()
        elapsed = time.perf_counter() - t0
    finally:
        await producer.close()
        await bus.close()
        drop_prefix(redis_url, prefix)
        drop_prefix(redis_url, f"arbitrage:bench:{prefix.strip(':').replace(':', '-')}:")
    return {"messages": len(outputs), "seconds": round(elapsed, 4), "messages_per_s": round(len(outputs) / elapsed)}


async def run_resync(captures: list[Path], closes: int) -> dict[str, Any]:
    """Disconnect -> synced times of the live shell against the simulator."""
    from services.collector.core import FeedCore
    from services.collector.exchanges import make_venue
    from services.collector.feed import Feed
    from services.collector.rest import RestClient
    from services.collector.venue import Fees
    from shared.models import BookStatus
    from shared.simulator import Faults, simulator

    sim = simulator("binance", captures)
    depth_frames = sim.indices(lambda r: b"@depth" in r.data[:40])
    step = max(1, len(depth_frames) // (closes + 1))
    sim.faults = Faults(close_at={depth_frames[step * (k + 1)] for k in range(closes)})
    await sim.start()
    venue = make_venue("binance")
    rest = RestClient("binance", sim.rest_url, venue.rest_limit)
    stale_at: dict[str, int] = {}
    times: list[float] = []

    def on_output(msgs: list[Any]) -> None:
        for m in msgs:
            if type(m) is BookStatus and m.status == "stale" and m.reason == "disconnected":
                stale_at[m.symbol] = m.ts_ns
            elif type(m) is BookStatus and m.status == "synced" and m.symbol in stale_at:
                times.append((m.ts_ns - stale_at.pop(m.symbol)) / 1e9)

    feed = Feed(venue, FeedCore(venue), rest, ws_url=sim.ws_url, symbols=["BTC/USDT"],
                fees=Fees(Decimal("0.001"), Decimal("0.001")), emit=on_output)
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(sim.finished.wait(), timeout=120)
        await asyncio.sleep(0.2)
    finally:
        feed.stop()
        await task
        await rest.close()
        await sim.stop()
    if not times:
        return {"disconnects": closes, "resyncs": 0}
    return {
        "disconnects": closes,
        "resyncs": len(times),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "max_ms": round(max(times) * 1000, 2),
        "target_ms": 1000,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb bench collector", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchange", default="binance", choices=["binance"])
    parser.add_argument("--capture", type=Path, default=DEFAULT_CAPTURE)
    parser.add_argument("--exchange-info", type=Path, default=DEFAULT_INFO,
                        help="recorded exchangeInfo (cryptofeed needs it to know the symbol)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="passes per measurement (best is kept)")
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else a private embedded Redis")
    parser.add_argument("--no-redis", action="store_true", help="skip the publishing measurement")
    parser.add_argument("--disconnects", type=int, default=5, help="disconnects in the resync measurement (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    records = read_captures([args.capture])
    depth_records = [r for r in records if r.kind == "ws" and _is_depth(r)]
    info = read_captures([args.exchange_info]) if args.exchange_info.exists() else []

    result: dict[str, Any] = {"bench": "collector", "exchange": args.exchange, "capture": args.capture.name,
                              "depth": args.depth}
    core_all, outputs = run_core(args.exchange, records, args.depth, args.repeat, info)
    core_depth, _ = run_core(args.exchange, depth_records, args.depth, args.repeat, info)
    peer_all = run_cryptofeed(records, info, args.depth, args.repeat, depth_only=False)
    peer_depth = run_cryptofeed(records, info, args.depth, args.repeat, depth_only=True)
    result["core"] = core_all
    result["peer_cryptofeed"] = peer_all
    if peer_all.get("available"):
        result["speedup_vs_cryptofeed"] = round(core_all["frames_per_s"] / peer_all["frames_per_s"], 2)
    result["core_depth_only"] = core_depth
    result["peer_cryptofeed_depth_only"] = peer_depth
    if peer_depth.get("available"):
        result["speedup_vs_cryptofeed_depth_only"] = round(core_depth["frames_per_s"] / peer_depth["frames_per_s"], 2)
    if not args.no_redis:
        with bench_redis(args.redis_url) as url:
            result["publish"] = asyncio.run(run_publish(outputs, url))
    if args.disconnects:
        result["resync"] = _run(run_resync([args.capture, *([args.exchange_info] if info else [])], args.disconnects))
    emit(result, args.json)
    return 0


def _run(coro: Any) -> Any:
    from shared.service import install_event_loop_policy

    install_event_loop_policy()
    return asyncio.run(coro)

