"""Paper transfers against the real PostgreSQL ledger and Redis: steps move balances exactly
once, after their network time, with their fees; states are recorded and published."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import msgspec
import psycopg
import pytest

from services.rebalancer.market import ConversionMarket
from services.rebalancer.networks import TransferNetworkTable
from services.rebalancer.paper import PaperTransferRunner, fit_withdrawal
from services.rebalancer.planner import Node, RebalancePlanner, TransferPlan
from services.rebalancer.service import guard_and_record
from services.rebalancer.store import TransferStore
from services.rebalancer.transfers import IllegalTransition
from shared.config import Config
from shared.ledger import load_balances, seed_balances
from shared.models import Transfer
from shared.runtime import FIELD, Bus
from shared.streams import TRANSFERS
from tests.rebalancer_scenarios import START, D, book, config, kimchi_books, market_view, markets

NOW = 1_700_000_000_000_000_000
NS = 1_000_000_000


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
        yield c


async def with_start_balances(conn: psycopg.AsyncConnection, session: str) -> None:
    async with conn.transaction():
        await seed_balances(conn, session, "paper", START)


def usdt_plan(cfg: Config) -> TransferPlan:
    ms, marks = market_view(cfg, NOW)
    balances = {Node(ex, a): D(v) for ex, assets in START.items() for a, v in assets.items()}
    planner = RebalancePlanner(cfg.rebalancer, TransferNetworkTable.from_settings(cfg.rebalancer),
                               require_address=False)
    return next(p for p in planner.plan(balances, {}, ms, marks, NOW).plans if p.destination == Node("binance", "USDT"))


def runner(cfg: Config, store: TransferStore, session: str) -> PaperTransferRunner:
    table = TransferNetworkTable.from_settings(cfg.rebalancer)
    return PaperTransferRunner(store, cfg.rebalancer, lambda: table, session)


def by_key(ms: list[ConversionMarket]) -> dict[tuple[str, str], ConversionMarket]:
    return {(m.exchange, m.symbol): m for m in ms}


async def balances(conn: psycopg.AsyncConnection, session: str) -> dict[tuple[str, str], Decimal]:
    return {k: free for k, (free, _) in (await load_balances(conn, session, "paper")).items()}


async def test_conversion_runs_at_the_book_and_the_withdrawal_credits_after_its_network_time(
    conn: psycopg.AsyncConnection, namespace: str
) -> None:
    cfg = config()
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    record, state, _ = await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    assert record is not None and state == "approved"
    convert, withdraw = plan.steps()
    ms = by_key(markets(cfg, kimchi_books(NOW)))
    run = runner(cfg, store, namespace)

    moved = await run.advance(conn, NOW + 1, ms)
    after_send = await balances(conn, namespace)
    assert after_send[("upbit", "KRW")] == D("118000000") - convert.amount
    assert after_send[("upbit", "USDT")] == convert.amount_out - withdraw.amount - withdraw.fee
    assert after_send[("binance", "USDT")] == D("12000")  # not credited before the network time
    assert {(b.exchange, b.asset): b.free for b in moved} == {
        ("upbit", "KRW"): after_send[("upbit", "KRW")], ("upbit", "USDT"): after_send[("upbit", "USDT")]}
    assert (await store.get(conn, plan.transfer_id)).state == "sent"  # type: ignore[union-attr]

    due = NOW + 1 + int(withdraw.expected_seconds * NS)
    assert await run.advance(conn, due - 1, ms) == []
    moved = await run.advance(conn, due, ms)
    final = await balances(conn, namespace)
    assert final[("binance", "USDT")] == D("12000") + withdraw.amount == D("60000")
    assert [(b.exchange, b.asset, b.free) for b in moved] == [("binance", "USDT", D("60000"))]
    record = await store.get(conn, plan.transfer_id)
    assert record is not None and record.state == "completed"
    assert [s.state for s in record.steps] == ["done", "done"]
    assert record.steps[1].fee_charged == withdraw.fee == D("1")
    assert record.steps[1].debited == withdraw.amount + withdraw.fee
    assert record.steps[1].credited == withdraw.amount
    assert [e[0] for e in await store.events(conn, plan.transfer_id)] == ["planned", "approved", "sent", "completed"]


async def test_concurrent_and_repeated_rounds_apply_every_step_exactly_once(pg_url: str, namespace: str) -> None:
    cfg = config()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c1, \
            await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c2:
        await with_start_balances(c1, namespace)
        store = TransferStore(namespace, "paper", "USDT")
        plan = usdt_plan(cfg)
        await guard_and_record(store, c1, plan, cfg.rebalancer, "paper", NOW)
        ms = by_key(markets(cfg, kimchi_books(NOW)))
        run = runner(cfg, store, namespace)
        for t in (1, 1, 200, 200, 400):  # two replicas racing, again and again, before and after due
            await asyncio.gather(run.advance(c1, NOW + t * NS, ms), run.advance(c2, NOW + t * NS, ms))
        final = await balances(c1, namespace)
        convert, withdraw = plan.steps()
        assert final[("upbit", "KRW")] == D("118000000") - convert.amount
        assert final[("upbit", "USDT")] == convert.amount_out - withdraw.amount - withdraw.fee
        assert final[("binance", "USDT")] == D("60000")
        assert [e[0] for e in await store.events(c1, plan.transfer_id)] == [
            "planned", "approved", "sent", "completed"]


async def test_transfer_over_the_approval_cap_never_executes_until_approved(
    conn: psycopg.AsyncConnection, namespace: str
) -> None:
    cfg = config({"paper_auto_approve": False, "auto_approve": True, "approval_caps": {"KRW": 10_000_000}})
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    _, state, why = await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    assert state == "awaiting_approval" and "over the approval cap of 10000000" in why
    ms = by_key(markets(cfg, kimchi_books(NOW)))
    run = runner(cfg, store, namespace)
    before = await balances(conn, namespace)
    for t in range(5):
        assert await run.advance(conn, NOW + t * 100_000 * NS, ms) == []
    assert await balances(conn, namespace) == before
    assert (await store.get(conn, plan.transfer_id)).state == "awaiting_approval"  # type: ignore[union-attr]

    await store.transition(conn, plan.transfer_id, "approved", reason="checked", actor="alice", now_ns=NOW + 1)
    await run.advance(conn, NOW + 2, ms)
    assert (await balances(conn, namespace))[("upbit", "KRW")] < before[("upbit", "KRW")]


async def test_a_source_without_the_funds_fails_the_transfer_and_moves_nothing(
    conn: psycopg.AsyncConnection, namespace: str
) -> None:
    cfg = config()
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    async with conn.transaction():  # the KRW went elsewhere (a trade) after planning
        await conn.execute("UPDATE balances SET free = 1000 WHERE session = %s AND asset = 'KRW'", (namespace,))
    before = await balances(conn, namespace)
    assert await runner(cfg, store, namespace).advance(conn, NOW + 1, by_key(markets(cfg, kimchi_books(NOW)))) == []
    record = await store.get(conn, plan.transfer_id)
    assert record is not None and record.state == "failed" and "upbit KRW: need" in record.reason
    assert [s.state for s in record.steps] == ["pending", "pending"]
    assert await balances(conn, namespace) == before


async def test_a_withdrawal_after_a_thinner_conversion_sends_what_arrived_net_of_its_fee(
    conn: psycopg.AsyncConnection, namespace: str
) -> None:
    cfg = config()
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    worse = [b for b in kimchi_books(NOW) if b.symbol != "USDT/KRW"] + [
        book("upbit", "USDT/KRW", 1399, 1400, 100_000, NOW)]  # USDT got dearer since planning
    await runner(cfg, store, namespace).advance(conn, NOW + 1, by_key(markets(cfg, worse)))
    record = await store.get(conn, plan.transfer_id)
    assert record is not None and record.state == "sent"
    converted = record.steps[0].credited
    assert converted is not None and converted < plan.steps()[0].amount_out
    withdrawal = record.steps[1]
    assert withdrawal.debited == converted  # all of it: amount + fee
    assert withdrawal.step.fee == D("1") and withdrawal.step.amount == converted - 1
    assert (await balances(conn, namespace))[("upbit", "USDT")] == 0


def test_fit_withdrawal_takes_the_largest_amount_whose_fee_fits() -> None:
    assert fit_withdrawal(D("100"), D("1"), D("0"), D("0.01")) == (D("99"), D("1"))
    amount, fee = fit_withdrawal(D("100"), D("1"), D("0.001"), D("0.00000001"))
    assert amount + fee <= 100 and amount + fee > D("99.9999999")
    assert fit_withdrawal(D("0.5"), D("1"), D("0"), D("0.01")) == (D(0), D(0))


async def test_every_state_change_is_published_once_in_order(
    conn: psycopg.AsyncConnection, namespace: str, bus: Bus
) -> None:
    cfg = config()
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    assert await store.publish_pending(conn, bus) == 2
    assert await store.publish_pending(conn, bus) == 0
    await store.transition(conn, plan.transfer_id, "cancelled", reason="no longer needed", actor="bob",
                           now_ns=NOW + 5)
    assert await store.publish_pending(conn, bus) == 1
    entries = await bus.redis.xrange(bus.stream(TRANSFERS))
    sent = [msgspec.json.decode(fields[FIELD], type=Transfer) for _, fields in entries]
    assert [(t.transfer_id, t.state) for t in sent] == [
        (plan.transfer_id, "planned"), (plan.transfer_id, "approved"), (plan.transfer_id, "cancelled")]
    assert sent[-1].reason == "no longer needed" and sent[-1].mode == "paper"
    assert sent[0].steps == plan.steps() and sent[0].expected_cost == pytest.approx(float(plan.expected_cost))


async def test_the_state_machine_refuses_what_it_does_not_allow(conn: psycopg.AsyncConnection,
                                                                namespace: str) -> None:
    cfg = config()
    await with_start_balances(conn, namespace)
    store = TransferStore(namespace, "paper", "USDT")
    plan = usdt_plan(cfg)
    await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW)
    with pytest.raises(IllegalTransition, match="is approved: cannot become approved"):
        await store.transition(conn, plan.transfer_id, "approved", reason="again", actor="x", now_ns=NOW)
    await runner(cfg, store, namespace).advance(conn, NOW + 1, by_key(markets(cfg, kimchi_books(NOW))))
    with pytest.raises(IllegalTransition, match="is sent: cannot become cancelled"):
        await store.transition(conn, plan.transfer_id, "cancelled", reason="too late", actor="x", now_ns=NOW)
    assert await guard_and_record(store, conn, plan, cfg.rebalancer, "paper", NOW) == (None, "approved",
                                                                                       "paper: auto-approved")
