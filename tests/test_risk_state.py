"""The risk state: Lua in Redis and the in-memory reference decide identically; nothing drifts."""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError
from risk_support import execution, fx, risk_config, spatial

from services.risk import reasons
from services.risk.core import Assessment, RiskBook, RiskEngine, Verdict
from services.risk.limits import RiskLimits
from services.risk.redis_state import Publication, PublishTargets, RedisRiskState
from services.risk.state import DecideOutcome, MemoryRiskState, StateDump, StateNotReady, record_pairs
from shared.models import Balance, OrderIntent, Residual, Signal, encode
from shared.runtime import FIELD, Bus, ensure_group
from shared.streams import DECISIONS, ORDERS, SIGNALS, Group, KeySpace

T0 = 1_700_000_000_000_000_000
TIGHT: dict[str, Any] = dict(
    max_notional_per_trade=1_500.0, max_open_arbitrages=6, daily_loss_limit=40.0, max_drawdown=0.003,
    circuit_breaker_losses=3, circuit_breaker_halt_s=2.0, venue_pair_cooldown_ms=300, loss_cooldown_ms=500,
    max_signal_age_ms=2_000, max_book_age_ms=2_000, max_fx_age_ms=5_000, order_rate_limit=3,
    order_rate_window_ms=1_000, require_balances=True, intent_ttl_ms=1_000, reservation_grace_ms=1_000,
    verdict_retention_s=30, price_window_s=10.0, max_price_deviation=0.05, max_venue_deviation=0.08,
    residual_halt_notional=50.0, restore_margin_ms=1_000,
    portfolio={"max_total_exposure": 5_000.0, "max_exposure_per_coin": 3_000.0, "max_exposure_per_exchange": 2_500.0},
    symbols={"ETH": {"max_exposure": 1_500.0, "max_notional_per_trade": 900.0, "cooldown_ms": 200}},
)


async def fresh_redis_state(bus: Bus) -> RedisRiskState:
    state = RedisRiskState(bus)
    await bus.redis.delete(state.keys.halt)  # a restore keeps a kill switch that is set
    await state.restore(StateDump(ts_ms=0))
    await state.mark_initialised("test")
    return state


async def decide_in_redis(book: RiskBook, state: RedisRiskState, signal: Signal, now_ns: int) -> Verdict:
    assessed = book.assess(signal, now_ns)
    if not isinstance(assessed, Assessment):
        return book.rejected(signal, assessed, now_ns)
    return book.decided(signal, assessed, await state.decide(assessed.request), now_ns)


def scenario(variant: int, n: int) -> list[tuple[str, Any, int]]:
    """A random but reproducible stream of inputs that walks into every guard."""
    rng = random.Random(variant)
    now = T0
    venues = ["binance", "okx", "bybit"]
    plenty = {"USDT": 50_000, "BTC": 2, "ETH": 40, "KRW": 50_000_000}
    out: list[tuple[str, Any, int]] = [("fx", fx(1380.0, now), now)]
    out += [("balance", Balance(exchange=ex, asset=a, free=Decimal(q), ts_ns=now), now)
            for ex in [*venues, "upbit"] for a, q in plenty.items()]
    for i in range(n):
        now += rng.randrange(0, 250_000_000)
        if rng.random() < 0.01:
            now += 86_400 * 10**9  # a new trading day
        roll = rng.random()
        if roll < 0.62:
            asset = rng.choice(["BTC", "BTC", "ETH"])
            base = 60_000 if asset == "BTC" else 3_000
            a, b = rng.sample(venues, 2)
            qty = Decimal(rng.choice(["0.002", "0.005", "0.01", "0.02"])) * (20 if asset == "ETH" else 1)
            price = Decimal(base) * (1 + Decimal(rng.randrange(-30, 30)) / 1000)
            if rng.random() < 0.04:
                price *= Decimal("1.3")  # flash crash / spike
            sell = price * (1 + Decimal(rng.randrange(1, 20)) / 10_000)
            ts = now - (rng.randrange(0, 3_000_000_000) if rng.random() < 0.08 else rng.randrange(0, 5_000_000))
            kwargs: dict[str, Any] = dict(asset=asset, buy=(a, price.quantize(Decimal("0.01"))),
                                          sell=(b, sell.quantize(Decimal("0.01"))), qty=qty, ts_ns=ts,
                                          signal_id=f"s{variant}-{i}")
            if rng.random() < 0.1:
                kwargs.update(buy=("upbit", (price * 1380).quantize(Decimal(1))), quote="KRW", sell_quote="USDT")
            if rng.random() < 0.03:
                kwargs["qty"] = "-1"
            out.append(("signal", spatial(**kwargs), now))
            if rng.random() < 0.03:  # the same signal delivered again
                out.append(("signal", out[-1][1], now + 1_000_000))
        elif roll < 0.84:
            out.append(("execution", (rng.random(), rng.choice(["-9", "-4", "-1.5", "0", "2", "6.25", "8", "-12"]),
                                      rng.random() < 0.05), now))
        elif roll < 0.90:
            ex = rng.choice([*venues, "upbit"])
            asset = rng.choice(list(plenty))
            scale = Decimal(plenty[asset]) * Decimal(rng.choice(["0.001", "0.2", "1"]))
            out.append(("balance", Balance(exchange=ex, asset=asset, free=scale,
                                           ts_ns=now - rng.randrange(0, 10**9)), now))
        elif roll < 0.94:
            out.append(("fx", fx(1380.0 + rng.randrange(-5, 5), now - rng.randrange(0, 6 * 10**9)), now))
        elif roll < 0.97:
            out.append(("expire", None, now))
        elif roll < 0.975:
            out.append(("halt", None, now))
        else:
            out.append(("resume", rng.random() < 0.7, now))
    return out


async def test_memory_and_redis_states_decide_identically(bus: Bus) -> None:
    seen: Counter[str] = Counter()
    for variant in (2, 5):
        seen += await run_both(bus, variant)
    # The scenarios are only worth something if they walked into the guards.
    for reason in (reasons.APPROVED, reasons.INVALID, reasons.STALE_SIGNAL, reasons.STALE_FX, reasons.ANOMALY,
                   reasons.HALTED, reasons.CIRCUIT_BREAKER, reasons.ORDER_RATE, reasons.MAX_OPEN,
                   reasons.BALANCE, reasons.COOLDOWN_VENUE, reasons.MAX_NOTIONAL, reasons.DAILY_LOSS,
                   reasons.DRAWDOWN, reasons.COOLDOWN_SYMBOL):
        assert seen[reason] > 0, (reason, seen)
    assert sum(seen[r] for r in (reasons.EXPOSURE_TOTAL, reasons.EXPOSURE_COIN, reasons.EXPOSURE_EXCHANGE)) > 0, seen


async def run_both(bus: Bus, variant: int) -> Counter[str]:
    """One scenario through the memory engine and through Redis: every output and the final state agree."""
    limits = RiskLimits.from_config(risk_config(**TIGHT))
    engine = RiskEngine(limits, env="test", session="diff")
    book = RiskBook(limits, env="test", session="diff")
    redis_state = await fresh_redis_state(bus)
    seen: Counter[str] = Counter()
    approved: list[str] = []
    for kind, item, now in scenario(variant=variant, n=900):
        if kind == "signal":
            mine = engine.check(item, now)
            theirs = await decide_in_redis(book, redis_state, item, now)
            assert msgspec.json.encode(mine.decision) == msgspec.json.encode(theirs.decision)
            assert msgspec.json.encode(mine.intent) == msgspec.json.encode(theirs.intent)
            seen[mine.decision.reason] += 1
            if mine.intent is not None:
                approved.append(mine.intent.arb_id)
        elif kind == "execution" and approved:
            pick, pnl, residual = item
            arb = approved[int(pick * len(approved))]
            residuals = [Residual(exchange="okx", asset="BTC", quantity=Decimal("0.01"))] if residual else []
            ex = execution(arb, pnl, ts_ns=now, residuals=residuals)
            request = engine.book.settlement(ex)
            assert request == book.settlement(ex)
            assert engine.state.settle(request) == await redis_state.settle(request)
        elif kind == "balance":
            units = engine.book.balance_units(item)
            assert units is not None
            assert engine.state.set_balance(item.exchange, item.asset, units, item.ts_ns) == \
                await redis_state.set_balance(item.exchange, item.asset, units, item.ts_ns)
        elif kind == "fx":
            engine.on_fx(item)
            book.on_fx(item)
        elif kind == "expire":
            assert engine.state.expire(now // 10**6) == await redis_state.expire(now // 10**6)
        elif kind == "halt":
            assert engine.state.set_halt('{"source": "manual", "reason": "test"}') == \
                await redis_state.set_halt('{"source": "manual", "reason": "test"}')
        elif kind == "resume":
            assert engine.state.clear_halt(guards=item) == await redis_state.clear_halt(guards=item)
    assert engine.state.dump(0).comparable() == (await redis_state.dump()).comparable()
    return seen


def assert_counters_match_reservations(dump: StateDump) -> None:
    expected: Counter[str] = Counter()
    for record in dump.reservations.values():
        for name, units in record_pairs(record):
            expected[name] += units
    held = {k: int(v) for k, v in dump.state.items()
            if k == "open" or k.startswith(("x:", "rb:"))}
    assert held == {k: v for k, v in expected.items() if v}


async def test_reserved_counters_always_equal_the_open_reservations(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config(**{**TIGHT, "require_balances": False}))
    book = RiskBook(limits, env="test", session="drift")
    state = await fresh_redis_state(bus)
    rng = random.Random(3)
    now = T0
    open_arbs: list[str] = []
    for i in range(300):
        now += rng.randrange(0, 100_000_000)
        signal = spatial(buy=("binance", "60000.01"), sell=("okx", "60010.37"),
                         qty=rng.choice(["0.00123", "0.007", "0.0191"]), ts_ns=now, signal_id=f"d{i}")
        verdict = await decide_in_redis(book, state, signal, now)
        if verdict.intent is not None:
            open_arbs.append(verdict.intent.arb_id)
        if open_arbs and rng.random() < 0.4:
            arb = open_arbs.pop(rng.randrange(len(open_arbs)))
            await state.settle(book.settlement(execution(arb, "0.5", ts_ns=now)))
        if rng.random() < 0.05:
            await state.expire(now // 10**6)
        assert_counters_match_reservations(await state.dump())
    for arb in open_arbs:
        await state.settle(book.settlement(execution(arb, "0", ts_ns=now)))
    await state.expire(now // 10**6 + 10**9)
    dump = await state.dump()
    assert not dump.reservations
    assert not [k for k in dump.state if k == "open" or k.startswith(("x:", "rb:"))]


async def test_a_redelivered_signal_reserves_once_and_gets_the_same_verdict(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config(max_open_arbitrages=1))
    book = RiskBook(limits, env="test", session="redeliver")
    state = await fresh_redis_state(bus)
    signal = spatial(ts_ns=T0)
    first = await decide_in_redis(book, state, signal, T0)
    again = await decide_in_redis(book, state, signal, T0 + 5 * 10**9)
    assert first.decision.reason == again.decision.reason == reasons.APPROVED
    assert first.intent == again.intent  # same arb id, client order ids, expiry
    assert (await state.dump()).state["open"] == "1"
    other = await decide_in_redis(book, state, spatial(ts_ns=T0), T0)
    assert other.decision.reason == reasons.MAX_OPEN


async def test_an_execution_delivered_twice_counts_its_pnl_once(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config())
    book = RiskBook(limits, env="test", session="twice")
    state = await fresh_redis_state(bus)
    verdict = await decide_in_redis(book, state, spatial(ts_ns=T0), T0)
    assert verdict.intent is not None
    ex = execution(verdict.intent.arb_id, "-3.5", ts_ns=T0)
    first = await state.settle(book.settlement(ex))
    second = await state.settle(book.settlement(ex))
    assert first.released and not first.duplicate and first.total_pnl == -350_000_000
    assert second.duplicate
    assert (await state.dump()).state["pnl:total"] == "-350000000"


async def test_an_expired_reservation_is_released_and_a_late_execution_still_counts(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config(intent_ttl_ms=1_000, reservation_grace_ms=500))
    book = RiskBook(limits, env="test", session="expiry")
    state = await fresh_redis_state(bus)
    verdict = await decide_in_redis(book, state, spatial(ts_ns=T0), T0)
    assert verdict.intent is not None and verdict.intent.expires_ns == T0 + 10**9
    assert await state.expire(T0 // 10**6 + 1_499) == []
    assert await state.expire(T0 // 10**6 + 1_500) == [verdict.intent.arb_id]
    dump = await state.dump()
    assert "open" not in dump.state and not dump.reservations
    late = await state.settle(book.settlement(execution(verdict.intent.arb_id, "-2", ts_ns=T0 + 3 * 10**9)))
    assert not late.released and late.total_pnl == -200_000_000


async def test_the_state_refuses_to_decide_once_redis_lost_it(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config())
    book = RiskBook(limits, env="test", session="lost")
    state = RedisRiskState(bus)
    assessed = book.assess(spatial(ts_ns=T0), T0)
    assert isinstance(assessed, Assessment)
    with pytest.raises(StateNotReady):
        await state.decide(assessed.request)
    with pytest.raises(StateNotReady):
        await state.settle(book.settlement(execution("x", "1", ts_ns=T0)))


async def _publishing_state(bus: Bus) -> RedisRiskState:
    state = await fresh_redis_state(bus)
    state.publish = PublishTargets(signals=bus.stream(SIGNALS), group=Group.RISK, orders=bus.stream(ORDERS),
                                   decisions=bus.stream(DECISIONS), decisions_maxlen=1000)
    await ensure_group(bus, SIGNALS, Group.RISK)
    return state


async def _delivered(bus: Bus, *signals: Signal) -> list[bytes]:
    for s in signals:
        await bus.redis.xadd(bus.stream(SIGNALS), {FIELD: encode(s)})
    reply: Any = await bus.redis.xreadgroup(Group.RISK, "test", {bus.stream(SIGNALS): ">"})
    return [entry_id for _, entries in reply for entry_id, _ in entries]


async def _pending(bus: Bus) -> set[bytes]:
    rows = await bus.redis.xpending_range(bus.stream(SIGNALS), Group.RISK, min="-", max="+", count=100)
    return {r["message_id"] for r in rows}


async def test_an_approval_is_published_and_its_signal_acknowledged_by_the_step_that_reserves_it(bus: Bus) -> None:
    book = RiskBook(RiskLimits.from_config(risk_config(max_open_arbitrages=1)), env="test", session="pub")
    state = await _publishing_state(bus)
    signals = [spatial(ts_ns=T0, signal_id="first"), spatial(ts_ns=T0, signal_id="second")]
    entries = await _delivered(bus, *signals)
    assessed = [book.assess(s, T0) for s in signals]
    assert all(isinstance(a, Assessment) for a in assessed)
    approvals = [book.approval(s, cast(Assessment, a), T0) for s, a in zip(signals, assessed, strict=True)]
    pubs = [Publication(e, encode(cast(OrderIntent, v.intent)), encode(v.decision))
            for e, v in zip(entries, approvals, strict=True)]
    requests = [cast(Assessment, a).request for a in assessed]
    first, second = await state.decide_many(requests, pubs)
    assert isinstance(first, DecideOutcome) and first.approved and first.published
    assert isinstance(second, DecideOutcome) and second.reason == reasons.MAX_OPEN and not second.published
    # exactly what the core would publish for the first, nothing for the second (the caller's to publish)
    assert [f[FIELD] for _, f in await bus.redis.xrange(bus.stream(ORDERS))] == [pubs[0].intent]
    assert [f[FIELD] for _, f in await bus.redis.xrange(bus.stream(DECISIONS))] == [pubs[0].decision]
    assert approvals[0].decision == book.decided(signals[0], cast(Assessment, assessed[0]), first, T0).decision
    assert await _pending(bus) == {entries[1]}
    again = await state.decide_many(requests[:1], pubs[:1])  # redelivered: the stored verdict, published once
    assert isinstance(again[0], DecideOutcome) and again[0].duplicate and not again[0].published
    assert await bus.redis.xlen(bus.stream(ORDERS)) == 1 and await bus.redis.xlen(bus.stream(DECISIONS)) == 1


async def test_a_refused_publication_leaves_no_reservation_and_the_signal_pending(bus: Bus) -> None:
    book = RiskBook(RiskLimits.from_config(risk_config()), env="test", session="pub")
    state = await _publishing_state(bus)
    signal = spatial(ts_ns=T0)
    entries = await _delivered(bus, signal)
    await bus.redis.set(bus.stream(DECISIONS), "not a stream")  # every XADD there fails
    assessed = book.assess(signal, T0)
    assert isinstance(assessed, Assessment)
    verdict = book.approval(signal, assessed, T0)
    [outcome] = await state.decide_many(
        [assessed.request], [Publication(entries[0], encode(cast(OrderIntent, verdict.intent)), b"{}")])
    assert isinstance(outcome, ResponseError)
    dump = await state.dump()
    assert "open" not in dump.state and not dump.reservations and not dump.verdicts
    assert await bus.redis.xlen(bus.stream(ORDERS)) == 0
    assert await _pending(bus) == {entries[0]}


async def test_a_dump_restores_to_the_same_state(bus: Bus, redis_url: str, namespace: str) -> None:
    limits = RiskLimits.from_config(risk_config(**TIGHT))
    book = RiskBook(limits, env="test", session="dump")
    state = await fresh_redis_state(bus)
    engine = RiskEngine(limits, env="test", session="dump")
    for kind, item, now in scenario(variant=11, n=250):
        if kind == "signal":
            await decide_in_redis(book, state, item, now)
            engine.check(item, now)
        elif kind == "fx":
            book.on_fx(item)
            engine.on_fx(item)
        elif kind == "balance":
            units = book.balance_units(item)
            assert units is not None
            await state.set_balance(item.exchange, item.asset, units, item.ts_ns)
    dump = await state.dump()
    other_bus = Bus.from_url(redis_url, prefix=f"{namespace}b:", keys=type(bus.keys)("test", namespace + "b"))
    try:
        other = RedisRiskState(other_bus)
        await other.restore(msgspec.json.decode(msgspec.json.encode(dump), type=StateDump))
        assert (await other.dump()).comparable() == dump.comparable()
        assert not await other.initialised()  # the restorer marks it once the streams are replayed
        assert MemoryRiskState.load(dump).dump(0).comparable() == dump.comparable()
    finally:
        await other_bus.redis.delete(*other.keys.all())
        await other_bus.close()


# ------------------------------------------------------------------ property: limits are never passed

LIMITS = RiskLimits.from_config(risk_config(**{**TIGHT, "require_balances": False, "max_drawdown": 0.9,
                                               "daily_loss_limit": 5_000.0, "circuit_breaker_losses": 1000}))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["signal", "settle", "expire"]),
                          st.sampled_from(["BTC", "ETH"]),
                          st.sampled_from(["binance", "okx", "bybit"]),
                          st.integers(1, 40),
                          st.integers(0, 400)), min_size=1, max_size=80))
def test_reserved_exposure_never_passes_a_limit(ops: list[tuple[str, str, str, int, int]]) -> None:
    engine = RiskEngine(LIMITS, env="test", session="prop")
    now = T0
    open_arbs: list[str] = []
    for i, (kind, asset, venue, size, dt_ms) in enumerate(ops):
        now += dt_ms * 1_000_000
        if kind == "signal":
            other = "okx" if venue != "okx" else "bybit"
            base = 60_000 if asset == "BTC" else 3_000
            qty = Decimal(size) / (1000 if asset == "BTC" else 50)
            v = engine.check(spatial(asset=asset, buy=(venue, base), sell=(other, base + 1), qty=qty, ts_ns=now,
                                     signal_id=f"p{i}"), now)
            if v.intent is not None:
                open_arbs.append(v.intent.arb_id)
        elif kind == "settle" and open_arbs:
            engine.on_execution(execution(open_arbs.pop(size % len(open_arbs)), "1", ts_ns=now))
        else:
            engine.expire(now)
        s = {k: int(v) for k, v in engine.state.state.items() if k == "open" or k.startswith("x:")}
        assert s.get("open", 0) <= LIMITS.max_open_arbitrages
        assert s.get("x:total", 0) <= LIMITS.max_total_exposure
        for a in ("BTC", "ETH"):
            assert s.get(f"x:coin:{a}", 0) <= LIMITS.for_asset(a).max_exposure
        for ex in ("binance", "okx", "bybit"):
            assert s.get(f"x:ex:{ex}", 0) <= LIMITS.exchange_cap(ex)
        assert_counters_match_reservations(engine.state.dump(0))


async def test_after_a_restore_without_verdicts_a_redelivered_signal_still_reserves_once(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config())
    book = RiskBook(limits, env="test", session="forgot")
    state = await fresh_redis_state(bus)
    memory = MemoryRiskState()
    open_one, done_one = spatial(ts_ns=T0), spatial(ts_ns=T0)
    for s in (open_one, done_one):
        assert (await decide_in_redis(book, state, s, T0)).intent is not None
        assessed = book.assess(s, T0)
        assert isinstance(assessed, Assessment) and memory.decide(assessed.request).approved
    done = book.settlement(execution(book.arb_id(done_one.signal_id), "1", ts_ns=T0))
    await state.settle(done)
    memory.settle(done)
    snapshot = await state.dump(verdicts=False)  # what PostgreSQL gets
    assert not snapshot.verdicts and snapshot.reservations
    await state.restore(snapshot)
    await state.mark_initialised("test")
    memory = MemoryRiskState.load(snapshot)
    for s, finished in ((open_one, False), (done_one, True)):
        again = await decide_in_redis(book, state, s, T0 + 10**9)
        assert (again.decision.reason, again.intent is None) == (reasons.APPROVED, finished)
        assessed = book.assess(s, T0 + 10**9)
        assert isinstance(assessed, Assessment)
        outcome = memory.decide(assessed.request)
        assert (outcome.duplicate, outcome.finished) == (True, finished)
    dump = await state.dump()
    assert dump.state["open"] == "1" and len(dump.reservations) == 1
    assert memory.dump(0).comparable() == dump.comparable()


async def test_replaying_the_same_decisions_twice_changes_nothing(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config(venue_pair_cooldown_ms=1_000))
    book = RiskBook(limits, env="test", session="replay")
    state = await fresh_redis_state(bus)
    decisions = []
    for i in range(5):
        v = await decide_in_redis(book, state, spatial(buy=("binance", 60_000), sell=(["okx", "bybit"][i % 2], 60_050),
                                                       ts_ns=T0 + i * 10**9), T0 + i * 10**9)
        decisions.append(v.decision)
    original = (await state.dump()).comparable()
    await state.restore(StateDump(ts_ms=0))
    memory = MemoryRiskState()
    for _ in range(2):
        for d in decisions:
            stored = f"{d.reason}\x1f{d.ts_ns}\x1f0\x1f0\x1f\x1f\x1f\x1f"
            reservation = d.reservation if d.approved else None
            await state.apply_decision(d.signal_id, stored, d.ts_ns // 10**6, reservation)
            memory.apply_decision(d.signal_id, stored, d.ts_ns // 10**6, reservation)
    replayed = (await state.dump()).comparable()
    assert memory.dump(0).comparable() == replayed
    assert {k: v for k, v in replayed.state.items() if k != "ver"} == \
        {k: v for k, v in original.state.items() if k != "ver"}
    assert replayed.reservations == original.reservations and replayed.cooldowns == original.cooldowns
    # Replay does not prune the order-rate windows (the next decision does): a superset, same scores.
    for exchange, members in original.orders.items():
        assert members.items() <= replayed.orders[exchange].items()


async def test_a_late_execution_of_yesterday_counts_in_the_total_but_not_in_today(bus: Bus) -> None:
    limits = RiskLimits.from_config(risk_config(daily_loss_limit=10.0))
    book = RiskBook(limits, env="test", session="late")
    state = await fresh_redis_state(bus)
    memory = MemoryRiskState()
    day = 86_400 * 10**9
    settles = [book.settlement(execution(f"a{i}", pnl, ts_ns=T0 + ts)) for i, (pnl, ts) in
               enumerate((("-6", day), ("-8", 0), ("-3", day + 10**9)))]  # today, yesterday (late), today
    for req in settles:
        assert memory.settle(req) == await state.settle(req)
    dump = await state.dump()
    assert dump.state["pnl:daily"] == "-900000000" and dump.state["pnl:total"] == "-1700000000"
    assert memory.dump(0).comparable() == dump.comparable()
    assessed = book.assess(spatial(ts_ns=T0 + day + 2 * 10**9), T0 + day + 2 * 10**9)
    assert isinstance(assessed, Assessment)
    assert (await state.decide(assessed.request)).approved  # -9 today: above the -10 limit


async def test_decisions_survive_redis_losing_its_script_cache(tmp_path: Path) -> None:
    from shared.embedded import start_redis

    server = start_redis(tmp_path)  # a private Redis: SCRIPT FLUSH must not touch a shared one
    bus = Bus.from_url(server.url, keys=KeySpace("development", "scripts"))
    try:
        book = RiskBook(RiskLimits.from_config(risk_config()), env="development", session="scripts")
        state = await fresh_redis_state(bus)
        for batch in (1, 3):
            await bus.redis.script_flush()
            assessed = [book.assess(spatial(ts_ns=T0), T0) for _ in range(batch)]
            outcomes = await state.decide_many([a.request for a in assessed if isinstance(a, Assessment)])
            assert [getattr(o, "reason", o) for o in outcomes] == [reasons.APPROVED] * batch
        assert (await state.dump()).state["open"] == "4"
    finally:
        await bus.close()
        server.stop()
