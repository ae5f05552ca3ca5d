"""Route edges for ClickHouse ``spread_history``: what the spatial core reports for every route,
at most one sample per route per interval, and the collector storing them where the
market-data dashboard's "Net edge history" panel reads them."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from services.detector.edges import EdgeHistory
from services.detector.spatial import RouteEdge, SpatialDetector
from shared import clickhouse
from shared.models import FxRate, SpreadSample, decoder_for, encode
from shared.runtime import FIELD, Bus
from shared.streams import FX, SPREADS, Group, KeySpace, md
from tests.test_collector_clickhouse import clickhouse_server
from tests.test_collector_service import _health, _start, _stop
from tests.test_detector_service import book as md_book
from tests.test_detector_service import config, publish, running, until
from tests.test_detector_spatial import MS, NOW, book, detector, fx

ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000


def _edges(det: SpatialDetector, now: int = NOW) -> dict[tuple[str, str], RouteEdge]:
    return {(e.buy_exchange, e.sell_exchange): e for e in det.route_edges("BTC", now)}


def test_every_route_reports_the_edge_of_its_best_levels_whether_or_not_it_pays() -> None:
    det = detector()
    det.on_book(book("a", [(99.0, 2.0)], [(100.0, 1.0)]), NOW)
    det.on_book(book("b", [(100.5, 3.0)], [(101.5, 0.5)]), NOW)
    edges = _edges(det)
    assert set(edges) == {("a", "b"), ("b", "a")}
    ab, ba = edges[("a", "b")], edges[("b", "a")]
    assert ab.gross_edge_bps == pytest.approx(50.0)
    assert ab.net_edge_bps == pytest.approx((100.5 * 0.999 / 100.0 - 1.001) * 10_000)
    assert ab.notional == pytest.approx(100.0) and ab.fx_rate == 1.0  # 1 unit at the best ask, no FX
    assert ba.gross_edge_bps == pytest.approx((99.0 / 101.5 - 1) * 10_000) and ba.net_edge_bps < 0
    assert ba.notional == pytest.approx(0.5 * 101.5)


def test_a_krw_route_is_valued_at_the_fx_side_that_makes_it_worse_and_stale_books_have_no_route() -> None:
    det = detector()
    det.on_fx(fx(1380.0, bid=1379.5, ask=1380.5), NOW)
    det.on_book(book("a", [(99.0, 1.0)], [(100.0, 1.0)]), NOW)
    det.on_book(book("upbit", [(139_000.0, 1.0)], [(139_100.0, 1.0)], symbol="BTC/KRW"), NOW)
    det.on_book(book("b", [(100.5, 1.0)], [(101.0, 1.0)], age_ms=5_000), NOW)  # older than max_book_age
    edges = _edges(det)
    assert set(edges) == {("a", "upbit"), ("upbit", "a")}
    # KRW received buys the fewest USDT (at the ask); KRW paid costs the most (at the bid).
    assert edges[("a", "upbit")].gross_edge_bps == pytest.approx((139_000.0 / 1380.5 / 100.0 - 1) * 10_000)
    assert edges[("a", "upbit")].net_edge_bps == pytest.approx(
        (139_000.0 / 1380.5 * 0.9995 / 100.0 - 1.001) * 10_000)
    assert edges[("upbit", "a")].gross_edge_bps == pytest.approx((99.0 / (139_100.0 / 1379.5) - 1) * 10_000)
    assert edges[("a", "upbit")].fx_rate == edges[("upbit", "a")].fx_rate == 1380.0


def _edge(buy: str, sell: str, net: float) -> RouteEdge:
    return RouteEdge(asset="BTC", buy_exchange=buy, buy_symbol="BTC/USDT", sell_exchange=sell,
                     sell_symbol="BTC/KRW", gross_edge_bps=net + 15.0, net_edge_bps=net, fx_rate=1380.0,
                     notional=500.0)


def test_each_route_leaves_once_per_interval_with_its_best_edge_of_that_interval() -> None:
    history = EdgeHistory("spatial", interval_ns=S)
    t0 = 1_700_000_000 * S
    assert history.observe([_edge("a", "b", -3.0), _edge("b", "a", -20.0)], t0) == []
    assert history.observe([_edge("a", "b", 4.0), _edge("b", "a", -25.0)], t0 + 300 * MS) == []
    assert history.observe([_edge("a", "b", 1.0)], t0 + 900 * MS) == []
    out = history.observe([_edge("a", "b", -7.0)], t0 + S + 100 * MS)  # the next interval began
    assert [(s.buy_exchange, s.net_edge_bps, s.ts_ns) for s in out] == [("b", -20.0, t0), ("a", 4.0, t0 + 300 * MS)]
    assert all(isinstance(s, SpreadSample) and s.strategy == "spatial" and s.fx_rate == 1380.0 for s in out)
    assert history.due(t0 + S + 999 * MS) == []  # its interval is not over yet
    [last] = history.due(t0 + 2 * S)
    assert (last.net_edge_bps, last.gross_edge_bps, last.ts_ns) == (-7.0, 8.0, t0 + S + 100 * MS)
    assert history.due(t0 + 10 * S) == []


async def test_the_detector_publishes_each_evaluated_route_at_most_once_per_interval(
        service_env: dict[str, str]) -> None:
    cfg = config(service_env, spread_history_ms=200)
    bus = Bus.from_config(cfg)
    decode = decoder_for(SpreadSample).decode

    async def both_routes() -> list[SpreadSample] | None:
        entries: Any = await bus.redis.xrange(bus.stream(SPREADS))
        out = [decode(fields[FIELD]) for _, fields in entries]
        return out if len({s.buy_exchange for s in out}) == 2 else None

    async with running(cfg):
        rate = FxRate(pair="USDT/KRW", rate=1380.0, source="upbit", ts_source_ns=time.time_ns())
        await publish(bus, FX, encode(rate))
        await asyncio.sleep(0.3)
        for i in range(10):  # ten updates in about half a second
            await publish(bus, md("BTC"), encode(md_book("binance", "BTC/USDT", 99_990.0, 100_000.0 + i, seq=i + 1)),
                          encode(md_book("upbit", "BTC/KRW", 138_000_000.0, 138_100_000.0, seq=i + 1)))
            await asyncio.sleep(0.05)
        out = await until(both_routes, what="both routes' samples")
    await bus.close()
    routes = {(s.buy_exchange, s.sell_exchange) for s in out}
    assert routes == {("binance", "upbit"), ("upbit", "binance")}
    for route in routes:
        slots = [s.ts_ns // (200 * MS) for s in out if (s.buy_exchange, s.sell_exchange) == route]
        assert len(slots) == len(set(slots)) and len(slots) < 10  # one per interval, not one per update
    # The best of each interval on binance -> upbit is its cheapest ask (the first of that interval).
    first = next(s for s in out if s.buy_exchange == "binance")
    assert first.net_edge_bps == pytest.approx((138_000_000.0 / 1380.0 * 0.9995 / 100_000.0 - 1.001) * 10_000,
                                               abs=0.1)
    assert first.strategy == "spatial" and first.fx_rate == 1380.0


def _panel_sql() -> str:
    board = json.loads((ROOT / "deploy/grafana/dashboards/market-data.json").read_text())
    [sql] = [t["rawSql"] for p in board["panels"] for t in p.get("targets", [])
             if "spread_history" in t.get("rawSql", "")]
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 HOUR", sql)
    return re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)


async def test_the_collector_stores_route_edges_and_the_dashboard_panel_shows_each_route_best(
    service_env: dict[str, str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
    minute = time.time_ns() // (60 * S) * 60 * S
    symbol = {"binance": "BTC/USDT", "upbit": "BTC/KRW"}
    samples = [SpreadSample(asset="BTC", strategy="spatial", buy_exchange=buy, buy_symbol=symbol[buy],
                            sell_exchange=sell, sell_symbol=symbol[sell], ts_ns=minute + i * S,
                            gross_edge_bps=net + 15.0, net_edge_bps=net, fx_rate=1380.0, notional=400.0)
               for i, (buy, sell, net) in enumerate([("binance", "upbit", -4.0), ("upbit", "binance", -31.0),
                                                     ("binance", "upbit", 6.5), ("upbit", "binance", -28.0)])]
    for s in samples[:2]:  # published before the collector runs: its group reads the stream from the start
        await bus.redis.xadd(bus.stream(SPREADS), {FIELD: encode(s)})
    chdb_dir = tmp_path / "clickhouse"
    env = dict(service_env)
    env.update({"CLICKHOUSE_URL": f"chdb://{chdb_dir}", "ARB_CLICKHOUSE__SPILL_DIR": str(tmp_path / "spill"),
                "ARB_CLICKHOUSE__FLUSH_INTERVAL_MS": "60000"})  # acknowledging waits for no timer
    for name in ("binance", "upbit", "okx", "bybit"):  # no exchange: only the spreads stream moves
        env[f"ARB_EXCHANGES__{name.upper()}__WS_URL"] = "ws://127.0.0.1:9"
        env[f"ARB_EXCHANGES__{name.upper()}__REST_URL"] = "http://127.0.0.1:9"
    proc = _start(env)
    try:
        await _health(bus, proc)
        for s in samples[2:]:
            await bus.redis.xadd(bus.stream(SPREADS), {FIELD: encode(s)})
        deadline = time.monotonic() + 20
        while (await _health(bus, proc))["clickhouse"]["written"]["spread_history"] < len(samples):
            assert time.monotonic() < deadline, "route edges never written"
            await asyncio.sleep(0.2)
        pending = await bus.redis.xpending(bus.stream(SPREADS), Group.CLICKHOUSE)
        assert pending["pending"] == 0  # acknowledged once in ClickHouse
    finally:
        out = _stop(proc)
        await bus.close()
    assert proc.returncode == 0, out[-3000:]
    with clickhouse_server(chdb_dir) as url:
        client = clickhouse.connect(url)
        stored = client.query("SELECT buy_exchange, net_edge_bps, fx_rate, notional, toUnixTimestamp64Nano(ts) "
                              "FROM spread_history ORDER BY ts").result_rows
        panel = client.query(_panel_sql()).result_rows
        client.close()
    assert [tuple(r) for r in stored] == [(s.buy_exchange, s.net_edge_bps, 1380.0, 400.0, s.ts_ns) for s in samples]
    assert {(route, edge) for _, route, edge in panel} == {("BTC binance -> upbit", 6.5),
                                                           ("BTC upbit -> binance", -28.0)}
