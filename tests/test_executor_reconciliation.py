"""Over a long paper run on recorded books, every arbitrage's realised PnL in ``trades`` equals
proceeds minus costs minus fees summed from ``fills`` in PostgreSQL, exactly, and paper
balances equal the start balances plus what the fills moved."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_EVEN, Decimal

import psycopg
import pytest
from executor_support import BINANCE_BOOKS, UPBIT_BOOKS, put_market, recorded_books, spatial_intent

from services.executor.execution import IntentHandler
from services.executor.fills import FillSimulator
from services.executor.ledger import Database
from services.executor.markets import MarketData
from services.executor.venues.paper import PaperVenue
from shared.config import load_config
from shared.ledger import seed_balances
from shared.runtime import Bus

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")
START = {"binance": {"USDT": Decimal(2_000_000), "BTC": Decimal(5)},
         "upbit": {"KRW": Decimal(3_000_000_000), "BTC": Decimal(5)}}
INTENTS = 300

# Per fill, in its market's quote currency: + sell notional, - buy notional, - fees (a fee
# charged in the base asset valued at the fill's price). Written here independently of the code.
CASH_BY_CURRENCY = """
WITH f AS (SELECT arb_id, split_part(symbol, '/', 1) AS base, split_part(symbol, '/', 2) AS quote, side, price,
                  quantity, fee, fee_asset FROM fills)
SELECT arb_id, currency, sum(amount) FROM (
    SELECT arb_id, quote AS currency,
           CASE WHEN side = 'sell' THEN price * quantity ELSE -price * quantity END AS amount FROM f
    UNION ALL
    SELECT arb_id, CASE WHEN fee_asset = base THEN quote ELSE fee_asset END,
           -CASE WHEN fee_asset = base THEN fee * price ELSE fee END FROM f
) cash GROUP BY arb_id, currency
"""


@pytest.fixture
async def handler(bus: Bus, pg_url: str, namespace: str) -> AsyncIterator[IntentHandler]:
    cfg = load_config(environ={"ARB_SESSION": namespace},
                      overrides={"executor": {"order_latency_ms": 0, "leg_risk_policy": "hedge",
                                              "leg_risk_fallback": "unwind", "max_slippage_bps": 30}})

    async def start_balances(conn: psycopg.AsyncConnection) -> None:
        await seed_balances(conn, namespace, "paper", START)

    db = Database(pg_url, on_connect=start_balances)
    market = MarketData(bus, cfg)
    yield IntentHandler(cfg, db=db, market=market, paper=PaperVenue(market, FillSimulator()))
    await db.close()


async def test_long_paper_run_reconciles_exactly_with_fills_and_balances(handler, bus, pg_url) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20250824)
    statuses: dict[str, int] = {}
    for i in range(INTENTS):
        # The recorded books in turn, and an FX rate that moves: each trade must carry its own.
        await put_market(bus, binance=BINANCE[i % len(BINANCE)], upbit=UPBIT[i % len(UPBIT)],
                         usdt_krw=1380 + rng.randint(-300, 300) / 100, instruments=i == 0)
        ask = Decimal(repr(BINANCE[i % len(BINANCE)].asks[0][0]))
        bid = Decimal(repr(UPBIT[i % len(UPBIT)].bids[0][0]))
        qty = Decimal(rng.randint(10, 5000)) / Decimal(100_000)
        # Limits that sometimes cut a leg short (then the policy hedges or unwinds it).
        buy_limit = ask + Decimal(rng.choice([0, 0, 1, 5, 50]))
        sell_limit = bid - Decimal(rng.choice([0, 1000, 5000, 50000])) + Decimal(rng.choice([0, 0, 0, 2000]))
        intent = spatial_intent(quantity=str(qty), buy_price=str(buy_limit), sell_price=str(sell_limit))
        out = await handler.handle(intent)
        assert out.execution is not None
        statuses[out.execution.status] = statuses.get(out.execution.status, 0) + 1
    assert statuses.get("completed", 0) > INTENTS / 3
    assert sum(statuses.get(s, 0) for s in ("hedged", "unwound", "partial")) > 0, statuses

    with psycopg.connect(pg_url) as conn:
        cash: dict[str, dict[str, Decimal]] = {}
        for arb_id, currency, amount in conn.execute(CASH_BY_CURRENCY).fetchall():
            cash.setdefault(arb_id, {})[currency] = amount
        trades = conn.execute("SELECT arb_id, realised_pnl, pnl_currency, pnl_by_currency, fx_rates FROM trades "
                              "WHERE status <> 'expired'").fetchall()
        assert len(trades) == INTENTS
        for arb_id, realised, currency, by_currency, fx in trades:
            assert {c: Decimal(v) for c, v in by_currency.items()} == cash.get(arb_id, {}), arb_id
            expected = Decimal(0)
            for c, amount in cash.get(arb_id, {}).items():
                if c == currency:
                    expected += amount
                else:  # the documented rule: amount / rate(USDT/KRW), half-even at 12 decimals
                    rate = Decimal(fx[f"{currency}/{c}"])
                    expected += (amount / rate).quantize(Decimal("1e-12"), rounding=ROUND_HALF_EVEN)
            assert realised == expected, arb_id

        # Balances: start + what every fill moved, each exchange charging its own fee asset.
        moved = dict(((ex, asset), amount) for ex, asset, amount in conn.execute("""
            SELECT exchange, asset, sum(amount) FROM (
                SELECT exchange, split_part(symbol, '/', 1) AS asset,
                       CASE WHEN side = 'buy' THEN quantity ELSE -quantity END AS amount FROM fills
                UNION ALL
                SELECT exchange, split_part(symbol, '/', 2),
                       CASE WHEN side = 'buy' THEN -price * quantity ELSE price * quantity END FROM fills
                UNION ALL
                SELECT exchange, fee_asset, -fee FROM fills) m GROUP BY exchange, asset""").fetchall())
        balances = dict(((ex, asset), free) for ex, asset, free in conn.execute(
            "SELECT exchange, asset, free FROM balances WHERE mode = 'paper'").fetchall())
    for (exchange, asset), start in ((k, v) for ex, assets in START.items() for k, v in
                                     (((ex, a), amt) for a, amt in assets.items())):
        assert balances[(exchange, asset)] == start + moved.get((exchange, asset), Decimal(0)), (exchange, asset)
    print(statuses)
