"""Acceptance: spatial arbitrage drains one side; the rebalancer service restores the
thresholds so trading goes on; the ledger conserves value exactly, less transfer fees.

The trades come from ``SpatialDrainDriver``, a test driver standing in for the executor:
each trade buys BTC on Binance and sells it on Upbit, writing orders, fills and balance
moves in one transaction through ``shared.ledger`` and publishing the ``execution`` and
``balance`` messages the executor publishes. The rebalancer runs as the real service
(consumers, planning rounds, paper execution, outbox) against real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import msgspec
import psycopg

from services.rebalancer.service import RebalancerService
from shared.config import Config, load_config
from shared.ledger import InsufficientBalance, adjust_balance, load_balances, seed_balances
from shared.models import Balance, Execution, ExecutionLeg, Transfer, encode
from shared.runtime import FIELD, Bus, Producer
from shared.streams import BALANCES, EXECUTIONS, TRANSFERS
from tests.rebalancer_scenarios import D, fx, kimchi_books

START = {"binance": {"USDT": D("20000"), "BTC": D("1")}, "upbit": {"BTC": D("1"), "KRW": D("20000000")}}
QTY = D("0.05")
BUY_PRICE = D("60010")  # Binance ask
SELL_PRICE = D("85000000")  # Upbit bid: the kimchi premium
FEE = {"binance": D("0.001"), "upbit": D("0.0005")}
TRADES = 30
BOUNDS = {("binance", "USDT"): D(8000), ("binance", "BTC"): D("0.3"), ("upbit", "BTC"): D("0.5"),
          ("upbit", "KRW"): D(5_000_000)}


def drain_config(env: dict[str, str]) -> Config:
    return load_config(environ=env, overrides={
        "exchanges": {
            "binance": {"enabled": True, "symbols": ["BTC/USDT"], "taker_fee": 0.001},
            "upbit": {"enabled": True, "symbols": ["BTC/KRW", "USDT/KRW"], "taker_fee": 0.0005},
            "okx": {"enabled": False}, "bybit": {"enabled": False},
        },
        "rebalancer": {
            "interval_s": 0.2,
            "max_book_age_s": 3600,
            "targets": [
                {"exchange": "binance", "asset": "USDT", "target": 20000, "low": 8000},
                {"exchange": "binance", "asset": "BTC", "target": 1, "low": 0.3},
                {"exchange": "upbit", "asset": "BTC", "target": 1, "low": 0.5},
                {"exchange": "upbit", "asset": "KRW", "target": 20_000_000, "low": 5_000_000, "high": 40_000_000},
            ],
            "networks": [
                {"exchange": "binance", "asset": "BTC", "network": "BTC", "withdraw_fee": "0.0002",
                 "confirm_seconds": 0.4},
                {"exchange": "upbit", "asset": "BTC", "network": "BTC", "withdraw_fee": "0.0005",
                 "confirm_seconds": 0.4},
                {"exchange": "binance", "asset": "USDT", "network": "TRON", "withdraw_fee": "1",
                 "confirm_seconds": 0.3},
                {"exchange": "upbit", "asset": "USDT", "network": "TRON", "withdraw_fee": "1",
                 "confirm_seconds": 0.3},
                {"exchange": "binance", "asset": "USDT", "network": "ETH", "withdraw_fee": "4",
                 "confirm_seconds": 0.2},
                {"exchange": "upbit", "asset": "USDT", "network": "ETH", "withdraw_fee": "5",
                 "confirm_seconds": 0.2},
            ],
        },
    })


class SpatialDrainDriver:
    """Test driver: repeated paper spatial trades through the ledger, like the executor's."""

    def __init__(self, conn: psycopg.AsyncConnection, session: str, producer: Producer) -> None:
        self.conn, self.session, self.producer = conn, session, producer
        self.done = 0

    async def trade(self) -> bool:
        """Buy QTY BTC on Binance, sell it on Upbit; False (nothing written) if a side is short."""
        arb_id = f"arb-{uuid.uuid4().hex[:12]}"
        cost = QTY * BUY_PRICE
        buy_fee, sell_fee = cost * FEE["binance"], QTY * SELL_PRICE * FEE["upbit"]
        legs = [("binance", "BTC/USDT", "buy", BUY_PRICE, buy_fee, "USDT"),
                ("upbit", "BTC/KRW", "sell", SELL_PRICE, sell_fee, "KRW")]
        moves = [("binance", "USDT", -(cost + buy_fee)), ("binance", "BTC", QTY),
                 ("upbit", "BTC", -QTY), ("upbit", "KRW", QTY * SELL_PRICE - sell_fee)]
        now = time.time_ns()
        balances: list[Balance] = []
        try:
            async with self.conn.transaction():
                for i, (ex, symbol, side, price, fee, fee_asset) in enumerate(legs):
                    coid = f"{arb_id}-{i}"
                    await self.conn.execute(
                        """INSERT INTO orders (client_order_id, session, arb_id, exchange, symbol, side, order_type,
                               time_in_force, price, quantity, filled_quantity, average_price, fee, fee_asset,
                               status, mode)
                           VALUES (%s, %s, %s, %s, %s, %s, 'limit', 'IOC', %s, %s, %s, %s, %s, %s, 'FILLED',
                                   'paper')""",
                        (coid, self.session, arb_id, ex, symbol, side, price, QTY, QTY, price, fee, fee_asset))
                    await self.conn.execute(
                        """INSERT INTO fills (exchange, fill_id, session, client_order_id, arb_id, symbol, side, price,
                               quantity, fee, fee_asset, mode, ts)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'paper', now())""",
                        (ex, f"{coid}-f", self.session, coid, arb_id, symbol, side, price, QTY, fee, fee_asset))
                for ex, asset, delta in moves:
                    free, locked = await adjust_balance(self.conn, session=self.session, mode="paper", exchange=ex,
                                                        asset=asset, delta_free=delta)
                    balances.append(Balance(exchange=ex, asset=asset, free=free, locked=locked, ts_ns=now))
        except InsufficientBalance:
            return False
        self.producer.publish_many(BALANCES, balances)
        self.producer.publish(EXECUTIONS, Execution(
            arb_id=arb_id, signal_id=arb_id, strategy="spatial", status="completed", realised_pnl=D(0),
            pnl_currency="USDT", ts_ns=now,
            legs=[ExecutionLeg(client_order_id=f"{arb_id}-{i}", exchange=ex, symbol=sym, side=side,  # type: ignore[arg-type]
                               status="FILLED", quantity=QTY, filled_quantity=QTY, average_price=price, fee=fee,
                               fee_asset=fee_asset) for i, (ex, sym, side, price, fee, fee_asset) in enumerate(legs)]))
        await self.producer.flush()
        self.done += 1
        return True


async def trades_possible_without_rebalancing(conn: psycopg.AsyncConnection, session: str, producer: Producer) -> int:
    driver = SpatialDrainDriver(conn, session, producer)
    while await driver.trade():
        pass
    return driver.done


CONSERVATION_SQL = """
WITH start(asset, amount) AS (SELECT * FROM unnest(%(assets)s::text[], %(amounts)s::numeric[])),
final AS (SELECT asset, SUM(free + locked) AS amount FROM balances WHERE session = %(s)s AND mode = 'paper'
          GROUP BY asset),
trade AS (
    SELECT split_part(symbol, '/', 1) AS asset, CASE side WHEN 'buy' THEN quantity ELSE -quantity END
           - CASE WHEN fee_asset = split_part(symbol, '/', 1) THEN fee ELSE 0 END AS delta
    FROM fills WHERE session = %(s)s
    UNION ALL
    SELECT split_part(symbol, '/', 2), CASE side WHEN 'buy' THEN -price * quantity ELSE price * quantity END
           - CASE WHEN fee_asset = split_part(symbol, '/', 2) THEN fee ELSE 0 END
    FROM fills WHERE session = %(s)s),
step AS (SELECT s.* FROM transfer_steps s JOIN transfers t USING (transfer_id) WHERE t.session = %(s)s),
conversion AS (
    SELECT to_asset AS asset, credited AS delta FROM step WHERE kind = 'conversion' AND state = 'done'
    UNION ALL
    SELECT from_asset, -debited FROM step WHERE kind = 'conversion' AND state = 'done'),
withdrawal_fee AS (
    SELECT from_asset AS asset, SUM(debited - credited) AS paid, SUM(fee_charged) AS charged
    FROM step WHERE kind = 'withdrawal' AND state = 'done' GROUP BY from_asset)
SELECT f.asset, f.amount AS final, s.amount AS start,
       COALESCE((SELECT SUM(delta) FROM trade t WHERE t.asset = f.asset), 0) AS trades,
       COALESCE((SELECT SUM(delta) FROM conversion c WHERE c.asset = f.asset), 0) AS conversions,
       COALESCE(w.paid, 0) AS fees_paid, COALESCE(w.charged, 0) AS fees_charged
FROM final f JOIN start s USING (asset) LEFT JOIN withdrawal_fee w USING (asset)
ORDER BY f.asset
"""


async def test_rebalancer_restores_thresholds_so_spatial_arbitrage_continues_and_conserves_value(
    pg_url: str, service_env: dict[str, str], namespace: str
) -> None:
    cfg = drain_config(service_env)
    bus = Bus.from_config(cfg)
    producer = Producer(bus)
    now = time.time_ns()
    for b in kimchi_books(now):
        await bus.redis.set(bus.keys.latest_book(b.exchange, b.symbol), encode(b))
    await bus.redis.set(bus.keys.fx_latest("USDT/KRW"), encode(fx(now)))

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        # Control: the same start in another session trades only until one side runs dry.
        async with conn.transaction():
            await seed_balances(conn, f"{namespace}-control", "paper", START)
        without = await trades_possible_without_rebalancing(conn, f"{namespace}-control", producer)
        assert 0 < without < TRADES
        await conn.execute("DELETE FROM fills WHERE session = %s", (f"{namespace}-control",))
        await conn.execute("DELETE FROM orders WHERE session = %s", (f"{namespace}-control",))

        async with conn.transaction():
            await seed_balances(conn, namespace, "paper", START)
        service = RebalancerService(cfg)
        running = asyncio.create_task(service.main())
        try:
            driver = SpatialDrainDriver(conn, namespace, producer)
            deadline = time.monotonic() + 60
            while driver.done < TRADES and time.monotonic() < deadline:
                if not await driver.trade():
                    await asyncio.sleep(0.05)  # a side is dry: wait for the rebalancer
            assert driver.done == TRADES, f"trading stopped after {driver.done} trades"
            # Let the last transfers land: nothing open, twice, with two full rounds in between
            # (a round already under way may still plan after the last trade).
            quiet, mark = 0, service.rounds
            while quiet < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                cur = await conn.execute(
                    "SELECT count(*) FROM transfers WHERE session = %s AND state NOT IN "
                    "('completed', 'cancelled', 'failed')", (namespace,))
                row = await cur.fetchone()
                if row is None or row[0] > 0:
                    quiet, mark = 0, service.rounds
                elif service.rounds >= mark + 2:
                    quiet, mark = quiet + 1, service.rounds
        finally:
            service.stop()
            await asyncio.wait_for(running, 30)

        cur = await conn.execute("SELECT state, count(*) FROM transfers WHERE session = %s GROUP BY state",
                                 (namespace,))
        states = dict(await cur.fetchall())
        assert states.get("completed", 0) >= 2 and set(states) == {"completed"}, states
        cur = await conn.execute(
            "SELECT DISTINCT s.from_exchange || ':' || s.from_asset || '>' || s.to_exchange || ':' || s.to_asset "
            "|| ':' || s.network FROM transfer_steps s JOIN transfers t USING (transfer_id) WHERE t.session = %s",
            (namespace,))
        routes = {r[0] for r in await cur.fetchall()}
        assert "binance:BTC>upbit:BTC:BTC" in routes  # the coin goes back
        assert {"upbit:KRW>upbit:USDT:USDT/KRW", "upbit:USDT>binance:USDT:TRON"} <= routes  # the won comes home

        final = await load_balances(conn, namespace, "paper")
        for node, low in BOUNDS.items():
            assert final[node][0] >= low, f"{node} below its low threshold: {final[node][0]}"

        totals: dict[str, Decimal] = {}
        for asset, amount in ((a, v) for held in START.values() for a, v in held.items()):
            totals[asset] = totals.get(asset, D(0)) + amount
        cur = await conn.execute(CONSERVATION_SQL, {"s": namespace, "assets": list(totals),
                                                    "amounts": list(totals.values())})
        rows = await cur.fetchall()
        assert {r[0] for r in rows} == {"BTC", "USDT", "KRW"}
        fees_total = D(0)
        for asset, final_amount, start, trades, conversions, fees_paid, fees_charged in rows:
            # Exactly: what the ledger holds = start + trades + conversions - withdrawal fees.
            assert final_amount == start + trades + conversions - fees_paid, asset
            assert fees_paid == fees_charged
            fees_total += fees_paid
        assert fees_total > 0

    # Every balance move was published (trades by the driver, transfer steps by the rebalancer):
    # the newest message per venue and asset is what the ledger holds.
    newest: dict[tuple[str, str], Decimal] = {}
    for _, f in await bus.redis.xrange(bus.stream(BALANCES)):
        b = msgspec.json.decode(f[FIELD], type=Balance)
        newest[(b.exchange, b.asset)] = b.free
    assert {k: v for k, v in newest.items() if k in final} == {k: v[0] for k, v in final.items() if k in newest}
    assert ("upbit", "USDT") in newest  # only transfer steps touch it

    entries = await bus.redis.xrange(bus.stream(TRANSFERS))
    published = [msgspec.json.decode(f[FIELD], type=Transfer) for _, f in entries]
    assert {t.state for t in published} == {"planned", "approved", "sent", "completed"}
    assert sum(t.state == "completed" for t in published) == states["completed"]
    await producer.close()
    await bus.close()
