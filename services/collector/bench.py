"""`arb bench collector`: how fast the collector keeps its books, exchange by exchange.

``arb bench collector --exchange binance --json`` measures one exchange over its recorded
capture; ``arb bench collector --all --json`` measures all eight in the same run and prints
one table (a row per exchange). Every figure has a same-run baseline:

- ``core``: every recorded frame (and recorded REST snapshot) through decode + the exchange's
  sync rules + the L2 book + the top-N ``BookSnapshot`` build (and ``Trade``/``TopOfBook``):
  exactly what the live shell calls per frame. ``core_depth_only``: the book frames alone.
  A short recording is replayed several times (``loops``, a fresh book each time) so that
  every pass covers at least ``--min-frames`` (20,000) frames; best of ``--repeat`` passes.
- ``peer_cryptofeed``: cryptofeed 2.4 maintaining the same books from the same frames in the
  same process (its feed's ``message_handler``; REST snapshots served from the recording; an
  L2 callback that reads the top N as ours does; checksums validated where ours are). Needs
  the optional ``bench`` extra (``pip install -e '.[bench]'``); reported as unavailable
  otherwise, and as not applicable where cryptofeed cannot keep that recording's book (with
  the reason).
- ``publish`` (single exchange): the outputs above published to Redis through the real
  ``Publisher`` and ``Producer``.
- ``resync``: the live shell against the local simulator: the connection is closed at
  several points of the recording and the time from the disconnect to the book being synced
  again (new connection, subscription, snapshot, buffered updates) is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

from shared.bench.common import bench_redis, drop_prefix, emit, unique_prefix
from shared.capture import Record, read_captures

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BENCH_SECRET = "bench-secret"
"""The simulator checks KuCoin's signed snapshot requests against this secret."""

Peer = Callable[[list[Record], list[Record], int, int, bool], dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """One exchange's benchmark: its recording, what counts as book traffic, how to resync."""

    capture: tuple[str, ...]
    metadata: tuple[str, ...]
    is_depth: Callable[[Record], bool]
    resync_native: str
    resync_needle: bytes
    """Disconnects are placed on frames of the resynced book (containing this)."""
    options: dict[str, Any] = field(default_factory=dict)
    """VenueOptions for the resync run."""
    peer: str = ""
    """Name of the cryptofeed runner; empty: ``no_peer`` says why."""
    no_peer: str = ""
    synced: bool = True
    """False: the exchange's books never sync (Bithumb's legacy feed), so no resync time exists."""


def _has(*needles: bytes) -> Callable[[Record], bool]:
    return lambda r: r.kind == "rest" or any(n in r.data for n in needles)


PLANS: dict[str, Plan] = {
    "binance": Plan(("binance/hftbacktest_spot_btcusdt_20240808.gz",), ("binance/cryptofeed_BINANCE.0.txt",),
                    lambda r: b"@depth" in r.data[:40] or r.data.startswith(b'{"lastUpdateId"'),
                    "BTCUSDT", b"@depth", peer="binance"),
    "upbit": Plan(("upbit/cryptofeed_UPBIT.ws.62.0.txt",), ("upbit/cryptofeed_UPBIT.0.txt",),
                  _has(b'"ty":"orderbook"'), "KRW-WAVES", b'"cd":"KRW-WAVES"', peer="upbit"),
    "okx": Plan(("okx/cryptofeed_OKX.ws.1.0.txt",), ("okx/cryptofeed_OKX.0.trimmed.txt",),
                _has(b'"channel":"books"'), "BTC-USDT", b'"instId":"BTC-USDT"},"action"', peer="okx"),
    "bybit": Plan(("bybit/nautilus_2024-12-01_XRPUSDT_ob500.data.ndjson",), (), _has(b'"topic":"orderbook.'),
                  "XRPUSDT", b'"type":"delta"', options={"channel_depth": 500}, peer="bybit"),
    "kucoin": Plan(("kucoin/cryptofeed_KUCOIN.ws.1.0.txt", "kucoin/cryptofeed_KUCOIN.http.0.0.txt"),
                   ("kucoin/cryptofeed_KUCOIN.0.txt",), _has(b'"trade.l2update"'), "BCHSV-USDT",
                   b"/market/level2:BCHSV-USDT", peer="kucoin"),
    "gateio": Plan(("gateio/cryptofeed_GATEIO.ws.1.0.txt", "gateio/cryptofeed_GATEIO.http.0.0.txt"),
                   ("gateio/cryptofeed_GATEIO.0.txt",), _has(b'"spot.order_book_update","event":"update"'),
                   "OMG_USDT", b'"s":"OMG_USDT"', peer="gateio"),
    "bitget": Plan(("bitget/cryptofeed_BITGET.ws.1.0.txt",), ("bitget/cryptofeed_BITGET.0.txt",),
                   _has(b'"channel":"books"'), "EOSUSDT", b'"channel":"books","instId":"EOSUSDT"', peer="bitget"),
    "bithumb": Plan(("bithumb/cryptofeed_BITHUMB.ws.1.0_79e86d3.txt",), ("bithumb/cryptofeed_BITHUMB.0_79e86d3.txt",),
                    _has(b'"type":"orderbookdepth"'), "ETH_BTC", b'"symbol":"ETH_BTC"',
                    options={"book_channel": "orderbookdepth"},
                    no_peer="cryptofeed 2.4 keeps no Bithumb book: its module subscribes to trades only, because "
                            "orderbookdepth has no sync point (no snapshot to start from, no sequence)",
                    synced=False),
}


def _paths(names: Sequence[str]) -> list[Path]:
    return [FIXTURES / n for n in names]


# --------------------------------------------------------------------------- ours


def run_core(
    exchange: str, records: list[Record], depth: int, repeat: int, metadata: Sequence[Record] = (),
    min_frames: int = 20_000,
) -> tuple[dict[str, Any], list[Any]]:
    """Frames/s of FeedCore over ``records`` (best of ``repeat`` passes, a fresh core each)."""
    from services.collector.core import FeedCore
    from services.collector.exchanges import make_venue

    items = [(r.data, r.recv_ns, r.url if r.kind == "rest" else None) for r in records if r.kind in ("ws", "rest")]
    loops = _loops(len(items), min_frames)
    best = float("inf")
    outputs: list[Any] = []
    for i in range(repeat):
        elapsed = 0.0
        for loop in range(loops):  # a fresh core each time round: the same work every time
            core = FeedCore(make_venue(exchange), depth=depth, strict=False)
            for r in metadata:  # instrument lists: unified symbols, as the live collector has them
                if r.kind == "rest":
                    core.on_rest(r.url, r.data, r.recv_ns)
            on_frame, on_rest, take = core.on_frame, core.on_rest, core.take
            produced: list[Any] = []
            keep = produced.extend if i == 0 and loop == 0 else None
            t0 = time.perf_counter()
            for data, recv_ns, url in items:
                if url is None:
                    on_frame(data, recv_ns)
                else:
                    on_rest(url, data, recv_ns)
                out = take()
                if keep is not None:
                    keep(out)
            elapsed += time.perf_counter() - t0
            if keep is not None:
                outputs = produced
        best = min(best, elapsed)
    books = sum(1 for o in outputs if type(o).__name__ == "BookSnapshot")
    frames = len(items) * loops
    return {
        "frames": len(items),
        "loops": loops,
        "book_snapshots": books,
        "seconds": round(best, 4),
        "frames_per_s": round(frames / best),
        "us_per_frame": round(best / frames * 1e6, 2),
    }, outputs


def _loops(frames: int, min_frames: int) -> int:
    """Replays of a short recording (a fresh book each time) that make a measurement last long
    enough to be read on a busy machine."""
    return max(1, -(-min_frames // max(frames, 1)))


# --------------------------------------------------------------------------- cryptofeed


class _Peer:
    """Drives one cryptofeed feed's ``message_handler`` over the recorded frames."""

    def __init__(self, frames: list[Record], depth: int, min_frames: int) -> None:
        self.frames = [r.data.decode() for r in frames]
        self.stamps = [r.recv_ns / 1e9 for r in frames]
        self.depth = depth
        self.min_frames = min_frames
        self.tops = 0

    async def on_book(self, book: Any, receipt_timestamp: float) -> None:
        bids, asks = book.book.bids, book.book.asks
        [bids.index(i) for i in range(min(self.depth, len(bids)))]
        [asks.index(i) for i in range(min(self.depth, len(asks)))]
        self.tops += 1

    def measure(self, make: Callable[[], Any], repeat: int, conn: Any = None) -> dict[str, Any]:
        loops = _loops(len(self.frames), self.min_frames)

        async def one_pass() -> float:
            elapsed = 0.0
            for _ in range(loops):  # a fresh feed each time round, as ours gets a fresh core
                feed = make()
                handler = feed.message_handler
                t0 = time.perf_counter()
                for frame, ts in zip(self.frames, self.stamps, strict=True):
                    await handler(frame, conn, ts)
                elapsed += time.perf_counter() - t0
                await feed.http_conn.close()
            return elapsed

        best = min(asyncio.run(one_pass()) for _ in range(repeat))
        frames = len(self.frames) * loops
        return {
            "available": True,
            "version": metadata.version("cryptofeed"),
            "frames": len(self.frames),
            "loops": loops,
            "book_callbacks": self.tops // (repeat * loops),
            "seconds": round(best, 4),
            "frames_per_s": round(frames / best),
            "us_per_frame": round(best / frames * 1e6, 2),
        }


def _recorded_reader(bodies: dict[str, bytes], key: str) -> Callable[..., Awaitable[str]]:
    """cryptofeed's ``http_conn.read`` answered from recorded REST bodies (by a query parameter)."""
    async def read(url: str, *args: Any, **kwargs: Any) -> str:
        return bodies[parse_qs(urlsplit(url).query)[key][0]].decode()

    return read


def _rest_bodies(records: Sequence[Record], path: str, key: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for r in records:
        if r.kind == "rest" and path in r.url:
            out.setdefault(parse_qs(urlsplit(r.url).query)[key][0], r.data)
    return out


def _std(mapping: dict[str, str], natives: set[str]) -> list[str]:
    return [std for std, native in mapping.items() if native in natives]


def run_cryptofeed(
    plan_name: str, records: list[Record], info: list[Record], depth: int, repeat: int, depth_only: bool,
    min_frames: int = 20_000,
) -> dict[str, Any]:
    plan = PLANS[plan_name]
    if not plan.peer:
        return {"available": False, "reason": plan.no_peer}
    try:
        import logging

        from cryptofeed.defines import L2_BOOK
        from cryptofeed.symbols import Symbols
    except ImportError as exc:
        return {"available": False, "reason": f"cryptofeed not installed ({exc}); pip install -e '.[bench]'"}
    logging.getLogger("feedhandler").setLevel(logging.ERROR)
    frames = [r for r in records if r.kind == "ws" and (not depth_only or plan.is_depth(r))]
    peer = _Peer(frames, depth, min_frames)
    rest = [r for r in [*records, *info] if r.kind == "rest"]
    callbacks = {L2_BOOK: peer.on_book}
    conn = SimpleNamespace(uuid="bench", address="")

    if plan.peer == "binance":
        from cryptofeed.exchanges import Binance

        body = next((r.data for r in info if r.kind == "rest" and "exchangeInfo" in r.url), None)
        snapshot = next((r.data for r in records if r.data.startswith(b'{"lastUpdateId"')), None)
        if body is None or snapshot is None:
            return {"available": False, "reason": "needs the exchangeInfo recording and the capture's REST snapshot"}
        Symbols.set(Binance.id, *Binance._parse_symbol_data(json.loads(body)))
        peer.frames = [f for f, r in zip(peer.frames, frames, strict=True) if r.data.startswith(b'{"stream"')]
        peer.stamps = [r.recv_ns / 1e9 for r in frames if r.data.startswith(b'{"stream"')]

        async def snapshot_reply(*args: Any, **kwargs: Any) -> str:
            return snapshot.decode()

        def make_binance() -> Any:
            feed = Binance(symbols=["BTC-USDT"], channels=[L2_BOOK], callbacks=callbacks)
            feed.http_conn.read = snapshot_reply  # the recorded REST snapshot instead of the network
            return feed

        return peer.measure(make_binance, repeat)

    if plan.peer == "okx":
        from cryptofeed.exchanges import OKX

        syms, sym_info = OKX._parse_symbol_data([json.loads(r.data) for r in rest if "public/instruments" in r.url])
        Symbols.set(OKX.id, syms, sym_info)
        natives = {json.loads(r.data)["arg"]["instId"] for r in frames if b'"action"' in r.data}
        return peer.measure(lambda: OKX(symbols=_std(syms, natives), channels=[L2_BOOK], callbacks=callbacks,
                                        checksum_validation=True), repeat)

    if plan.peer == "bybit":
        from cryptofeed.defines import PERPETUAL
        from cryptofeed.exchanges import Bybit

        # The recording is Bybit's own download of one linear market: its symbol map, as the
        # instruments endpoint (not recorded) would give it.
        Symbols.set(Bybit.id, {"XRP-USDT-PERP": "XRPUSDT"}, {"instrument_type": {"XRP-USDT-PERP": PERPETUAL}})
        conn.address = "wss://stream.bybit.com/v5/public/linear"
        return peer.measure(lambda: Bybit(symbols=["XRP-USDT-PERP"], channels=[L2_BOOK], callbacks=callbacks),
                            repeat, conn)

    if plan.peer == "upbit":
        from cryptofeed.exchanges import Upbit

        body = next(r.data for r in rest if "/v1/market/all" in r.url)
        syms, sym_info = Upbit._parse_symbol_data(json.loads(body))
        Symbols.set(Upbit.id, syms, sym_info)
        natives = {json.loads(r.data)["cd"] for r in frames if b'"ty":"orderbook"' in r.data[:20]}
        return peer.measure(lambda: Upbit(symbols=_std(syms, natives), channels=[L2_BOOK], callbacks=callbacks),
                            repeat)

    if plan.peer == "kucoin":
        from cryptofeed.exchanges import KuCoin

        body = next(r.data for r in rest if r.url.endswith("/symbols"))
        syms, sym_info = KuCoin._parse_symbol_data(json.loads(body))
        Symbols.set(KuCoin.id, syms, sym_info)
        snapshots = _rest_bodies(rest, "/market/orderbook/level2", "symbol")
        natives = set(snapshots)
        bullet = {"data": {"token": "bench", "instanceServers": [{"endpoint": "wss://bench", "pingInterval": 18000}]}}
        keys = {"kucoin": {"key_id": "bench", "key_secret": BENCH_SECRET, "key_passphrase": "bench"}}

        def make_kucoin() -> Any:
            with mock.patch.object(KuCoin.http_sync, "write", return_value=bullet):  # no network for the token
                feed = KuCoin(symbols=_std(syms, natives), channels=[L2_BOOK], callbacks=callbacks, config=keys)
            feed.http_conn.read = _recorded_reader(snapshots, "symbol")
            return feed

        return peer.measure(make_kucoin, repeat)

    if plan.peer == "gateio":
        from cryptofeed.exchanges import Gateio

        body = next(r.data for r in rest if "/spot/currency_pairs" in r.url)
        syms, sym_info = Gateio._parse_symbol_data(json.loads(body))
        Symbols.set(Gateio.id, syms, sym_info)
        snapshots = _rest_bodies(rest, "/spot/order_book", "currency_pair")

        def make_gate() -> Any:
            feed = Gateio(symbols=_std(syms, set(snapshots)), channels=[L2_BOOK], callbacks=callbacks)
            feed._reset()  # what its subscribe() does on a live connection
            feed.http_conn.read = _recorded_reader(snapshots, "currency_pair")
            return feed

        return peer.measure(make_gate, repeat)

    if plan.peer == "bitget":
        from cryptofeed.exchanges import Bitget

        syms, sym_info = Bitget._parse_symbol_data([json.loads(r.data) for r in rest if "bitget.com/api/" in r.url])
        Symbols.set(Bitget.id, syms, sym_info)
        natives = {json.loads(r.data)["arg"]["instId"] for r in frames if b'"channel":"books"' in r.data[:120]}
        return peer.measure(lambda: Bitget(symbols=_std(syms, natives), channels=[L2_BOOK], callbacks=callbacks,
                                           checksum_validation=True), repeat, conn)

    raise ValueError(plan.peer)


# --------------------------------------------------------------------------- publish and resync


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


async def run_resync(exchange: str, captures: list[Path], closes: int) -> dict[str, Any]:
    """Disconnect -> synced times of the live shell against the simulator: one closed
    connection per replay of the recording, at ``closes`` different points (a recording of a
    few hundred frames replays in well under the time a resync takes, so several closes in
    one replay would land while the book is still resyncing)."""
    plan = PLANS[exchange]
    if not plan.synced:
        return {"disconnects": 0, "resyncs": 0,
                "note": "never synced: the legacy books have no sync point and are published stale"}
    times: list[float] = []
    for k in range(closes):
        times += await _one_resync(exchange, captures, (k + 1) / (closes + 1))
    if not times:
        return {"disconnects": closes, "resyncs": 0}
    return {
        "disconnects": closes,
        "resyncs": len(times),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "max_ms": round(max(times) * 1000, 2),
        "target_ms": 1000,
    }


async def _one_resync(exchange: str, captures: list[Path], where: float) -> list[float]:
    from services.collector.core import FeedCore
    from services.collector.exchanges import make_venue
    from services.collector.feed import Feed
    from services.collector.rest import RestClient
    from services.collector.venue import Credentials, Fees, VenueOptions
    from shared.models import BookStatus
    from shared.simulator import Faults, simulator

    plan = PLANS[exchange]
    sim = simulator(exchange, captures)
    options: dict[str, Any] = {"trades": False, "bbo": False, **plan.options}  # the book is what is timed
    if exchange == "kucoin":
        sim.venue.api_secret = BENCH_SECRET  # type: ignore[attr-defined]
        options["credentials"] = Credentials("bench", BENCH_SECRET, "bench")
    book_frames = sim.indices(lambda r: plan.resync_needle in r.data)
    close = int(len(book_frames) * where)
    # A pause before the close: in a fast replay the first sync happened a few ms earlier, and
    # the shell spaces snapshot requests for one book by 100 ms; live disconnects are far apart.
    sim.faults = Faults(close_at={book_frames[close]}, stall={book_frames[close - 1]: 0.15})
    await sim.start()
    venue = make_venue(exchange, VenueOptions(**options))
    rest = RestClient(exchange, sim.rest_url, venue.rest_limit)
    stale_at: dict[str, int] = {}
    times: list[float] = []

    def on_output(msgs: list[Any]) -> None:
        for m in msgs:
            if type(m) is BookStatus and m.status == "stale" and m.reason == "disconnected":
                stale_at[m.symbol] = m.ts_ns
            elif type(m) is BookStatus and m.status == "synced" and m.symbol in stale_at:
                times.append((m.ts_ns - stale_at.pop(m.symbol)) / 1e9)

    feed = Feed(venue, FeedCore(venue), rest, ws_url=sim.ws_url, symbols=[], natives=[plan.resync_native],
                fees=Fees(Decimal("0.001"), Decimal("0.001")), emit=on_output)
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(sim.finished.wait(), timeout=120)
        await asyncio.sleep(0.5)  # a resync started near the end of the recording completes
    finally:
        feed.stop()
        await task
        await rest.close()
        await sim.stop()
    return times


# --------------------------------------------------------------------------- commands


def bench_one(exchange: str, args: argparse.Namespace, *, publish: bool) -> dict[str, Any]:
    plan = PLANS[exchange]
    capture = [Path(p) for p in args.capture] if args.capture else _paths(plan.capture)
    records = read_captures(capture)
    info = read_captures(_paths(plan.metadata)) if plan.metadata else []
    depth_records = [r for r in records if r.kind in ("ws", "rest") and plan.is_depth(r)]
    result: dict[str, Any] = {"bench": "collector", "exchange": exchange, "capture": [p.name for p in capture],
                              "depth": args.depth}
    n = args.min_frames
    core_all, outputs = run_core(exchange, records, args.depth, args.repeat, info, n)
    core_depth, _ = run_core(exchange, depth_records, args.depth, args.repeat, info, n)
    peer_all = run_cryptofeed(exchange, records, info, args.depth, args.repeat, False, n)
    peer_depth = run_cryptofeed(exchange, records, info, args.depth, args.repeat, True, n)
    result["core"] = core_all
    result["peer_cryptofeed"] = peer_all
    if peer_all.get("available"):
        result["speedup_vs_cryptofeed"] = round(core_all["frames_per_s"] / peer_all["frames_per_s"], 2)
    result["core_depth_only"] = core_depth
    result["peer_cryptofeed_depth_only"] = peer_depth
    if peer_depth.get("available"):
        result["speedup_vs_cryptofeed_depth_only"] = round(core_depth["frames_per_s"] / peer_depth["frames_per_s"], 2)
    if publish:
        with bench_redis(args.redis_url) as url:
            result["publish"] = asyncio.run(run_publish(outputs, url))
    if args.disconnects:
        result["resync"] = _run(run_resync(exchange, [*capture, *_paths(plan.metadata)], args.disconnects))
    return result


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One line of the eight-exchange table."""
    peer, resync = result["peer_cryptofeed"], result.get("resync", {})
    return {
        "exchange": result["exchange"],
        "frames": result["core"]["frames"],
        "ours_frames_per_s": result["core"]["frames_per_s"],
        "cryptofeed_frames_per_s": peer.get("frames_per_s"),
        "ratio": result.get("speedup_vs_cryptofeed"),
        "ours_depth_only_frames_per_s": result["core_depth_only"]["frames_per_s"],
        "cryptofeed_depth_only_frames_per_s": result["peer_cryptofeed_depth_only"].get("frames_per_s"),
        "ratio_depth_only": result.get("speedup_vs_cryptofeed_depth_only"),
        "resync_p50_ms": resync.get("p50_ms"),
        "resync_max_ms": resync.get("max_ms"),
        "resyncs": f"{resync.get('resyncs', 0)}/{resync.get('disconnects', 0)}",
        "note": "; ".join(n for n in (peer.get("reason", ""), resync.get("note", "")) if n),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = [("exchange", "exchange"), ("frames", "frames"), ("ours_frames_per_s", "ours f/s"),
               ("cryptofeed_frames_per_s", "cryptofeed f/s"), ("ratio", "ratio"),
               ("ours_depth_only_frames_per_s", "ours book f/s"),
               ("cryptofeed_depth_only_frames_per_s", "cf book f/s"), ("ratio_depth_only", "book ratio"),
               ("resync_p50_ms", "resync p50 ms"), ("resync_max_ms", "max ms"), ("resyncs", "resyncs")]
    cells = [[label for _, label in columns]] + [
        ["-" if row[key] is None else str(row[key]) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    for row in rows:
        if row["note"]:
            print(f"{row['exchange']}: {row['note']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb bench collector", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--exchange", default="binance", choices=sorted(PLANS))
    parser.add_argument("--all", action="store_true", help="every exchange, one table (a row per exchange)")
    parser.add_argument("--capture", type=Path, action="append", default=None,
                        help="capture file(s) instead of the exchange's recording (single exchange)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="passes per measurement (best is kept)")
    parser.add_argument("--min-frames", type=int, default=20_000,
                        help="frames per pass: a short recording is replayed until it has this many")
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else a private embedded Redis")
    parser.add_argument("--no-redis", action="store_true", help="skip the publishing measurement")
    parser.add_argument("--disconnects", type=int, default=5, help="disconnects in the resync measurement (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.all:
        emit(bench_one(args.exchange, args, publish=not args.no_redis), args.json)
        return 0
    if args.capture:
        parser.error("--capture goes with one --exchange, not --all")
    results = [bench_one(name, args, publish=False) for name in PLANS]
    rows = [table_row(r) for r in results]
    if args.json:
        print(json.dumps({"bench": "collector", "depth": args.depth, "repeat": args.repeat, "rows": rows,
                          "details": results}, indent=2))
    else:
        print_table(rows)
    return 0


def _run(coro: Any) -> Any:
    from shared.service import install_event_loop_policy

    install_event_loop_policy()
    return asyncio.run(coro)
