"""The collector service as a process: four simulated exchanges in, the bus contracts out
(md streams, latest books, instruments, FX, alerts), ticks in embedded ClickHouse, /health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from shared import models
from shared.capture import read_captures
from shared.models import BookSnapshot, Instrument
from shared.runtime import FIELD, Bus
from shared.simulator import Simulator, simulator
from shared.streams import KeySpace
from tests.collector_helpers import CAPTURES, KUCOIN_KEY, METADATA, paths
from tests.test_collector_clickhouse import clickhouse_server

ROOT = Path(__file__).resolve().parents[1]

# Bybit's v5 instruments endpoint was never recorded in our fixtures: this body is built from
# its documented response schema (docs/v5/market/instrument.mdx) for two markets of the
# recorded orderbook.1 capture. It is metadata only; the order-book frames are recorded ones.
BYBIT_INSTRUMENTS = json.dumps({
    "retCode": 0, "retMsg": "OK", "result": {"category": "spot", "list": [
        {"symbol": "OPUSDC", "baseCoin": "OP", "quoteCoin": "USDC", "status": "Trading",
         "priceFilter": {"tickSize": "0.001"},
         "lotSizeFilter": {"basePrecision": "0.01", "quotePrecision": "0.000001", "minOrderQty": "0.01",
                           "maxOrderQty": "100000", "minOrderAmt": "1", "maxOrderAmt": "2000000"}},
        {"symbol": "KCSUSDT", "baseCoin": "KCS", "quoteCoin": "USDT", "status": "Trading",
         "priceFilter": {"tickSize": "0.001"},
         "lotSizeFilter": {"basePrecision": "0.0001", "quotePrecision": "0.000001", "minOrderQty": "0.01",
                           "maxOrderQty": "10000", "minOrderAmt": "1", "maxOrderAmt": "200000"}},
    ]}, "retExtInfo": {}, "time": 1749833474000,
}).encode()


@contextlib.asynccontextmanager
async def reference_fx(rate: float) -> AsyncIterator[str]:
    """A USD/KRW quote over HTTP, like a rates API would give."""
    async def quote(_: web.Request) -> web.Response:
        return web.json_response({"base": "USD", "rates": {"KRW": rate}})

    app = web.Application()
    app.router.add_get("/latest", quote)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/latest"
    finally:
        await runner.cleanup()


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "services.collector"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


async def _health(bus: Bus, proc: subprocess.Popen[str], timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        beats = await bus.redis.hgetall(bus.keys.heartbeats())
        for raw in beats.values():
            hb = msgspec.json.decode(raw, type=models.Heartbeat)
            if hb.service == "collector" and hb.http_port:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{hb.http_port}/health") as r:
                    doc: dict[str, Any] = await r.json()
                    doc["_http_status"] = r.status
                    return doc
        await asyncio.sleep(0.2)
    raise AssertionError(f"the collector never reported a heartbeat: {_stop(proc)[-3000:]}")


def _binance_diff_ids() -> list[int]:
    """The final update id ``u`` of every depth diff in the Binance capture, in order."""
    ids = []
    for record in read_captures(paths(CAPTURES["binance"][0])):
        doc = msgspec.json.decode(record.data) if record.kind == "ws" else None
        data = doc.get("data", doc) if isinstance(doc, dict) else None
        if isinstance(data, dict) and data.get("e") == "depthUpdate":
            ids.append(data["u"])
    return ids


async def _entries(bus: Bus, stream: str) -> list[Any]:
    return [models.decode(fields[FIELD]) for _, fields in await bus.redis.xrange(bus.stream(stream))]


async def test_the_service_publishes_every_contract_from_four_simulated_exchanges(
    service_env: dict[str, str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    sims: dict[str, Simulator] = {
        "binance": simulator("binance", paths([*CAPTURES["binance"][0], METADATA["binance"]])),
        "okx": simulator("okx", paths([*CAPTURES["okx"][0], METADATA["okx"]])),
        "upbit": simulator("upbit", paths([*CAPTURES["upbit"][0], METADATA["upbit"]])),
        "bybit": simulator("bybit", paths(CAPTURES["bybit"][1]),
                           rest_bodies={"/v5/market/instruments-info": BYBIT_INSTRUMENTS}),
    }
    for sim in sims.values():
        await sim.start()
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
    chdb_dir = tmp_path / "clickhouse"
    env = dict(service_env)
    env.update({
        "CLICKHOUSE_URL": f"chdb://{chdb_dir}",
        "ARB_CLICKHOUSE__SPILL_DIR": str(tmp_path / "spill"),
        "ARB_CLICKHOUSE__FLUSH_INTERVAL_MS": "200",
        "ARB_COLLECTOR__BBO": "false",  # keeps md.BTC under its MAXLEN, so the stream can be counted
        "ARB_EXCHANGES__BINANCE__SYMBOLS": '["BTC/USDT"]',
        "ARB_EXCHANGES__OKX__SYMBOLS": '["BTC/USDT"]',
        "ARB_EXCHANGES__UPBIT__SYMBOLS": '["WAVES/KRW", "LAMB/KRW"]',
        "ARB_EXCHANGES__BYBIT__SYMBOLS": '["OP/USDC", "KCS/USDT"]',
        "ARB_EXCHANGES__BYBIT__BOOK_DEPTH": "1",
        # The recording has no KRW-USDT market: any Upbit book drives the same FX path.
        "ARB_COLLECTOR__FX_SOURCE": "WAVES/KRW",
        "ARB_COLLECTOR__FX_REFERENCE_FIELD": "rates.KRW",
    })
    for name, sim in sims.items():
        env[f"ARB_EXCHANGES__{name.upper()}__WS_URL"] = sim.ws_url
        env[f"ARB_EXCHANGES__{name.upper()}__REST_URL"] = sim.rest_url
    async with reference_fx(1380.0) as fx_url:
        env["ARB_COLLECTOR__FX_REFERENCE_URL"] = fx_url
        proc = _start(env)
        try:
            await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in sims.values())), timeout=90)
            await asyncio.sleep(1.5)  # the last frames through the service, one ClickHouse flush
            health = await _health(bus, proc)

            assert health["_http_status"] == 200 and health["status"] == "ok"
            assert {n: f["state"] for n, f in health["feeds"].items()} == dict.fromkeys(sims, "connected")
            assert health["books"]["binance:BTC/USDT"]["status"] == "synced"
            assert health["books"]["okx:BTC/USDT"]["status"] == "synced"

            btc = await _entries(bus, "md.BTC")
            books = [m for m in btc if type(m) is BookSnapshot]
            assert {m.exchange for m in books} == {"binance", "okx"}
            assert all(m.ts_exchange_ns and m.ts_recv_ns <= m.ts_pub_ns for m in books)
            # One book per diff, except the diffs buffered until the REST snapshot came (how many
            # depends on when it came): one book for those.
            seqs = [m.seq for m in books if m.exchange == "binance"]
            assert seqs == [seqs[0]] + [u for u in _binance_diff_ids() if u > seqs[0]]
            assert seqs[-1] == 50093421584  # the capture's last u
            assert sum(1 for m in btc if type(m) is models.Trade and m.exchange == "binance") == 9757
            assert {type(m).__name__ for m in await _entries(bus, "md.WAVES")} >= {"BookSnapshot", "Trade"}
            assert [m.exchange for m in await _entries(bus, "md.OP") if type(m) is BookSnapshot][:1] == ["bybit"]

            key = bus.keys.latest_book("binance", "BTC/USDT")
            latest = models.decode(await bus.redis.get(key))
            assert isinstance(latest, BookSnapshot)
            assert latest.seq == [m for m in books if m.exchange == "binance"][-1].seq
            assert 0 < await bus.redis.pttl(key) <= 60_000

            raw = await bus.redis.hget(bus.keys.instruments("binance"), "BTC/USDT")
            instrument = msgspec.json.decode(raw, type=Instrument)
            assert (instrument.native, instrument.tick_size, instrument.lot_size) == (
                "BTCUSDT", Decimal("0.01"), Decimal("0.00001"))
            upbit = msgspec.json.decode(await bus.redis.hget(bus.keys.instruments("upbit"), "WAVES/KRW"),
                                        type=Instrument)
            assert upbit.tick_table and upbit.taker_fee == Decimal("0.0005")

            fx = await _entries(bus, "fx")
            assert {(m.pair, m.source) for m in fx} >= {("WAVES/KRW", "upbit"), ("USD/KRW", "reference")}
            latest_fx = models.decode(await bus.redis.get(bus.keys.fx_latest("USD/KRW")))
            assert isinstance(latest_fx, models.FxRate) and latest_fx.rate == 1380.0
            alerts = await _entries(bus, "alerts")
            assert [a.kind for a in alerts][:1] == ["fx_divergence"]
        finally:
            out = _stop(proc)
            for sim in sims.values():
                await sim.stop()
        assert proc.returncode == 0, out[-3000:]

    # Every book snapshot and trade published is in ClickHouse (the service wrote them to chDB).
    published_books = published_trades = 0
    for stream in ("md.BTC", "md.WAVES", "md.LAMB", "md.OP", "md.KCS"):
        entries = await _entries(bus, stream)
        published_books += sum(1 for m in entries if type(m) is BookSnapshot)
        published_trades += sum(1 for m in entries if type(m) is models.Trade)
    await bus.close()
    with clickhouse_server(chdb_dir) as url:
        from shared import clickhouse

        client = clickhouse.connect(url)
        assert int(client.command("SELECT count() FROM orderbook_snapshots")) == published_books
        assert int(client.command("SELECT count() FROM tick_trades")) == published_trades
        client.close()


async def test_without_any_exchange_reachable_the_service_runs_healthy_with_stale_books(
    service_env: dict[str, str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    env = dict(service_env)
    env.update({"ARB_CLICKHOUSE__ENABLED": "false", "ARB_COLLECTOR__RECONNECT_MAX_MS": "500"})
    for name in ("binance", "upbit", "okx", "bybit"):  # nothing listens on these ports
        env[f"ARB_EXCHANGES__{name.upper()}__WS_URL"] = "ws://127.0.0.1:9"
        env[f"ARB_EXCHANGES__{name.upper()}__REST_URL"] = "http://127.0.0.1:9"
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
    proc = _start(env)
    try:
        await asyncio.sleep(3)
        health = await _health(bus, proc)
        assert proc.poll() is None
        assert health["_http_status"] == 200 and health["status"] == "ok"
        assert health["books_stale"] == len(health["books"]) == 9  # the default symbols of four exchanges
        assert all(f["state"] == "loading instruments" and f["last_error"] for f in health["feeds"].values())
    finally:
        out = _stop(proc)
        await bus.close()
    assert proc.returncode == 0, out[-3000:]


async def test_the_service_runs_kucoin_gate_bitget_and_bithumb_from_configuration(
    service_env: dict[str, str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """The four newer exchanges enabled by configuration alone (KuCoin with a key from the
    environment, Bithumb on its legacy feed, Gate on its V2 channel): books on the bus, latest
    keys, instruments, /health, and every book and trade in ClickHouse."""
    sims: dict[str, Simulator] = {
        "kucoin": simulator("kucoin", paths([*CAPTURES["kucoin"][0], METADATA["kucoin"]])),
        "gateio": simulator("gateio", paths([*CAPTURES["gateio"][0], METADATA["gateio"]])),
        "bitget": simulator("bitget", paths([*CAPTURES["bitget"][0], METADATA["bitget"]])),
        "bithumb": simulator("bithumb", paths([*CAPTURES["bithumb"][0], METADATA["bithumb"]])),
    }
    sims["kucoin"].venue.api_secret = KUCOIN_KEY.secret  # type: ignore[attr-defined]
    for sim in sims.values():
        await sim.start()
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
    chdb_dir = tmp_path / "clickhouse"
    env = dict(service_env)
    env.update({
        "CLICKHOUSE_URL": f"chdb://{chdb_dir}",
        "ARB_CLICKHOUSE__SPILL_DIR": str(tmp_path / "spill"),
        "ARB_CLICKHOUSE__FLUSH_INTERVAL_MS": "200",
        "ARB_COLLECTOR__STALE_AFTER_MS": "600000",  # the recordings have quiet books
        "KUCOIN_API_KEY": KUCOIN_KEY.key, "KUCOIN_API_SECRET": KUCOIN_KEY.secret,
        "KUCOIN_API_PASSPHRASE": KUCOIN_KEY.passphrase,
        "ARB_EXCHANGES__KUCOIN__SYMBOLS": '["BSV/USDT", "SNX/BTC"]',
        "ARB_EXCHANGES__GATEIO__SYMBOLS": '["OMG/USDT", "NEO/BTC"]',
        "ARB_EXCHANGES__GATEIO__BOOK_CHANNEL": "spot.obu",
        "ARB_EXCHANGES__BITGET__SYMBOLS": '["EOS/USDT", "AVAX/USDT"]',
        "ARB_EXCHANGES__BITHUMB__SYMBOLS": '["CHZ/KRW", "ETH/BTC"]',
        "ARB_EXCHANGES__BITHUMB__BOOK_CHANNEL": "orderbookdepth",
    })
    for name in ("binance", "upbit", "okx", "bybit"):
        env[f"ARB_EXCHANGES__{name.upper()}__ENABLED"] = "false"
    for name, sim in sims.items():
        env[f"ARB_EXCHANGES__{name.upper()}__ENABLED"] = "true"
        env[f"ARB_EXCHANGES__{name.upper()}__WS_URL"] = sim.ws_url
        env[f"ARB_EXCHANGES__{name.upper()}__REST_URL"] = sim.rest_url
    proc = _start(env)
    try:
        await asyncio.wait_for(asyncio.gather(*(s.finished.wait() for s in sims.values())), timeout=90)
        await asyncio.sleep(1.5)  # the last frames through the service, one ClickHouse flush
        health = await _health(bus, proc)
        assert health["_http_status"] == 200 and health["status"] == "ok"
        assert {n: f["state"] for n, f in health["feeds"].items()} == dict.fromkeys(sims, "connected")
        books = health["books"]
        assert {k: b["status"] for k, b in books.items() if not k.startswith("bithumb")} == {
            k: "synced" for k in ("kucoin:BSV/USDT", "kucoin:SNX/BTC", "gateio:OMG/USDT", "gateio:NEO/BTC",
                                  "bitget:EOS/USDT", "bitget:AVAX/USDT")}
        assert {(books[k]["status"], books[k]["reason"]) for k in ("bithumb:CHZ/KRW", "bithumb:ETH/BTC")} == {
            ("stale", "untrusted")}
        assert all(p.startswith("/api/v3/market/orderbook/level2?symbol=") for p in sims["kucoin"].rest_requests
                   if "orderbook" in p)  # the keyed full book, signatures accepted
        assert not [p for p in sims["gateio"].rest_requests if "order_book" in p]  # V2: no REST snapshots

        latest = models.decode(await bus.redis.get(bus.keys.latest_book("kucoin", "BSV/USDT")))
        assert isinstance(latest, BookSnapshot) and latest.status == "synced"
        legacy = models.decode(await bus.redis.get(bus.keys.latest_book("bithumb", "CHZ/KRW")))
        assert isinstance(legacy, BookSnapshot) and legacy.status == "stale"
        eos = msgspec.json.decode(await bus.redis.hget(bus.keys.instruments("bitget"), "EOS/USDT"), type=Instrument)
        assert (eos.native, eos.tick_size, eos.taker_fee) == ("EOSUSDT", Decimal("0.0001"), Decimal("0.002"))
        omg = msgspec.json.decode(await bus.redis.hget(bus.keys.instruments("gateio"), "OMG/USDT"), type=Instrument)
        assert (omg.native, omg.tick_size, omg.lot_size) == ("OMG_USDT", Decimal("0.001"), Decimal("0.001"))
        assert {m.exchange for m in await _entries(bus, "md.EOS") if type(m) is BookSnapshot} == {"bitget"}
    finally:
        out = _stop(proc)
        for sim in sims.values():
            await sim.stop()
    assert proc.returncode == 0, out[-3000:]

    published_books = published_trades = 0
    for stream in ("md.BSV", "md.SNX", "md.OMG", "md.NEO", "md.EOS", "md.AVAX", "md.CHZ", "md.ETH"):
        entries = await _entries(bus, stream)
        published_books += sum(1 for m in entries if type(m) is BookSnapshot)
        published_trades += sum(1 for m in entries if type(m) is models.Trade)
    await bus.close()
    assert published_books > 300
    with clickhouse_server(chdb_dir) as url:
        from shared import clickhouse

        client = clickhouse.connect(url)
        assert int(client.command("SELECT count() FROM orderbook_snapshots")) == published_books
        assert int(client.command("SELECT count() FROM tick_trades")) == published_trades
        client.close()
