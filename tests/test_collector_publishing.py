"""Publishing to the bus (real Redis), FX rates and their divergence alert, REST budgets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from services.collector.fx import USD_KRW, FxDesk, ReferenceSource, dig
from services.collector.publisher import Publisher
from services.collector.rest import RestClient, RestError, WeightBudget
from services.collector.venue import RestLimit, RestRequest
from shared import models
from shared.models import Alert, BookSnapshot, BookStatus, FxRate, Trade
from shared.runtime import FIELD, Bus, Producer


def _book(symbol: str = "BTC/USDT", seq: int = 1, bid: float = 100.0, ask: float = 100.5,
          exchange: str = "binance") -> BookSnapshot:
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=seq, bids=[(bid, 1.0)], asks=[(ask, 2.0)],
                        ts_exchange_ns=time.time_ns(), ts_recv_ns=time.time_ns())


class Ticks:
    def __init__(self) -> None:
        self.books: list[BookSnapshot] = []
        self.trades: list[Trade] = []

    def add_book(self, snap: BookSnapshot) -> None:
        self.books.append(snap)

    def add_trade(self, trade: Trade) -> None:
        self.trades.append(trade)


async def _stream(bus: Bus, name: str) -> list[Any]:
    return [models.decode(f[FIELD]) for _, f in await bus.redis.xrange(bus.stream(name))]


async def test_books_go_to_md_base_with_their_latest_copy_set_in_the_same_round_trip(bus: Bus) -> None:
    producer = Producer(bus)
    ticks = Ticks()
    publisher = Publisher(producer, bus.keys, book_ttl_ms=5_000, ticks=ticks)
    trade = Trade(exchange="binance", symbol="BTC/USDT", trade_id="7", price=100.2, size=0.1, side="buy",
                  ts_exchange_ns=1, ts_recv_ns=2)
    publisher([_book(seq=1), _book(seq=2, bid=100.1), trade, _book("ETH/USDT", seq=9)])
    await producer.flush()
    btc = await _stream(bus, "md.BTC")
    assert [(type(m).__name__, getattr(m, "seq", None)) for m in btc] == [
        ("BookSnapshot", 1), ("BookSnapshot", 2), ("Trade", None)]
    assert all(m.ts_pub_ns >= m.ts_recv_ns for m in btc)
    assert [m.seq for m in await _stream(bus, "md.ETH")] == [9]
    key = bus.keys.latest_book("binance", "BTC/USDT")
    latest = models.decode(await bus.redis.get(key))
    assert isinstance(latest, BookSnapshot) and latest.seq == 2 and latest.bids == [(100.1, 1.0)]
    assert 0 < await bus.redis.pttl(key) <= 5_000
    assert [b.seq for b in ticks.books] == [1, 2, 9] and ticks.trades == [trade]


async def test_a_book_turning_stale_overwrites_its_latest_copy_as_stale(bus: Bus) -> None:
    producer = Producer(bus)
    publisher = Publisher(producer, bus.keys)
    publisher([_book(seq=5)])
    publisher([BookStatus(exchange="binance", symbol="BTC/USDT", status="stale", reason="gap", seq=5, ts_ns=1)])
    await producer.flush()
    latest = models.decode(await bus.redis.get(bus.keys.latest_book("binance", "BTC/USDT")))
    assert isinstance(latest, BookSnapshot) and (latest.status, latest.seq) == ("stale", 5)
    assert [type(m).__name__ for m in await _stream(bus, "md.BTC")] == ["BookSnapshot", "BookStatus"]


async def test_fx_rates_go_to_the_fx_stream_and_their_latest_key(bus: Bus) -> None:
    producer = Producer(bus)
    publisher = Publisher(producer, bus.keys)
    desk = FxDesk()
    now = time.time_ns()
    usdt = desk.on_outputs([_book("USDT/KRW", bid=1379.0, ask=1381.0, exchange="upbit")], now)
    assert usdt == [FxRate(pair="USDT/KRW", rate=1380.0, source="upbit", ts_source_ns=usdt[0].ts_source_ns,  # type: ignore[union-attr]
                           bid=1379.0, ask=1381.0)]
    publisher(usdt)
    await producer.flush()
    assert [m.rate for m in await _stream(bus, "fx")] == [1380.0]
    latest = models.decode(await bus.redis.get(bus.keys.fx_latest("USDT/KRW")))
    assert isinstance(latest, FxRate) and latest.ts_pub_ns > 0


def test_fx_follows_only_the_source_book_and_only_when_its_touch_moves() -> None:
    desk = FxDesk()
    now = time.time_ns()
    assert desk.on_outputs([_book("BTC/KRW", exchange="upbit"), _book("USDT/KRW", exchange="bithumb")], now) == []
    first = desk.on_outputs([_book("USDT/KRW", bid=1379.0, ask=1381.0, exchange="upbit")], now)
    same = desk.on_outputs([_book("USDT/KRW", seq=2, bid=1379.0, ask=1381.0, exchange="upbit")], now)
    moved = desk.on_outputs([_book("USDT/KRW", seq=3, bid=1380.0, ask=1381.0, exchange="upbit")], now)
    assert len(first) == 1 and same == [] and [m.rate for m in moved] == [1380.5]  # type: ignore[union-attr]


def test_two_fx_sources_that_disagree_raise_one_alert_per_excursion() -> None:
    desk = FxDesk(max_divergence=0.03, realert_ns=60_000_000_000)
    now = time.time_ns()
    alerts = REGISTRY.get_sample_value("arb_collector_fx_divergence_alerts_total") or 0.0
    desk.on_outputs([_book("USDT/KRW", bid=1400.0, ask=1402.0, exchange="upbit")], now)
    out = desk.on_reference(1380.0, "reference", now, now)
    assert [type(m).__name__ for m in out] == ["FxRate"]  # 1.5 %: within the bound
    out = desk.on_reference(1300.0, "reference", now, now + 1)
    assert [type(m).__name__ for m in out] == ["FxRate", "Alert"]
    alert = out[1]
    assert isinstance(alert, Alert) and alert.kind == "fx_divergence" and float(alert.labels["divergence"]) > 0.07
    assert REGISTRY.get_sample_value("arb_collector_fx_divergence_ratio",
                                     {"pair_a": "USDT/KRW", "pair_b": USD_KRW}) == pytest.approx(1401 / 1300 - 1)
    assert [type(m).__name__ for m in desk.on_reference(1301.0, "reference", now, now + 2)] == ["FxRate"]
    desk.on_reference(1390.0, "reference", now, now + 3)  # back within the bound
    assert [type(m).__name__ for m in desk.on_reference(1300.0, "reference", now, now + 4)] == ["FxRate", "Alert"]
    assert (REGISTRY.get_sample_value("arb_collector_fx_divergence_alerts_total") or 0.0) - alerts == 2
    stale = FxDesk(max_age_ns=1_000)
    stale.on_outputs([_book("USDT/KRW", bid=1400.0, ask=1402.0, exchange="upbit")], now)
    assert [type(m).__name__ for m in stale.on_reference(1000.0, "reference", now, now + 10_000)] == ["FxRate"]


async def test_the_reference_rate_is_read_from_its_http_source() -> None:
    async def quote(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"basePrice": 1385.5, "currencyCode": "USD"}]})

    app = web.Application()
    app.router.add_get("/fx", quote)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            assert await ReferenceSource(f"http://127.0.0.1:{port}/fx", "data.0.basePrice").fetch(session) == 1385.5
    finally:
        await runner.cleanup()
    with pytest.raises(ValueError):
        dig({"rate": "-1"}, "rate")
    with pytest.raises(KeyError):
        dig({"rates": {}}, "rates.KRW")


def test_the_rest_budget_spends_weight_and_refills_over_time() -> None:
    budget = WeightBudget(RestLimit(weight=100, per_s=10.0), now=0.0)  # 10 weight/s
    assert budget.delay(60, 0.0) == 0.0
    assert budget.delay(50, 0.0) == pytest.approx(1.0)  # 40 left, 10 short
    assert budget.delay(50, 1.0) == 0.0
    budget.pause(30.0, 1.0)  # the exchange said Retry-After: 30
    assert budget.delay(1, 2.0) == pytest.approx(29.0)
    assert budget.delay(500, 40.0) == 0.0  # larger than the bucket: waits for a full one, then goes


async def test_a_429_pauses_every_request_to_that_exchange() -> None:
    calls = 0

    async def limited(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"code": -1003}, status=429, headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_get("/api/v3/depth", limited)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    clock = [100.0]
    client = RestClient("binance", f"http://127.0.0.1:{port}", RestLimit(1000, 60.0), clock=lambda: clock[0])
    try:
        with pytest.raises(RestError) as err:
            await client.get(RestRequest("/api/v3/depth", {"symbol": "BTCUSDT"}, weight=5))
        assert err.value.status == 429
        assert client.budget.delay(1, clock[0]) == pytest.approx(7.0)
        request = asyncio.create_task(client.get(RestRequest("/api/v3/depth", weight=1)))
        await asyncio.sleep(0.05)
        assert not request.done() and calls == 1  # held back by the pause, not sent
        request.cancel()
    finally:
        await client.close()
        await runner.cleanup()
