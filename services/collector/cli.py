"""`arb record` and `arb replay`.

``arb record --exchange binance --symbols BTC/USDT --out btc.gz [--duration 60]`` connects
like the collector (URLs from the config, or ``--ws-url``/``--rest-url``), keeps the books
in sync (so it fetches the REST snapshots a replay will need) and writes every received
frame and REST response as gzip lines ``<recv_ns> <frame>``.

``arb replay --exchange binance --capture btc.gz [--capture more.txt] --dump-books [--depth 20]``
feeds captures (that layout, hftbacktest's, cryptofeed's ``raw_data_collection`` or plain
ndjson) through the same decoding and book code as the live collector, as fast as possible
or ``--speed 1`` for the recorded pace. ``--dump-books`` prints one JSON line per book
change, best levels first; a summary goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import msgspec

from services.collector.core import FeedCore
from services.collector.exchanges import VENUES, make_venue
from services.collector.replay import replay
from shared.capture import CaptureError, CaptureWriter, read_captures
from shared.models import BookSnapshot, BookStatus, Level, Message

RAW = argparse.RawTextHelpFormatter


class BookDump:
    """One JSON line per book change: ``{"exchange","symbol","seq","status","bids","asks"}``.

    A book turning stale prints its last levels with ``"status": "stale"``.
    """

    def __init__(self, out: Any, depth: int) -> None:
        self.out = out
        self.depth = depth
        self.last: dict[tuple[str, str], tuple[int, list[Level], list[Level]]] = {}
        self.lines = 0
        self._encode = msgspec.json.Encoder().encode

    def __call__(self, outputs: list[Message]) -> None:
        write = self.out.write
        for msg in outputs:
            if type(msg) is BookSnapshot:
                self.last[(msg.exchange, msg.symbol)] = (msg.seq, msg.bids, msg.asks)
                line = {"exchange": msg.exchange, "symbol": msg.symbol, "seq": msg.seq, "status": msg.status,
                        "bids": msg.bids[:self.depth], "asks": msg.asks[:self.depth]}
            elif type(msg) is BookStatus and msg.status == "stale" and (msg.exchange, msg.symbol) in self.last:
                seq, bids, asks = self.last[(msg.exchange, msg.symbol)]
                line = {"exchange": msg.exchange, "symbol": msg.symbol, "seq": seq, "status": "stale",
                        "bids": bids[:self.depth], "asks": asks[:self.depth]}
            else:
                continue
            write(self._encode(line).decode())
            write("\n")
            self.lines += 1


def cmd_replay(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb replay", description=__doc__, formatter_class=RAW)
    parser.add_argument("--exchange", required=True, choices=sorted(VENUES))
    parser.add_argument("--capture", action="append", required=True, help="capture file (repeat to merge files)")
    parser.add_argument("--dump-books", action="store_true", help="print one JSON line per book change")
    parser.add_argument("--depth", type=int, default=20, help="levels per side in the dump (default 20)")
    parser.add_argument("--speed", type=float, default=None, help="pace by recorded time (1 = as recorded)")
    parser.add_argument("--stale-after-ms", type=int, default=5_000)
    args = parser.parse_args(argv)
    try:
        records = read_captures(args.capture)
    except (OSError, CaptureError) as exc:
        print(f"arb replay: {exc}", file=sys.stderr)
        return 2
    core = FeedCore(make_venue(args.exchange), depth=args.depth, stale_after_ns=args.stale_after_ms * 1_000_000,
                    strict=False)
    counts: Counter[str] = Counter()
    dump = BookDump(sys.stdout, args.depth) if args.dump_books else None

    def emit(outputs: list[Message]) -> None:
        for msg in outputs:
            counts[type(msg).__name__] += 1
        if dump is not None:
            dump(outputs)

    started = time.perf_counter()
    used = 0
    try:
        used = replay(core, records, emit, speed=args.speed)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    summary = {
        "exchange": args.exchange,
        "records": used,
        "seconds": round(time.perf_counter() - started, 3),
        "outputs": dict(counts),
        "stats": dict(core.stats),
        "books": core.health(records[-1].recv_ns if records else 0),
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


def cmd_record(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb record", description=__doc__, formatter_class=RAW)
    parser.add_argument("--exchange", required=True, choices=sorted(VENUES))
    parser.add_argument("--symbols", required=True, help="unified symbols, comma separated: BTC/USDT,ETH/USDT")
    parser.add_argument("--out", required=True, help="gzip capture to write")
    parser.add_argument("--duration", type=float, default=None, help="seconds to record (default: until Ctrl-C)")
    parser.add_argument("--ws-url", default=None)
    parser.add_argument("--rest-url", default=None)
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    from shared.config import ConfigError, load_config
    from shared.service import install_event_loop_policy

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    install_event_loop_policy()
    return asyncio.run(_record(cfg, args))


async def _record(cfg: Any, args: argparse.Namespace) -> int:
    from services.collector.exchanges import venue_options
    from services.collector.feed import Feed
    from services.collector.rest import RestClient
    from services.collector.venue import Fees
    from shared.config import Secrets

    ex = cfg.exchanges.get(args.exchange)
    c = cfg.collector
    venue = make_venue(args.exchange, venue_options(args.exchange, c, ex, Secrets.load()))
    rest = RestClient(args.exchange, args.rest_url or ex.rest_url or venue.rest_url, venue.rest_limit)
    counts: Counter[str] = Counter()

    def emit(outputs: list[Message]) -> None:
        for msg in outputs:
            counts[type(msg).__name__] += 1

    with CaptureWriter(args.out) as writer:
        feed = Feed(
            venue, FeedCore(venue, depth=c.depth), rest,
            ws_url=args.ws_url or ex.ws_url or venue.ws_url,
            symbols=[s.strip() for s in args.symbols.split(",") if s.strip()],
            fees=Fees(Decimal(str(ex.taker_fee)), Decimal(str(ex.maker_fee))),
            emit=emit, tap=writer,
            reconnect_initial_s=c.reconnect_initial_ms / 1000, reconnect_max_s=c.reconnect_max_ms / 1000,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, feed.stop)
        task = asyncio.create_task(feed.run())
        if args.duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=args.duration)
            feed.stop()
        await task
        await rest.close()
        lines = writer.lines
    print(json.dumps({"exchange": args.exchange, "out": args.out, "lines": lines, "outputs": dict(counts)}),
          file=sys.stderr)
    return 0
