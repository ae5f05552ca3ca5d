"""Live mode is guarded: whitelisted destinations only, approval above the caps, every
transfer recorded with its state, in-flight amounts for risk, and the executor's reports
recorded. Real Redis and PostgreSQL; the service's own rounds, without an exchange."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import psycopg
import pytest

from services.rebalancer.networks import TransferNetworkTable
from services.rebalancer.planner import Node, RebalancePlanner
from services.rebalancer.service import RebalancerService, guard_and_record
from services.rebalancer.store import TransferStore
from services.rebalancer.transfers import NotWhitelisted
from shared.config import Config, Secrets, load_config
from shared.models import Alert, Balance, Transfer, encode
from shared.runtime import FIELD, Bus, Delivery
from shared.streams import ALERTS, BALANCES, TRANSFERS
from tests.rebalancer_scenarios import KIMCHI_NETWORKS, KIMCHI_TARGETS, D, fx, kimchi_books, market_view

KEYS = {"BINANCE_API_KEY": "bk-live-0001", "BINANCE_API_SECRET": "bs-live-0001",
        "UPBIT_API_KEY": "uk-live-0001", "UPBIT_API_SECRET": "us-live-0001"}
USDT_ADDRESS = "TBinanceDepositAddress000000000000"
LIVE_BALANCES = {("binance", "BTC"): "1.8", ("upbit", "BTC"): "0.2", ("binance", "USDT"): "12000",
                 ("upbit", "KRW"): "118000000"}


def live_config(env: dict[str, str], **rebalancer: object) -> Config:
    environ = {**env, **KEYS, "ARB_ENV": "staging", "ARB_TRADING__MODE": "live"}
    return load_config(environ=environ, overrides={
        "exchanges": {
            "binance": {"enabled": True, "symbols": ["BTC/USDT"], "taker_fee": 0.001},
            "upbit": {"enabled": True, "symbols": ["BTC/KRW", "USDT/KRW"], "taker_fee": 0.0005},
            "okx": {"enabled": False}, "bybit": {"enabled": False},
        },
        "rebalancer": {
            "targets": KIMCHI_TARGETS, "networks": KIMCHI_NETWORKS, "interval_s": 60,
            # Only Binance's TRON USDT address is whitelisted: nothing may go to Upbit.
            "addresses": [{"exchange": "binance", "asset": "USDT", "network": "TRON", "address": USDT_ADDRESS}],
            "approval_caps": {"KRW": 10_000_000, "USDT": 100_000},
            "auto_approve": True,
            **rebalancer,
        },
    })


@pytest.fixture
async def live(pg_url: str, service_env: dict[str, str]) -> AsyncIterator[tuple[RebalancerService, Bus]]:
    cfg = live_config(service_env)
    bus = Bus.from_config(cfg)
    now = time.time_ns()
    for b in kimchi_books(now):
        await bus.redis.set(bus.keys.latest_book(b.exchange, b.symbol), encode(b))
    await bus.redis.set(bus.keys.fx_latest("USDT/KRW"), encode(fx(now)))
    for (exchange, asset), free in LIVE_BALANCES.items():  # what the executor reports from the exchanges
        await bus.redis.xadd(bus.stream(BALANCES), {FIELD: encode(Balance(
            exchange=exchange, asset=asset, free=D(free), mode="live", ts_ns=now))})
    service = RebalancerService(cfg, Secrets(KEYS))
    await service.setup()
    yield service, bus
    await service.teardown()
    await service.bus.close()
    await bus.close()


async def published(bus: Bus, stream: str, kind: type) -> list:
    return [msgspec.json.decode(f[FIELD], type=kind) for _, f in await bus.redis.xrange(bus.stream(stream))]


async def test_live_plans_go_only_to_whitelisted_addresses_and_wait_for_approval_above_the_cap(
    live: tuple[RebalancerService, Bus], pg_url: str, namespace: str
) -> None:
    service, bus = live
    assert service.live_balances[Node("upbit", "KRW")].free == D("118000000")
    await service.run_round(time.time_ns())

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        [record] = await service.store.list_transfers(conn)
    assert record.mode == "live" and record.state == "awaiting_approval"
    assert "over the approval cap of 10000000" in record.reason
    convert, withdraw = (s.step for s in record.steps)
    assert (convert.kind, convert.from_asset, convert.to_asset) == ("conversion", "KRW", "USDT")
    assert (withdraw.to_exchange, withdraw.network, withdraw.network_label, withdraw.address) == (
        "binance", "TRON", "TRX", USDT_ADDRESS)

    # Nothing may go to Upbit: its BTC shortfall is alerted, not planned.
    await service.producer.flush()
    alerts = await published(bus, ALERTS, Alert)
    assert any(a.kind == "shortfall" and a.labels == {"exchange": "upbit", "asset": "BTC"} for a in alerts)
    assert any(a.kind == "approval" and record.transfer_id in a.message for a in alerts)

    # The executor only ever sees it awaiting approval: never approved, so never executed.
    transfers = await published(bus, TRANSFERS, Transfer)
    assert [(t.transfer_id, t.state, t.mode) for t in transfers] == [
        (record.transfer_id, "planned", "live"), (record.transfer_id, "awaiting_approval", "live")]

    # Risk sees the KRW as leaving Upbit and the USDT as not yet at Binance.
    upbit = await bus.redis.hgetall(bus.keys.transfers_in_flight("upbit"))
    binance = await bus.redis.hgetall(bus.keys.transfers_in_flight("binance"))
    dust = convert.amount_out - withdraw.amount - withdraw.fee  # converted beyond what is sent: stays
    assert upbit == {b"outgoing:KRW": str(convert.amount).encode(), b"incoming:USDT": str(dust).encode()}
    assert binance == {b"incoming:USDT": str(withdraw.amount).encode()}

    await service.run_round(time.time_ns())  # the deficit is in flight: nothing new
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert [r.transfer_id for r in await service.store.list_transfers(conn)] == [record.transfer_id]


async def test_executor_reports_move_a_live_transfer_to_completed_once(
    live: tuple[RebalancerService, Bus], pg_url: str
) -> None:
    service, bus = live
    await service.run_round(time.time_ns())
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        [record] = await service.store.list_transfers(conn)
        await service.store.transition(conn, record.transfer_id, "approved", reason="checked", actor="alice",
                                       now_ns=time.time_ns())
    report = record.to_transfer()
    for i, state in enumerate(["sent", "sent", "completed", "completed"]):  # redelivered reports included
        msg = msgspec.structs.replace(report, state=state, reason=f"exchange says {state}", ts_ns=time.time_ns())
        await service.on_message(Delivery(TRANSFERS, f"{i + 1}-0".encode(), msg, 1))
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        done = await service.store.get(conn, record.transfer_id)
        events = await service.store.events(conn, record.transfer_id)
    assert done is not None and done.state == "completed"
    assert [(state, actor) for state, _, actor, _ in events] == [
        ("planned", "rebalancer"), ("awaiting_approval", "rebalancer"), ("approved", "alice"),
        ("sent", "executor"), ("completed", "executor")]
    # Until the executor reports Binance's balance, the delivery still counts: no second plan.
    await service.run_round(time.time_ns())
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert [r.transfer_id for r in await service.store.list_transfers(conn)] == [record.transfer_id]
    # The executor then reports the balances the exchanges show: nothing left to do.
    convert, withdraw = (s.step for s in record.steps)
    for exchange, asset, free in [("upbit", "KRW", D("118000000") - convert.amount),
                                  ("binance", "USDT", D("12000") + withdraw.amount)]:
        balance = Balance(exchange=exchange, asset=asset, free=free, mode="live", ts_ns=time.time_ns())
        await service.on_message(Delivery(BALANCES, b"9-0", balance, 1))
    await service.run_round(time.time_ns())
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert [r.transfer_id for r in await service.store.list_transfers(conn)] == [record.transfer_id]
    assert await bus.redis.hgetall(bus.keys.transfers_in_flight("upbit")) == {}
    assert await bus.redis.hgetall(bus.keys.transfers_in_flight("binance")) == {}


async def test_a_live_plan_to_an_address_off_the_whitelist_is_refused_before_it_is_recorded(
    live: tuple[RebalancerService, Bus], pg_url: str, namespace: str
) -> None:
    service, _ = live
    cfg = service.cfg
    # A plan made without the whitelist (as paper would): BTC to Upbit, which has no address.
    paper_planner = RebalancePlanner(cfg.rebalancer, TransferNetworkTable.from_settings(cfg.rebalancer),
                                     require_address=False)
    ms, marks = market_view(cfg)
    balances = {Node(ex, a): D(v) for (ex, a), v in LIVE_BALANCES.items()}
    plan = next(p for p in paper_planner.plan(balances, {}, ms, marks, time.time_ns()).plans
                if p.destination == Node("upbit", "BTC"))
    store = TransferStore(namespace, "live", "USDT")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(NotWhitelisted, match="BTC to upbit on BTC: no whitelisted address"):
            await guard_and_record(store, conn, plan, cfg.rebalancer, "live", time.time_ns())
        assert await store.list_transfers(conn) == []



async def test_a_missing_balance_plans_nothing_and_raises_a_critical_alert(
    live: tuple[RebalancerService, Bus], pg_url: str
) -> None:
    service, bus = live
    del service.live_balances[Node("upbit", "KRW")]  # the executor never reported it
    await service.run_round(time.time_ns())
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert await service.store.list_transfers(conn) == []
    alerts = await published(bus, ALERTS, Alert)
    assert [(a.kind, a.severity, a.message) for a in alerts] == [
        ("planning_input", "critical", "rebalancer planned nothing: missing balance for upbit:KRW: nothing planned")]
