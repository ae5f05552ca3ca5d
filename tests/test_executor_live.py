"""Live venues against the local exchange simulator: signed REST over real sockets on 127.0.0.1,
real Redis and PostgreSQL. Every leg-failure path must end hedged or unwound (or with its
residual recorded), never with a second order under one client order id."""

from __future__ import annotations

import logging
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from executor_support import BINANCE_BOOKS, UPBIT_BOOKS, put_market, recorded_books, spatial_intent

from services.executor.execution import IntentHandler, Outputs, correction_id
from services.executor.ledger import Database
from services.executor.markets import MarketData
from services.executor.service import build_live_venues
from services.executor.venues.base import Throttled
from shared.config import Secrets, load_config
from shared.models import OrderIntent
from shared.runtime import Bus
from shared.simulator.orders import Fault, OrderSimulatorServer, SimulatedExchange, order_app
from shared.simulator.orders_binance import binance_exchange
from shared.simulator.orders_upbit import upbit_exchange

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")[0]
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")[0]


@dataclass
class Rig:
    handler: IntentHandler
    binance: SimulatedExchange
    upbit: SimulatedExchange
    pg_url: str
    secrets: list[str]

    async def run(self, intent: OrderIntent) -> Outputs:
        return await self.handler.handle(intent)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_url) as conn:
            return conn.execute(sql, args).fetchall()

    def trade(self, arb_id: str) -> tuple[Any, ...]:
        [row] = self.rows("SELECT status, residuals, realised_pnl FROM trades WHERE arb_id = %s", arb_id)
        return row

    def no_duplicates(self) -> None:
        assert self.binance.duplicates == {} and self.upbit.duplicates == {}


def simulated_exchanges() -> tuple[SimulatedExchange, SimulatedExchange, dict[str, str]]:
    binance, upbit = binance_exchange(), upbit_exchange()
    binance.set_book("BTCUSDT", "BTC", "USDT", BINANCE.bids, BINANCE.asks)
    upbit.set_book("KRW-BTC", "BTC", "KRW", UPBIT.bids, UPBIT.asks)
    keys = {"BINANCE_API_KEY": pysecrets.token_hex(32), "BINANCE_API_SECRET": pysecrets.token_hex(32),
            "UPBIT_API_KEY": pysecrets.token_hex(20), "UPBIT_API_SECRET": pysecrets.token_hex(20)}
    binance.add_key(keys["BINANCE_API_KEY"], keys["BINANCE_API_SECRET"])
    upbit.add_key(keys["UPBIT_API_KEY"], keys["UPBIT_API_SECRET"])
    return binance, upbit, keys


def live_config(namespace: str, url: str, keys: dict[str, str], **executor: Any) -> tuple[Any, Secrets]:
    environ = {"ARB_ENV": "staging", "ARB_SESSION": namespace, **keys}
    overrides = {
        "trading": {"mode": "live"},
        "clickhouse": {"url": "http://127.0.0.1:8123"},
        "exchanges": {"okx": {"enabled": False}, "bybit": {"enabled": False},
                      "binance": {"enabled": True, "symbols": ["BTC/USDT"], "taker_fee": 0.001, "rest_url": url},
                      "upbit": {"enabled": True, "symbols": ["BTC/KRW"], "taker_fee": 0.0005, "rest_url": url}},
        "executor": {"request_timeout_ms": 300, "unknown_order_grace_ms": 400, "clock_margin_ms": 50,
                     "fill_poll_interval_ms": 20, "fill_poll_timeout_ms": 2000, **executor},
    }
    return load_config(environ=environ, overrides=overrides), Secrets.load(environ)


@pytest.fixture
async def make_rig(bus: Bus, pg_url: str, namespace: str) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def make(**executor: Any) -> Rig:
        binance, upbit, keys = simulated_exchanges()
        server = OrderSimulatorServer(order_app(binance=binance, upbit=upbit))
        url = await server.start()
        cfg, secrets = live_config(namespace, url, keys, **executor)
        venues = build_live_venues(cfg, secrets, bus)
        db = Database(pg_url)
        handler = IntentHandler(cfg, db=db, market=MarketData(bus, cfg), live=venues)
        await put_market(bus, binance=BINANCE, upbit=UPBIT)

        async def close() -> None:
            for v in venues.values():
                await v.close()
            await db.close()
            await server.stop()

        cleanup.append(close)
        return Rig(handler, binance, upbit, pg_url, list(keys.values()))

    yield make
    for close in cleanup:
        await close()


async def test_both_legs_fill_and_the_ledger_holds_the_exchange_fills(make_rig, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    rig = await make_rig()
    intent = spatial_intent()
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "completed"
    assert out.execution.residuals == []
    buy, sell = rig.binance.orders[f"{intent.arb_id}b"], rig.upbit.orders[f"{intent.arb_id}s"]
    stored = rig.rows("SELECT exchange, fill_id, price, quantity, fee, fee_asset FROM fills WHERE arb_id = %s "
                      "ORDER BY exchange", intent.arb_id)
    assert stored == [("binance", str(t.trade_id), t.price, t.quantity, t.fee, t.fee_asset) for t in buy.trades] + [
        ("upbit", t.uuid, t.price, t.quantity, t.fee, t.fee_asset) for t in sell.trades]
    # Binance charged the buy in BTC, Upbit the sell in KRW.
    assert [s[5] for s in stored] == ["BTC", "KRW"]
    assert {f.fill_id for f in out.fills} == {s[1] for s in stored}
    rig.no_duplicates()
    assert all(s not in caplog.text for s in rig.secrets)


async def test_rejected_leg_is_hedged_on_its_own_venue(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(leg_risk_policy="hedge")
    intent = spatial_intent()
    rig.upbit.inject(Fault("reject", client_order_id=f"{intent.arb_id}s"))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "hedged"
    hedge = rig.upbit.orders[correction_id(f"{intent.arb_id}s", "hedge", 1)]
    assert hedge.side == "sell" and hedge.executed == D("0.01")
    # The hedge's limit is the best bid minus at most 30 bps, on the 1,000 KRW tick.
    assert hedge.price == D("159030000")
    assert rig.trade(intent.arb_id)[:2] == ("hedged", [])
    assert [a.kind for a in out.alerts] == ["broken_leg"]
    rig.no_duplicates()


async def test_rejected_leg_is_unwound_when_configured(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(leg_risk_policy="unwind", leg_risk_fallback="none")
    intent = spatial_intent()
    rig.upbit.inject(Fault("reject", client_order_id=f"{intent.arb_id}s"))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "unwound"
    unwind = rig.binance.orders[correction_id(f"{intent.arb_id}b", "unwind", 1)]
    assert unwind.side == "sell" and unwind.executed == D("0.01")
    roles = {leg.role for leg in out.execution.legs}
    assert roles == {"entry", "unwind"}
    rig.no_duplicates()


async def test_partial_fill_is_hedged_for_the_remainder(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent()
    rig.upbit.inject(Fault("partial_fill", client_order_id=f"{intent.arb_id}s", fill_ratio=D("0.3")))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "hedged"
    assert rig.upbit.orders[f"{intent.arb_id}s"].executed == D("0.003")
    assert rig.upbit.orders[correction_id(f"{intent.arb_id}s", "hedge", 1)].executed == D("0.007")
    events = rig.rows("SELECT status, filled_quantity FROM order_events WHERE client_order_id = %s ORDER BY id",
                      f"{intent.arb_id}s")
    assert events == [("NEW", D(0)), ("PARTIALLY_FILLED", D("0.003")), ("CANCELED", D("0.003"))]
    rig.no_duplicates()


async def test_failed_hedge_falls_back_to_unwind(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(leg_risk_policy="hedge", leg_risk_fallback="unwind")
    intent = spatial_intent()
    rig.upbit.inject(Fault("reject", client_order_id=f"{intent.arb_id}s"))
    rig.upbit.inject(Fault("reject", client_order_id=correction_id(f"{intent.arb_id}s", "hedge", 1)))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "unwound"
    assert rig.binance.orders[correction_id(f"{intent.arb_id}b", "unwind", 2)].executed == D("0.01")
    assert out.execution.residuals == []
    rig.no_duplicates()


async def test_residual_is_recorded_published_and_alerted_when_nothing_can_fix_the_leg(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(leg_risk_policy="hedge", leg_risk_fallback="none")
    intent = spatial_intent()
    rig.upbit.inject(Fault("reject", client_order_id=f"{intent.arb_id}s"))
    rig.upbit.inject(Fault("reject", client_order_id=correction_id(f"{intent.arb_id}s", "hedge", 1)))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "partial"
    [residual] = out.execution.residuals
    assert (residual.exchange, residual.asset, residual.quantity) == ("binance", "BTC", D("0.01"))
    status, residuals, _ = rig.trade(intent.arb_id)
    assert status == "partial" and residuals == [{"exchange": "binance", "asset": "BTC", "quantity": "0.01"}]
    [alert] = out.alerts
    assert alert.kind == "residual_exposure" and alert.severity == "critical"
    rig.no_duplicates()


@pytest.mark.parametrize("kind", ["timeout_after_accept", "disconnect_after_accept", "http_500_after_accept"])
async def test_unknown_state_after_the_exchange_accepted_is_reconciled_not_resent(make_rig, kind) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent()
    rig.binance.inject(Fault(kind, client_order_id=f"{intent.arb_id}b", delay_s=0.6))  # type: ignore[arg-type]
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "completed"
    assert rig.binance.submissions[f"{intent.arb_id}b"] == 1
    assert rig.binance.requests["query"] >= 1
    rig.no_duplicates()


async def test_upbit_timeout_after_accept_is_reconciled_by_identifier(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent()
    rig.upbit.inject(Fault("timeout_after_accept", client_order_id=f"{intent.arb_id}s", delay_s=0.6))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "completed"
    assert rig.upbit.submissions[f"{intent.arb_id}s"] == 1
    rig.no_duplicates()


async def test_order_that_never_reached_the_exchange_expires_and_the_other_leg_is_hedged(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent()
    rig.binance.inject(Fault("timeout_before_accept", client_order_id=f"{intent.arb_id}b", delay_s=0.6))
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "hedged"
    assert rig.binance.submissions[f"{intent.arb_id}b"] == 0
    [(status, reason)] = rig.rows("SELECT status, reason FROM orders WHERE client_order_id = %s", f"{intent.arb_id}b")
    assert status == "EXPIRED" and "never reached the exchange" in reason
    assert rig.binance.orders[correction_id(f"{intent.arb_id}b", "hedge", 1)].executed == D("0.01")
    rig.no_duplicates()


@pytest.mark.parametrize("exchange", ["binance", "upbit"])
async def test_429_leads_to_back_off_not_a_ban(make_rig, exchange) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(unknown_order_grace_ms=3000)  # the back-off must fit in the order's deadline
    intent = spatial_intent()
    sim = rig.binance if exchange == "binance" else rig.upbit
    cid = f"{intent.arb_id}b" if exchange == "binance" else f"{intent.arb_id}s"
    sim.inject(Fault("http_429", client_order_id=cid, retry_after_s=1.0))
    started = time.monotonic()
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "completed"
    assert time.monotonic() - started >= 1.0
    assert sim.requests["throttled"] == 1 and sim.requests["banned"] == 0
    assert sim.submissions[cid] == 1
    rig.no_duplicates()


async def test_the_simulator_bans_a_client_that_ignores_retry_after(make_rig) -> None:  # type: ignore[no-untyped-def]
    """What the test above guards against is real: sending again inside the back-off gets a 418."""
    rig = await make_rig()
    venue = rig.handler.live["binance"]
    order = await rig.handler._prepare(spatial_intent().legs[0], "entry")
    rig.binance.inject(Fault("http_429", retry_after_s=5.0))
    with pytest.raises(Throttled):
        await venue._place(order, time.time_ns() + 10**9)
    venue.limiter.blocked_until, venue.budget = 0.0, None  # a client that ignores Retry-After
    with pytest.raises(Throttled):
        await venue._place(order, time.time_ns() + 10**9)
    assert rig.binance.requests["banned"] == 1 and not rig.binance.submissions


async def test_a_429_seen_by_one_replica_holds_back_the_others(make_rig, bus) -> None:  # type: ignore[no-untyped-def]
    """Replicas spend one budget: after a 429 on one, another does not send before Retry-After."""
    rig = await make_rig(unknown_order_grace_ms=3000)
    other = build_live_venues(rig.handler.cfg, Secrets.load({k: v for k, v in zip(
        ("BINANCE_API_KEY", "BINANCE_API_SECRET", "UPBIT_API_KEY", "UPBIT_API_SECRET"), rig.secrets, strict=True)}),
        bus)["binance"]
    try:
        first, second = spatial_intent(), spatial_intent()
        rig.binance.inject(Fault("http_429", client_order_id=f"{first.arb_id}b", retry_after_s=1.0))
        order_1 = await rig.handler._prepare(first.legs[0], "entry")
        order_2 = await rig.handler._prepare(second.legs[0], "entry")
        with pytest.raises(Throttled):
            await rig.handler.live["binance"]._place(order_1, time.time_ns() + 3 * 10**9)
        started = time.monotonic()
        result = await other.submit(order_2, time.time_ns() + 3 * 10**9)  # a replica that never saw the 429
        assert result.status == "FILLED"
        assert time.monotonic() - started >= 0.9
        assert rig.binance.requests["banned"] == 0
    finally:
        await other.close()


async def test_a_bad_signature_is_refused_by_the_exchange_and_the_leg_is_handled(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig(leg_risk_policy="unwind", leg_risk_fallback="none")
    rig.upbit.credentials = {k: v + "tampered" for k, v in rig.upbit.credentials.items()}
    intent = spatial_intent()
    out = await rig.run(intent)
    assert out.execution is not None
    [(status, reason)] = rig.rows("SELECT status, reason FROM orders WHERE client_order_id = %s", f"{intent.arb_id}s")
    assert status == "REJECTED" and "jwt_verification" in reason
    assert rig.upbit.submissions[f"{intent.arb_id}s"] == 0
    assert out.execution.status == "unwound"


async def test_missing_fx_rate_is_recorded_and_alerted(make_rig, bus) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    await bus.redis.delete(bus.keys.fx_latest("USDT/KRW"))
    intent = spatial_intent()
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "completed"
    assert set(out.execution.pnl_by_currency) == {"USDT", "KRW"}
    assert out.execution.realised_pnl == out.execution.pnl_by_currency["USDT"]
    [(fx,)] = rig.rows("SELECT fx_rates FROM trades WHERE arb_id = %s", intent.arb_id)
    assert fx == {"missing": ["KRW"]}
    assert [a.kind for a in out.alerts] == ["fx_missing"]


async def test_expired_intent_sends_nothing(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent(expires_ns=time.time_ns() - 1_000_000)
    out = await rig.run(intent)
    assert out.execution is not None and out.execution.status == "expired"
    assert rig.binance.requests["order"] == 0 and rig.upbit.requests["order"] == 0
    assert rig.rows("SELECT DISTINCT status FROM orders WHERE arb_id = %s", intent.arb_id) == [("EXPIRED",)]


async def test_redelivered_intent_is_not_sent_again(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig = await make_rig()
    intent = spatial_intent()
    first = await rig.run(intent)
    sent = (rig.binance.requests["order"], rig.upbit.requests["order"])
    again = await rig.run(intent)
    assert (rig.binance.requests["order"], rig.upbit.requests["order"]) == sent
    assert again.execution == first.execution and again.fills == first.fills
    rig.no_duplicates()
