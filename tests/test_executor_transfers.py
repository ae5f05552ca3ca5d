"""Live transfers carried out by the executor against the local exchange simulator: signed
REST over real sockets on 127.0.0.1, real Redis and PostgreSQL. Plans come from the
rebalancer's own planner and ledger (kimchi: KRW converted to USDT on Upbit and withdrawn
to Binance; BTC withdrawn from Binance to Upbit); the simulator's chain credits each
withdrawal to the exchange owning its address. No withdrawal is ever sent twice, and
nothing is sent for a transfer that is not exactly what was approved."""

from __future__ import annotations

import asyncio
import json
import secrets as pysecrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal as D
from typing import Any

import msgspec
import psycopg
import pytest
from executor_support import BTC_KRW, read_stream, start_executor, stop_process, wait_for

from services.executor.ledger import Database
from services.executor.markets import MarketData
from services.executor.service import build_live_venues
from services.executor.transfers import LiveTransferRunner, step_client_id
from services.executor.venues.base import ExchangeUnavailable, WithdrawalRefused, WithdrawalRequest
from services.rebalancer.networks import TransferNetworkTable
from services.rebalancer.planner import Node, RebalancePlanner
from services.rebalancer.service import guard_and_record
from services.rebalancer.store import TransferRecord, TransferStore
from services.rebalancer.transfers import IllegalTransition
from shared.config import Config, Secrets, load_config
from shared.models import Alert, Balance, Instrument, Transfer, TransferStep, encode
from shared.runtime import FIELD, Bus
from shared.simulator.orders import Fault, OrderSimulatorServer, SimulatedChain, SimulatedExchange, order_app
from shared.simulator.orders_binance import binance_exchange
from shared.simulator.orders_upbit import upbit_exchange
from shared.streams import ALERTS, BALANCES, TRANSFERS, KeySpace
from tests.rebalancer_scenarios import KIMCHI_NETWORKS, KIMCHI_TARGETS, kimchi_books, market_view

USDT_AT_BINANCE = "TBinanceDepositAddress000000000000"
BTC_AT_UPBIT = "bc1qupbitdeposit0000000000000000000000"
START = {"binance": {"BTC": "1.8", "USDT": "12000"}, "upbit": {"BTC": "0.2", "KRW": "118000000"}}
USDT_KRW = Instrument(exchange="upbit", symbol="USDT/KRW", native="KRW-USDT", base="USDT", quote="KRW",
                      tick_size=D("0.5"), lot_size=D("0.00000001"), min_notional=D("5000"),
                      taker_fee=D("0.0005"), maker_fee=D("0.0005"))
EXECUTOR = {"request_timeout_ms": 300, "unknown_order_grace_ms": 400, "clock_margin_ms": 50,
            "fill_poll_interval_ms": 20, "fill_poll_timeout_ms": 2000, "transfer_poll_interval_ms": 50,
            "transfer_timeout_s": 30, "unknown_withdrawal_timeout_s": 30}
ADDRESSES = [{"exchange": "binance", "asset": "USDT", "network": "TRON", "address": USDT_AT_BINANCE},
             {"exchange": "upbit", "asset": "BTC", "network": "BTC", "address": BTC_AT_UPBIT}]


def keys() -> dict[str, str]:
    return {"BINANCE_API_KEY": pysecrets.token_hex(32), "BINANCE_API_SECRET": pysecrets.token_hex(32),
            "UPBIT_API_KEY": pysecrets.token_hex(20), "UPBIT_API_SECRET": pysecrets.token_hex(20)}


def live_config(namespace: str, url: str, api_keys: dict[str, str], *, addresses: list[dict[str, Any]] | None = None,
                mode: str = "live", **executor: Any) -> Config:
    environ = {"ARB_ENV": "staging", "ARB_SESSION": namespace, **api_keys}
    return load_config(environ=environ, overrides={
        "trading": {"mode": mode},
        "clickhouse": {"url": "http://127.0.0.1:8123"},
        "exchanges": {"okx": {"enabled": False}, "bybit": {"enabled": False},
                      "binance": {"enabled": True, "symbols": ["BTC/USDT"], "taker_fee": 0.001, "rest_url": url},
                      "upbit": {"enabled": True, "symbols": ["BTC/KRW", "USDT/KRW"], "taker_fee": 0.0005,
                                "rest_url": url}},
        "rebalancer": {"targets": KIMCHI_TARGETS, "networks": KIMCHI_NETWORKS, "addresses": addresses or ADDRESSES,
                       "approval_caps": {}, "auto_approve": False},
        "executor": {**EXECUTOR, **executor},
    })


def simulated(api_keys: dict[str, str]) -> tuple[SimulatedExchange, SimulatedExchange]:
    binance, upbit = binance_exchange(), upbit_exchange()
    binance.add_key(api_keys["BINANCE_API_KEY"], api_keys["BINANCE_API_SECRET"])
    upbit.add_key(api_keys["UPBIT_API_KEY"], api_keys["UPBIT_API_SECRET"])
    books = {b.symbol: b for b in kimchi_books()}
    upbit.set_book("KRW-USDT", "USDT", "KRW", books["USDT/KRW"].bids, books["USDT/KRW"].asks)
    upbit.set_book("KRW-BTC", "BTC", "KRW", books["BTC/KRW"].bids, books["BTC/KRW"].asks)
    binance.fund(START["binance"])
    upbit.fund(START["upbit"])
    upbit.withdraw_fees[("USDT", "TRX")] = D("1")
    binance.withdraw_fees[("BTC", "BTC")] = D("0.0002")
    chain = SimulatedChain()
    chain.add_address(binance, "USDT", "TRX", USDT_AT_BINANCE)
    chain.add_address(upbit, "BTC", "BTC", BTC_AT_UPBIT)
    return binance, upbit


async def put_books(bus: Bus) -> None:
    """What the collector keeps in Redis: Upbit's trading rules and fresh books."""
    now = time.time_ns()
    for book in kimchi_books(now):
        await bus.redis.set(bus.keys.latest_book(book.exchange, book.symbol), encode(book), ex=60)
    await bus.redis.hset(bus.keys.instruments("upbit"), "USDT/KRW", msgspec.json.encode(USDT_KRW))
    await bus.redis.hset(bus.keys.instruments("upbit"), "BTC/KRW", msgspec.json.encode(BTC_KRW))


async def record_approved(cfg: Config, bus: Bus, pg_url: str, destination: Node, mode: str = "live") -> TransferRecord:
    """The rebalancer's plan to restore ``destination``, recorded, approved by a person and published."""
    planner = RebalancePlanner(cfg.rebalancer, TransferNetworkTable.from_settings(cfg.rebalancer),
                               require_address=mode == "live")
    markets, marks = market_view(cfg)
    balances = {Node(ex, asset): D(v) for ex, assets in START.items() for asset, v in assets.items()}
    plan = next(p for p in planner.plan(balances, {}, markets, marks, time.time_ns()).plans
                if p.destination == destination)
    store = TransferStore(cfg.session, mode, "USDT")  # type: ignore[arg-type]
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        record, _, _ = await guard_and_record(store, conn, plan, cfg.rebalancer, mode, time.time_ns())  # type: ignore[arg-type]
        assert record is not None
        if record.state != "approved":
            record = await store.transition(conn, record.transfer_id, "approved", reason="checked", actor="alice",
                                            now_ns=time.time_ns())
        await store.publish_pending(conn, bus)
    return record


@dataclass
class Rig:
    cfg: Config
    bus: Bus
    pg_url: str
    binance: SimulatedExchange
    upbit: SimulatedExchange
    runner: LiveTransferRunner
    make_runner: Callable[..., Awaitable[LiveTransferRunner]]

    async def approved(self, destination: Node) -> Transfer:
        record = await record_approved(self.cfg, self.bus, self.pg_url, destination)
        return next(t for t in await transfers(self.bus) if t.transfer_id == record.transfer_id
                    and t.state == "approved")

    async def until_final(self, transfer_id: str, runner: LiveTransferRunner | None = None,
                          timeout: float = 15.0) -> str:
        """Follow the transfer as the executor's watcher does, until it is final."""
        async def final() -> str | None:
            await (runner or self.runner).watch()
            state = self.state(transfer_id)
            return state if state in ("completed", "failed", "cancelled") else None

        return await wait_for(final, timeout, interval=0.05, what=f"transfer {transfer_id} final")  # type: ignore[no-any-return]

    def state(self, transfer_id: str) -> str:
        with psycopg.connect(self.pg_url) as conn:
            row = conn.execute("SELECT state FROM transfers WHERE transfer_id = %s", (transfer_id,)).fetchone()
        assert row is not None
        return str(row[0])

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg_url) as conn:
            return conn.execute(sql, args).fetchall()

    def sent_nothing(self) -> None:
        for sim in (self.binance, self.upbit):
            assert sim.requests["order"] == 0 and sim.requests["withdraw"] == 0, sim.requests
            assert sim.withdrawals == [] and sim.orders == {}


async def transfers(bus: Bus) -> list[Transfer]:
    return [t for t in await read_stream(bus, TRANSFERS) if isinstance(t, Transfer)]


@pytest.fixture
async def make_rig(bus: Bus, pg_url: str, namespace: str) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    cleanup: list[Callable[[], Awaitable[None]]] = []

    async def make(**config: Any) -> Rig:
        api_keys = keys()
        binance, upbit = simulated(api_keys)
        server = OrderSimulatorServer(order_app(binance=binance, upbit=upbit))
        url = await server.start()
        cfg = live_config(namespace, url, api_keys)
        await put_books(bus)

        async def make_runner(**overrides: Any) -> LiveTransferRunner:
            run_cfg = live_config(namespace, url, api_keys, **overrides) if overrides else cfg
            venues = build_live_venues(run_cfg, Secrets.load(api_keys), bus)
            db = Database(pg_url)

            async def close() -> None:
                for v in venues.values():
                    await v.close()
                await db.close()

            cleanup.append(close)
            return LiveTransferRunner(run_cfg, db=db, market=MarketData(bus, run_cfg), live=venues, bus=bus)

        cleanup.append(server.stop)
        return Rig(cfg, bus, pg_url, binance, upbit, await make_runner(**config), make_runner)

    yield make
    for close in reversed(cleanup):
        await close()


# --------------------------------------------------------------------------- behaviour


async def test_kimchi_conversion_and_withdrawal_complete_and_balances_are_published(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("binance", "USDT"))
    convert, withdraw = msg.steps
    assert (convert.kind, convert.network, withdraw.kind, withdraw.network_label) == (
        "conversion", "USDT/KRW", "withdrawal", "TRX")

    await rig.runner.handle(msg)
    assert rig.state(msg.transfer_id) == "sent"
    assert await rig.until_final(msg.transfer_id) == "completed"

    # Upbit: one IOC buy of USDT with at most the step's KRW, its limit 30 bps above the ask.
    [order] = rig.upbit.orders.values()
    assert order.client_order_id == step_client_id(rig.cfg.session, msg.transfer_id, 0, "conversion")
    assert (order.side, order.time_in_force, order.price) == ("buy", "IOC", D("1394"))
    spent = order.quote_executed + order.fee
    assert 0 < spent <= convert.amount
    # One withdrawal of what the conversion delivered, net of the fee, to the whitelisted address.
    [w] = rig.upbit.withdrawals
    assert (w.asset, w.network, w.address, w.memo) == ("USDT", "TRX", USDT_AT_BINANCE, "")
    assert w.amount == order.executed - D("1") and w.amount <= withdraw.amount
    [deposit] = rig.binance.deposits
    assert (deposit.amount, deposit.txid) == (w.amount, w.txid)

    steps = rig.rows("SELECT exec_state, state, debited, credited, txid FROM transfer_steps WHERE transfer_id = %s "
                     "ORDER BY step_index", msg.transfer_id)
    assert steps == [("done", "done", spent, order.executed, ""), ("done", "done", w.amount + 1, w.amount, w.txid)]
    events = rig.rows("SELECT state, actor FROM transfer_events WHERE transfer_id = %s ORDER BY id", msg.transfer_id)
    assert events[-2:] == [("sent", "executor"), ("completed", "executor")]

    # Published: sent then completed (same transfer, live), and before completed the balances the
    # exchanges report, newer than nothing older than the completion.
    reports = [t for t in await transfers(rig.bus) if t.transfer_id == msg.transfer_id]
    assert [t.state for t in reports] == ["planned", "awaiting_approval", "approved", "sent", "completed"]
    assert {t.mode for t in reports} == {"live"} and all(t.steps == msg.steps for t in reports)
    completed = reports[-1]
    balances = {(b.exchange, b.asset): b for b in await read_stream(rig.bus, BALANCES) if isinstance(b, Balance)}
    assert balances[("binance", "USDT")].free == D("12000") + w.amount
    assert balances[("upbit", "KRW")].free == D("118000000") - spent
    assert balances[("upbit", "USDT")].free == order.executed - w.amount - 1
    assert all(b.mode == "live" and b.ts_ns == completed.ts_ns for (ex, _), b in balances.items() if ex == "binance")
    entries = await rig.bus.redis.xrange(rig.bus.stream(BALANCES))
    done = [eid for eid, f in await rig.bus.redis.xrange(rig.bus.stream(TRANSFERS))
            if b'"completed"' in f[FIELD]]
    assert max(eid for eid, _ in entries) <= done[0]
    assert rig.upbit.duplicates == {} and rig.binance.duplicates == {}


async def test_bitcoin_withdrawal_from_binance_is_keyed_by_its_withdraw_order_id(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    [step] = msg.steps
    await rig.runner.handle(msg)
    assert await rig.until_final(msg.transfer_id) == "completed"
    [w] = rig.binance.withdrawals
    cid = step_client_id(rig.cfg.session, msg.transfer_id, 0, "withdrawal")
    assert (w.client_id, w.network, w.address) == (cid, "BTC", BTC_AT_UPBIT)
    # Binance takes its fee out of the amount: the fee is added so the planned amount arrives.
    assert (w.amount, w.received) == (step.amount + step.fee, step.amount)
    assert rig.upbit.balances["BTC"] == D("0.2") + step.amount
    assert rig.binance.balances["BTC"] == D("1.8") - step.amount - step.fee


async def test_a_step_after_a_withdrawal_waits_for_the_deposit_and_spends_what_was_credited(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    # BTC from Binance to Upbit, then sold there for KRW: a route the executor must chain.
    steps = [TransferStep(kind="withdrawal", from_exchange="binance", to_exchange="upbit", from_asset="BTC",
                          to_asset="BTC", amount=D("0.5"), fee=D("0.0002"), network="BTC", expected_seconds=1800,
                          amount_out=D("0.5"), address=BTC_AT_UPBIT),
             TransferStep(kind="conversion", from_exchange="upbit", to_exchange="upbit", from_asset="BTC",
                          to_asset="KRW", amount=D("0.5"), network="BTC/KRW", amount_out=D("42478750"))]
    msg = Transfer(transfer_id="tr-chained0000000000001", asset="KRW", steps=steps, state="approved",
                   expected_cost=10.0, expected_seconds=1800.0, ts_ns=time.time_ns(), mode="live")
    with psycopg.connect(rig.pg_url) as conn:  # as the rebalancer records an approved plan
        now = time.time_ns()
        conn.execute(
            """INSERT INTO transfers (transfer_id, session, mode, state, asset, to_exchange, amount, from_exchange,
                   from_asset, from_amount, expected_cost, cost_currency, expected_seconds, reason, approved_by,
                   created_ns, updated_ns)
               VALUES (%s, %s, 'live', 'approved', 'KRW', 'upbit', 42478750, 'binance', 'BTC', 0.5002, 10, 'USDT',
                       1800, 'test', 'alice', %s, %s)""", (msg.transfer_id, rig.cfg.session, now, now))
        for i, st in enumerate(steps):
            conn.execute(
                """INSERT INTO transfer_steps (transfer_id, step_index, kind, from_exchange, to_exchange, from_asset,
                       to_asset, network, network_label, address, memo, amount, fee, amount_out, expected_seconds)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                (msg.transfer_id, i, st.kind, st.from_exchange, st.to_exchange, st.from_asset, st.to_asset,
                 st.network, st.network_label, st.address, st.memo, st.amount, st.fee, st.amount_out,
                 st.expected_seconds))
    await rig.runner.handle(msg)
    assert rig.upbit.orders == {}  # nothing to sell before the BTC is credited on Upbit
    assert await rig.until_final(msg.transfer_id) == "completed"
    [deposit] = rig.upbit.deposits
    [order] = rig.upbit.orders.values()
    assert deposit.amount == D("0.5") and order.created_ms >= deposit.created_ms
    assert (order.side, order.quantity, order.executed) == ("sell", deposit.amount, deposit.amount)
    received = order.quote_executed - order.fee
    [(credited,)] = rig.rows("SELECT credited FROM transfer_steps WHERE transfer_id = %s AND step_index = 1",
                             msg.transfer_id)
    assert credited == received
    assert rig.upbit.balances["KRW"] == D("118000000") + received


@pytest.mark.parametrize("change", ["whitelist", "message"])
async def test_an_address_changed_after_approval_is_refused_and_nothing_is_sent(make_rig, change) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("binance", "USDT"))
    runner = rig.runner
    if change == "whitelist":  # the operator changed the whitelisted address after the approval
        moved = [dict(a, address="TSomewhereElse0000000000000000000") if a["asset"] == "USDT" else a
                 for a in ADDRESSES]
        runner = await rig.make_runner(addresses=moved)
        expected = "step 1: USDT to binance on TRON: address is not the whitelisted one"
    else:  # the message on the stream no longer says what was approved
        steps = [msg.steps[0], msgspec.structs.replace(msg.steps[1], address="TAttacker000000000000000000000000")]
        msg = msgspec.structs.replace(msg, steps=steps)
        expected = "its steps differ from the ledger's"
    await runner.handle(msg)
    assert rig.state(msg.transfer_id) == "failed"
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert reason == f"refused: {expected}; nothing sent"
    rig.sent_nothing()
    report = [t for t in await transfers(rig.bus) if t.state == "failed"]
    assert [(t.transfer_id, t.reason, t.mode) for t in report] == [(msg.transfer_id, reason, "live")]
    alerts = [a for a in await read_stream(rig.bus, ALERTS) if isinstance(a, Alert)]
    assert [a.kind for a in alerts] == ["transfer_failed"]


@pytest.mark.parametrize("destination", [Node("upbit", "BTC"), Node("binance", "USDT")],
                         ids=["binance-withdraw-order-id", "upbit-withdrawal-list"])
async def test_a_timeout_after_the_withdrawal_reached_the_exchange_sends_no_second_withdrawal(
        make_rig, destination) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(destination)
    source = rig.binance if destination.exchange == "upbit" else rig.upbit
    source.inject_withdrawal(Fault("timeout_after_accept", delay_s=1.0))
    await rig.runner.handle(msg)
    assert await rig.until_final(msg.transfer_id) == "completed"
    assert source.requests["withdraw"] == 1 and len(source.withdrawals) == 1
    assert source.requests["withdraw_history"] >= 1  # it was looked up, not sent again
    [(ref,)] = rig.rows("SELECT exchange_ref FROM transfer_steps WHERE transfer_id = %s AND kind = 'withdrawal'",
                        msg.transfer_id)
    assert ref == source.withdrawals[0].withdrawal_id


async def test_a_withdrawal_whose_answer_is_lost_and_never_shows_up_is_never_sent_again(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig(unknown_withdrawal_timeout_s=1)
    msg = await rig.approved(Node("binance", "USDT"))
    rig.upbit.inject_withdrawal(Fault("timeout_before_accept", delay_s=0.5))  # lost on the way in
    await rig.runner.handle(msg)
    assert rig.state(msg.transfer_id) == "sent"  # it may have reached Upbit: no longer cancellable
    [(exec_state,)] = rig.rows("SELECT exec_state FROM transfer_steps WHERE transfer_id = %s AND step_index = 1",
                               msg.transfer_id)
    assert exec_state == "unknown"
    assert await rig.until_final(msg.transfer_id) == "failed"
    assert rig.upbit.requests["withdraw"] == 1 and rig.upbit.withdrawals == []
    assert rig.upbit.requests["withdraw_history"] >= 2  # looked for, again and again, never re-sent
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert "not found on the exchange for 1 s; not sent again" in reason
    [alert] = [a for a in await read_stream(rig.bus, ALERTS) if isinstance(a, Alert)]
    assert (alert.kind, alert.severity, alert.labels) == ("transfer_failed", "critical",
                                                          {"transfer_id": msg.transfer_id})


async def test_a_redelivered_transfer_sends_nothing_twice(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("binance", "USDT"))
    # The first delivery dies while the withdrawal is at the exchange (no answer yet).
    rig.upbit.inject_withdrawal(Fault("timeout_after_accept", delay_s=5.0))
    first = await rig.make_runner(**{})
    task = asyncio.create_task(first.handle(msg))
    await wait_for(lambda: _true(len(rig.upbit.withdrawals) == 1), 10.0, what="the withdrawal at the exchange")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await first.db.close()  # the dead replica's session, and its lock, go away
    # Redelivered (another replica), twice, and the stream's copy of it again at the end.
    second = await rig.make_runner(**{})
    await second.handle(msg)
    await second.handle(msg)
    assert await rig.until_final(msg.transfer_id, second) == "completed"
    await rig.runner.handle(msg)
    assert len(rig.upbit.orders) == 1 and rig.upbit.requests["order"] == 1
    assert rig.upbit.requests["withdraw"] == 1 and len(rig.upbit.withdrawals) == 1
    events = rig.rows("SELECT state FROM transfer_events WHERE transfer_id = %s AND actor = 'executor' ORDER BY id",
                      msg.transfer_id)
    assert events == [("sent",), ("completed",)]


async def test_a_cancel_while_the_first_step_is_at_the_exchange_waits_for_it_and_is_refused(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    rig.binance.inject_withdrawal(Fault("timeout_after_accept", delay_s=1.0))
    task = asyncio.create_task(rig.runner.handle(msg))
    await wait_for(lambda: _true(len(rig.binance.withdrawals) == 1), 10.0, what="the withdrawal at the exchange")
    store = TransferStore(rig.cfg.session, "live", "USDT")
    async with await psycopg.AsyncConnection.connect(rig.pg_url, autocommit=True) as conn:
        assert rig.state(msg.transfer_id) == "approved"  # the withdrawal is out, its answer is not in
        with pytest.raises(IllegalTransition, match="is sent: cannot become cancelled"):
            await store.transition(conn, msg.transfer_id, "cancelled", reason="changed my mind", actor="bob",
                                   now_ns=time.time_ns())
    await task
    assert await rig.until_final(msg.transfer_id) == "completed"
    assert len(rig.binance.withdrawals) == 1


async def test_a_transfer_cancelled_before_the_executor_took_it_sends_nothing(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("binance", "USDT"))
    store = TransferStore(rig.cfg.session, "live", "USDT")
    async with await psycopg.AsyncConnection.connect(rig.pg_url, autocommit=True) as conn:
        await store.transition(conn, msg.transfer_id, "cancelled", reason="not now", actor="bob", now_ns=time.time_ns())
    assert await rig.runner.handle(msg) == []
    assert await rig.runner.watch() == []
    rig.sent_nothing()
    assert rig.state(msg.transfer_id) == "cancelled"


async def test_a_paper_transfer_is_ignored_by_the_executor(make_rig, pg_url) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    paper_cfg = msgspec.structs.replace(rig.cfg, trading=msgspec.structs.replace(rig.cfg.trading, mode="paper"))
    record = await record_approved(paper_cfg, rig.bus, pg_url, Node("binance", "USDT"), mode="paper")
    [msg] = [t for t in await transfers(rig.bus) if t.transfer_id == record.transfer_id and t.state == "approved"]
    assert msg.mode == "paper"
    assert await rig.runner.handle(msg) == []
    assert await rig.runner.watch() == []
    # Even a message claiming to be live is not acted on by an executor in paper mode.
    paper_runner = await rig.make_runner(mode="paper")
    assert await paper_runner.handle(msgspec.structs.replace(msg, mode="live")) == []
    rig.sent_nothing()
    assert rig.state(record.transfer_id) == "approved"
    assert [t.state for t in await transfers(rig.bus)] == ["planned", "approved"]


async def test_a_withdrawal_the_exchange_refuses_fails_the_transfer_and_says_where_the_funds_are(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("binance", "USDT"))
    rig.upbit.inject_withdrawal(Fault("reject"))
    await rig.runner.handle(msg)
    assert rig.state(msg.transfer_id) == "failed"
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert "step 1 withdrawal of" in reason and "refused by upbit (upbit insufficient_funds_withdraw" in reason
    assert "nothing left upbit" in reason
    assert rig.upbit.withdrawals == [] and len(rig.upbit.orders) == 1  # the USDT bought stays on Upbit
    assert [t.state for t in await transfers(rig.bus) if t.transfer_id == msg.transfer_id][-2:] == ["sent", "failed"]


async def test_a_withdrawal_with_a_bad_signature_is_refused_by_the_exchange_and_nothing_leaves(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    rig.binance.credentials = {k: v + "tampered" for k, v in rig.binance.credentials.items()}
    await rig.runner.handle(msg)
    assert rig.state(msg.transfer_id) == "failed"
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert "refused by binance (binance -1022: Signature for this request is not valid.)" in reason
    assert rig.binance.withdrawals == [] and rig.binance.requests["withdraw"] == 1
    assert rig.binance.balances["BTC"] == D("1.8")


@pytest.mark.parametrize("exchange", ["binance", "upbit"])
async def test_the_wallet_endpoints_check_signatures_like_the_order_endpoints(make_rig, exchange) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    sim = rig.binance if exchange == "binance" else rig.upbit
    venue = rig.runner.live[exchange]
    assert "BTC" in await venue.balances()  # the right key works
    sim.credentials = {k: v + "tampered" for k, v in sim.credentials.items()}
    now = time.time_ns()
    request = WithdrawalRequest(client_id="wtest", asset="BTC", network="BTC", address=BTC_AT_UPBIT, memo="",
                                amount=D("0.1"), claimed_ns=now, not_after_ns=now + 10**9)
    with pytest.raises(WithdrawalRefused, match="-1022" if exchange == "binance" else "jwt_verification"):
        await venue.withdraw(request)
    with pytest.raises(ExchangeUnavailable):
        await venue.balances()
    with pytest.raises(ExchangeUnavailable):
        await venue.find_withdrawal(request)
    assert sim.withdrawals == []


async def test_a_429_on_the_withdrawal_backs_off_and_sends_it_once(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    rig.binance.inject_withdrawal(Fault("http_429", retry_after_s=0.2))
    await rig.runner.handle(msg)
    assert await rig.until_final(msg.transfer_id) == "completed"
    assert rig.binance.requests["throttled"] == 1 and rig.binance.requests["banned"] == 0
    assert len(rig.binance.withdrawals) == 1 and list(rig.binance.withdraw_requests.values()) == [1]


async def test_a_withdrawal_failed_by_the_exchange_fails_the_transfer_with_the_funds_back_at_the_source(
        make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    rig.binance.inject_withdrawal(Fault("fail_after_accept"))
    await rig.runner.handle(msg)
    assert await rig.until_final(msg.transfer_id) == "failed"
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert "failed on binance (status 5" in reason and "the funds stay on binance" in reason
    assert rig.binance.balances["BTC"] == D("1.8") and rig.upbit.deposits == []


async def test_transfers_touching_an_exchange_without_live_transfer_support_are_refused(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    steps = [msgspec.structs.replace(msg.steps[0], from_exchange="okx")]
    await rig.runner.handle(msgspec.structs.replace(msg, steps=steps))
    # The ledger's steps are what counts: a message that differs is refused as such.
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert reason == "refused: its steps differ from the ledger's; nothing sent"
    with psycopg.connect(rig.pg_url) as conn:  # a plan from okx, as the ledger has it
        conn.execute("UPDATE transfer_steps SET from_exchange = 'okx' WHERE transfer_id = %s", (msg.transfer_id,))
        conn.execute("UPDATE transfers SET state = 'approved' WHERE transfer_id = %s", (msg.transfer_id,))
        conn.commit()
    await rig.runner.handle(msgspec.structs.replace(msg, steps=steps))
    [(reason,)] = rig.rows("SELECT reason FROM transfers WHERE transfer_id = %s", msg.transfer_id)
    assert reason == "refused: no live transfer support for okx; nothing sent"
    rig.sent_nothing()


async def test_an_approved_message_unknown_to_the_ledger_is_refused_and_reported(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    msg = await rig.approved(Node("upbit", "BTC"))
    forged = msgspec.structs.replace(msg, transfer_id="tr-0000000000forged00")
    await rig.runner.handle(forged)
    rig.sent_nothing()
    [report] = [t for t in await transfers(rig.bus) if t.transfer_id == forged.transfer_id]
    assert (report.state, report.mode) == ("failed", "live")
    assert "not in this session's transfer ledger" in report.reason


# --------------------------------------------------------------------------- the service


async def test_the_executor_service_carries_out_an_approved_transfer_from_the_stream(
        service_env, pg_url, redis_url, namespace) -> None:  # type: ignore[no-untyped-def]
    api_keys = keys()
    binance, upbit = simulated(api_keys)
    server = OrderSimulatorServer(order_app(binance=binance, upbit=upbit))
    url = await server.start()
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("staging", namespace))
    cfg = live_config(namespace, url, api_keys)
    env = {**service_env, **api_keys, "ARB_ENV": "staging", "ARB_TRADING__MODE": "live",
           "ARB_EXCHANGES__OKX__ENABLED": "false", "ARB_EXCHANGES__BYBIT__ENABLED": "false",
           "ARB_EXCHANGES__BINANCE__SYMBOLS": '["BTC/USDT"]', "ARB_EXCHANGES__BINANCE__REST_URL": url,
           "ARB_EXCHANGES__UPBIT__SYMBOLS": '["BTC/KRW", "USDT/KRW"]', "ARB_EXCHANGES__UPBIT__REST_URL": url,
           "ARB_REBALANCER__NETWORKS": json.dumps(KIMCHI_NETWORKS), "ARB_REBALANCER__ADDRESSES": json.dumps(ADDRESSES),
           **{f"ARB_EXECUTOR__{k.upper()}": str(v) for k, v in EXECUTOR.items()}}
    proc = None
    try:
        await put_books(bus)
        record = await record_approved(cfg, bus, pg_url, Node("binance", "USDT"))
        proc = start_executor(env)

        async def completed() -> list[Transfer] | None:
            got = [t for t in await transfers(bus) if t.transfer_id == record.transfer_id]
            return got if got and got[-1].state in ("completed", "failed") else None

        reports = await wait_for(completed, 30.0, what="the transfer completed")
        assert [t.state for t in reports][-2:] == ["sent", "completed"], reports[-1].reason
        assert len(upbit.withdrawals) == 1 and len(binance.deposits) == 1
        assert any(isinstance(b, Balance) and (b.exchange, b.asset) == ("binance", "USDT")
                   for b in await read_stream(bus, BALANCES))
    finally:
        log = stop_process(proc) if proc is not None else ""
        await server.stop()
        await bus.close()
    assert "Traceback" not in log, log[-5000:]
    assert all(v not in log for v in api_keys.values())


async def _true(value: bool) -> bool:
    return value
