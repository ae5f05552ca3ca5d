"""`arb bench rebalancer [--json]`: planning time, against exhaustive route enumeration.

A synthetic graph of 8 venues x 5 assets (two networks per venue and asset, three markets
per venue, always the same); one route of 20,000 USDT into one venue for ``max_steps`` 2 to 4,
by the planner's search and by enumerating every route (the baseline, in the same run);
plus one full kimchi planning round (two plans).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from typing import Any

from services.rebalancer.market import ConversionMarket, Marks
from services.rebalancer.networks import TransferNetwork, TransferNetworkTable
from services.rebalancer.planner import (
    ConversionEdge,
    Edge,
    Node,
    RebalancePlanner,
    TransferGraph,
    WithdrawalEdge,
    cheapest_route,
)
from shared.config import load_config
from shared.models import BookSnapshot, FxRate

D = Decimal
MARKS = {"USDT": D(1), "BTC": D(60000), "ETH": D(3000), "SOL": D(150), "KRW": D(1) / 1385}
PAIRS = [("BTC", "USDT"), ("ETH", "USDT"), ("SOL", "USDT"), ("ETH", "BTC"), ("USDT", "KRW"), ("BTC", "KRW")]


def synthetic_graph(venues: int = 8) -> TransferGraph:
    rng = random.Random(7)  # the same graph on every run
    names = [f"v{i}" for i in range(venues)]
    rows = [
        TransferNetwork(exchange=v, asset=a, network=n, label=n, withdraw_fee=D(rng.randint(1, 50)) / MARKS[a] / 10,
                        withdraw_fee_rate=D(0), withdraw_min=D(0), confirm_seconds=rng.randint(60, 3600),
                        withdraw_enabled=True, deposit_enabled=True)
        for v in names for a in MARKS if a != "KRW" for n in ("N1", "N2")
    ]
    table = TransferNetworkTable(rows)
    edges: list[Edge] = [WithdrawalEdge(s, d, None, D("0.00000001")) for a in MARKS for s, d in table.withdrawals(a)]
    for v in names:
        for base, quote in rng.sample(PAIRS, 3):
            mid = MARKS[base] / MARKS[quote]
            depth = D(10**6) / MARKS[base]
            market = ConversionMarket(
                exchange=v, symbol=f"{base}/{quote}", base=base, quote=quote, taker_fee=D("0.001"),
                bids=tuple((mid * (1 - D("0.0005") * (i + 1)), depth) for i in range(5)),
                asks=tuple((mid * (1 + D("0.0005") * (i + 1)), depth) for i in range(5)),
            )
            edges += [ConversionEdge(market, quote, base), ConversionEdge(market, base, quote)]
    return TransferGraph(edges)


def enumerate_routes(graph: TransferGraph, dest: Node, amount: Decimal, caps: dict[Node, Decimal], marks: Marks,
                     rate: Decimal, max_steps: int) -> Decimal | None:
    """The baseline: every simple route, evaluated edge by edge; the least objective."""
    best: Decimal | None = None

    def walk(node: Node, need: Decimal, capital: Decimal, visited: frozenset[Node], assets: frozenset[str],
             depth: int) -> None:
        nonlocal best
        if depth == max_steps:
            return
        for edge in graph.into(node):
            src = edge.source
            if src in visited or (src.asset != node.asset and src.asset in assets):
                continue
            flow = edge.flow_for(need)
            cost = None if flow is None else edge.capital_cost(flow, marks, rate)
            if flow is None or cost is None:
                continue
            mark = marks.get(src.asset)
            if src in caps and mark is not None and flow.amount_in <= caps[src]:
                value = flow.amount_in * mark + (capital + cost)
                best = value if best is None or value < best else best
            walk(src, flow.amount_in, capital + cost, visited | {src}, assets | {src.asset}, depth + 1)

    walk(dest, amount, D(0), frozenset({dest}), frozenset({dest.asset}), 0)
    return best


def _time(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    laps = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        laps.append((time.perf_counter() - start) * 1000)
    laps.sort()
    return {"p50_ms": round(statistics.median(laps), 3), "max_ms": round(laps[-1], 3), "runs": repeat}


def kimchi_round() -> Callable[[], Any]:
    cfg = load_config(environ={}, overrides={"rebalancer": {
        "targets": [
            {"exchange": "binance", "asset": "BTC", "target": 1, "low": 0.5},
            {"exchange": "upbit", "asset": "BTC", "target": 1, "low": 0.5},
            {"exchange": "binance", "asset": "USDT", "target": 60000, "low": 30000},
            {"exchange": "upbit", "asset": "KRW", "target": 50_000_000, "low": 10_000_000},
        ],
        "networks": [
            {"exchange": ex, "asset": a, "network": n, "withdraw_fee": fee, "confirm_seconds": secs}
            for ex in ("binance", "upbit")
            for a, n, fee, secs in (("BTC", "BTC", "0.0002", 1800), ("USDT", "TRON", "1", 120),
                                    ("USDT", "ETH", "4", 300))
        ],
    }})
    books = [("binance", "BTC/USDT", 60000.0, 60010.0, 0.001), ("upbit", "BTC/KRW", 85e6, 85.01e6, 0.0005),
             ("upbit", "USDT/KRW", 1389.0, 1390.0, 0.0005)]
    markets = [
        ConversionMarket.from_book(BookSnapshot(exchange=ex, symbol=sym, seq=1, bids=[(bid, 1e6 / bid)],
                                                asks=[(ask, 1e6 / ask)], ts_exchange_ns=0, ts_recv_ns=0),
                                   D(str(fee)), cfg.rebalancer.amount_steps)
        for ex, sym, bid, ask, fee in books
    ]
    marks = Marks.from_market("USDT", markets, [FxRate(pair="USDT/KRW", rate=1385.0, source="b", ts_source_ns=0)])
    planner = RebalancePlanner(cfg.rebalancer, TransferNetworkTable.from_settings(cfg.rebalancer),
                               require_address=False)
    balances = {Node("binance", "BTC"): D("1.8"), Node("upbit", "BTC"): D("0.2"), Node("binance", "USDT"): D(12000),
                Node("upbit", "KRW"): D(118_000_000)}
    return lambda: planner.plan(balances, {}, markets, marks, 0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb bench rebalancer")
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    graph = synthetic_graph()
    marks = Marks("USDT", MARKS)
    dest = Node("v0", "USDT")
    caps = {Node(f"v{i}", a): D(10**5) / m for i in range(8) for a, m in MARKS.items()}
    del caps[dest]
    rate = D("0.0001")
    result: dict[str, Any] = {"graph": {"venues": 8, "assets": len(MARKS), "edges": len(graph.edges())},
                              "kimchi_round": _time(kimchi_round(), args.repeat * 10), "route": {}}
    for steps in (2, 3, 4):
        route = cheapest_route(graph, dest, D(20000), caps, marks, rate_per_hour=rate, max_steps=steps)
        baseline = enumerate_routes(graph, dest, D(20000), caps, marks, rate, steps)
        result["route"][f"max_steps_{steps}"] = {
            "planner": _time(partial(cheapest_route, graph, dest, D(20000), caps, marks, rate_per_hour=rate,
                                     max_steps=steps), args.repeat),
            "enumeration": _time(partial(enumerate_routes, graph, dest, D(20000), caps, marks, rate, steps),
                                 max(1, args.repeat // 5)),
            "same_cost": route is not None and route.objective == baseline,
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"kimchi round: p50 {result['kimchi_round']['p50_ms']} ms")
        for name, r in result["route"].items():
            print(f"{name}: planner p50 {r['planner']['p50_ms']} ms, enumeration p50 {r['enumeration']['p50_ms']} ms,"
                  f" same cost: {r['same_cost']}")
    return 0
