"""Running the live collector shell against the local simulator, for the collector tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.collector.core import FeedCore
from services.collector.exchanges import make_venue
from services.collector.feed import Feed
from services.collector.rest import RestClient
from services.collector.venue import Credentials, Fees, VenueOptions
from shared.capture import Record, read_captures
from shared.models import Message
from shared.simulator import Faults, Simulator, simulator

FIXTURES = Path(__file__).resolve().parent / "fixtures"

CAPTURES: dict[str, list[list[str]]] = {
    "binance": [
        ["binance/hftbacktest_spot_btcusdt_20240808.gz"],
        ["binance/cryptofeed_BINANCE.ws.1.0.txt", "binance/cryptofeed_BINANCE.http.0.0.txt"],
    ],
    "upbit": [["upbit/cryptofeed_UPBIT.ws.62.0.txt"]],
    "okx": [["okx/cryptofeed_OKX.ws.1.0.txt"], ["okx/cryptofeed_OKX.ws.1.0_books-l2-tbt_ed5b535.txt"]],
    "bybit": [
        ["bybit/nautilus_2024-12-01_XRPUSDT_ob500.data.ndjson"],
        ["bybit/cryptofeed_v5_BYBIT.ws.2.0_orderbook1_spot.txt"],
        ["bybit/cryptofeed_v5_BYBIT.ws.1.0_orderbook1_linear.txt"],
    ],
    "kucoin": [["kucoin/cryptofeed_KUCOIN.ws.1.0.txt", "kucoin/cryptofeed_KUCOIN.http.0.0.txt"]],
    "gateio": [["gateio/cryptofeed_GATEIO.ws.1.0.txt", "gateio/cryptofeed_GATEIO.http.0.0.txt"]],
    "bitget": [["bitget/cryptofeed_BITGET.ws.1.0.txt"], ["bitget/cryptofeed_BITGET.ws.2.0.txt"]],
    "bithumb": [["bithumb/cryptofeed_BITHUMB.ws.1.0_79e86d3.txt"]],
}
METADATA = {
    "binance": "binance/cryptofeed_BINANCE.0.txt",
    "upbit": "upbit/cryptofeed_UPBIT.0.txt",
    "okx": "okx/cryptofeed_OKX.0.trimmed.txt",
    "kucoin": "kucoin/cryptofeed_KUCOIN.0.txt",
    "gateio": "gateio/cryptofeed_GATEIO.0.txt",
    "bitget": "bitget/cryptofeed_BITGET.0.txt",
    "bithumb": "bithumb/cryptofeed_BITHUMB.0_79e86d3.txt",
}
KUCOIN_KEY = Credentials(key="sim-key", secret="sim-secret", passphrase="sim-passphrase")
"""A key for the simulator (which checks the signature against the secret): the recorded
KuCoin snapshots are of the keyed full-book endpoint."""


def paths(names: Sequence[str]) -> list[Path]:
    return [FIXTURES / n for n in names]


def records(names: Sequence[str]) -> list[Record]:
    return read_captures(paths(names))


@dataclass
class Run:
    sim: Simulator
    core: FeedCore
    feed: Feed
    outputs: list[Message] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    """Wall time each output batch was emitted (ns), aligned with ``batches``."""
    batches: list[list[Message]] = field(default_factory=list)


async def run_against_simulator(
    exchange: str,
    captures: Sequence[str],
    *,
    natives: Sequence[str] | None = None,
    symbols: Sequence[str] = (),
    faults: Faults | None = None,
    options: VenueOptions | None = None,
    strict: bool = False,
    emit: Callable[[list[Message]], None] | None = None,
    timeout_s: float = 60.0,
    rest_bodies: dict[str, bytes] | None = None,
    stale_after_ns: int = 5_000_000_000,
    silence_timeout_s: float = 30.0,
) -> Run:
    """Serve ``captures`` from a simulator, run the collector's Feed against it until the
    whole recording has been played and the collector has gone quiet; return what it emitted."""
    sim = simulator(exchange, paths(captures), faults=faults, rest_bodies=rest_bodies)
    if exchange == "kucoin":
        sim.venue.api_secret = KUCOIN_KEY.secret  # type: ignore[attr-defined]
    await sim.start()
    venue = make_venue(exchange, options)
    core = FeedCore(venue, strict=strict, stale_after_ns=stale_after_ns)
    rest = RestClient(exchange, sim.rest_url, venue.rest_limit)
    run = Run(sim, core, None)  # type: ignore[arg-type]

    def collect(msgs: list[Message]) -> None:
        run.outputs.extend(msgs)
        run.batches.append(msgs)
        run.times.append(time.time_ns())
        if emit is not None:
            emit(msgs)

    feed = Feed(venue, core, rest, ws_url=sim.ws_url, symbols=symbols, natives=natives,
                fees=Fees(Decimal("0.001"), Decimal("0.001")), emit=collect, reconnect_initial_s=0.02,
                silence_timeout_s=silence_timeout_s)
    run.feed = feed
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(sim.finished.wait(), timeout=timeout_s)
        quiet_since, seen = time.monotonic(), -1
        while time.monotonic() - quiet_since < 0.3:  # until nothing new arrives for 0.3 s
            await asyncio.sleep(0.05)
            frames = core.stats["frames"] + len(run.outputs)
            if frames != seen:
                seen, quiet_since = frames, time.monotonic()
    finally:
        feed.stop()
        await asyncio.wait_for(task, timeout=10)
        await rest.close()
        await sim.stop()
    return run


def kinds(outputs: Sequence[Any], name: str) -> list[Any]:
    return [m for m in outputs if type(m).__name__ == name]
