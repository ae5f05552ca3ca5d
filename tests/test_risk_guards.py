"""One test per guard, through a running risk service on real Redis: the verdict's reason code,
and that nothing reached ``orders``."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import msgspec
from prometheus_client import REGISTRY
from risk_support import RiskHarness, StartRisk, execution, fx, leg, spatial, start_risk_fixture  # noqa: F401

from services.risk import reasons
from shared.models import Balance, Residual, Signal, encode
from shared.streams import BALANCES, EXECUTIONS, FX


async def assert_rejected(risk: RiskHarness, signal: Signal, reason: str) -> str:
    d = await risk.decide(signal)
    assert (d.approved, d.reason) == (False, reason), d.detail
    assert d.decision_id and d.signal_id == signal.signal_id
    assert not await risk.ordered(signal.signal_id)
    return d.detail


async def approve(risk: RiskHarness, signal: Signal) -> str:
    d = await risk.decide(signal)
    assert d.approved, (d.reason, d.detail)
    return risk.service.book.arb_id(signal.signal_id)  # type: ignore[no-any-return]


async def test_kill_switch_set_by_hand_rejects_with_halted(start_risk: StartRisk) -> None:
    risk = await start_risk()
    await risk.service.state.set_halt(json.dumps({"source": "manual", "reason": "maintenance"}))
    detail = await assert_rejected(risk, spatial(), reasons.HALTED)
    assert "maintenance" in detail


async def test_residual_exposure_sets_the_kill_switch_automatically(start_risk: StartRisk) -> None:
    risk = await start_risk(residual_halt_notional=10.0)
    arb = await approve(risk, spatial())
    residual = Residual(exchange="okx", asset="BTC", quantity=Decimal("0.01"))
    await risk.publish(EXECUTIONS, execution(arb, "-1.2", status="unwound", residuals=[residual]))
    await risk.until(lambda: risk.bus.redis.exists(risk.service.state.keys.halt))
    detail = await assert_rejected(risk, spatial(), reasons.HALTED)
    assert "residual" in detail
    assert any(a.kind == "kill_switch" and a.severity == "critical" for a in await risk.alerts())


async def test_stale_book_is_rejected(start_risk: StartRisk) -> None:
    risk = await start_risk(max_book_age_ms=500)
    await assert_rejected(risk, spatial(book_age_ns=800_000_000), reasons.STALE_BOOK)


async def test_stale_signal_is_rejected(start_risk: StartRisk) -> None:
    risk = await start_risk(max_signal_age_ms=1_000)
    await assert_rejected(risk, spatial(ts_ns=time.time_ns() - 3_000_000_000), reasons.STALE_SIGNAL)


async def test_stale_or_missing_fx_rejects_a_krw_leg(start_risk: StartRisk) -> None:
    krw = dict(buy=("upbit", 83_000_000), quote="KRW", sell_quote="USDT")
    risk = await start_risk(max_fx_age_ms=10_000)
    detail = await assert_rejected(risk, spatial(**krw), reasons.STALE_FX)  # type: ignore[arg-type]
    assert "no USDT/KRW rate" in detail
    await risk.publish(FX, fx(1385.0, ts_ns=time.time_ns() - 30_000_000_000))
    await risk.until(lambda: _has_fx(risk))
    detail = await assert_rejected(risk, spatial(**krw), reasons.STALE_FX)  # type: ignore[arg-type]
    assert "old" in detail
    await risk.publish(FX, fx(1385.0))
    await risk.until(lambda: _fresh_fx(risk))
    await approve(risk, spatial(**krw))  # type: ignore[arg-type]


async def _has_fx(risk: RiskHarness) -> bool:
    return bool(risk.service.book.market.fx)


async def _fresh_fx(risk: RiskHarness) -> bool:
    quote = risk.service.book.market.fx_quote("KRW")
    return quote is not None and time.time_ns() - quote.ts_ns < 5_000_000_000


async def test_notional_over_the_per_trade_limit_is_rejected(start_risk: StartRisk) -> None:
    risk = await start_risk(max_notional_per_trade=500.0, symbols={"ETH": {"max_notional_per_trade": 100.0}})
    await assert_rejected(risk, spatial(qty="0.01"), reasons.MAX_NOTIONAL)  # 600 USDT
    await approve(risk, spatial(qty="0.008"))  # 480 USDT
    await assert_rejected(risk, spatial(asset="ETH", buy=("binance", 3000), sell=("okx", 3001), qty="0.05"),
                          reasons.MAX_NOTIONAL)  # 150 USDT > the ETH override


async def test_exposure_per_coin_is_capped(start_risk: StartRisk) -> None:
    risk = await start_risk(portfolio={"max_exposure_per_coin": 1_000.0})
    await approve(risk, spatial())
    await assert_rejected(risk, spatial(buy=("bybit", 60_000), sell=("binance", 60_050)), reasons.EXPOSURE_COIN)
    await approve(risk, spatial(asset="ETH", buy=("bybit", 3000), sell=("binance", 3001), qty="0.2"))


async def test_exposure_per_exchange_is_capped(start_risk: StartRisk) -> None:
    risk = await start_risk(portfolio={"max_exposure_per_exchange": 1_000.0, "exchanges": {"bybit": 500.0}})
    await approve(risk, spatial())  # binance 600, okx 600.6
    detail = await assert_rejected(risk, spatial(asset="ETH", buy=("binance", 3000), sell=("bybit", 3001), qty="0.2"),
                                   reasons.EXPOSURE_EXCHANGE)
    assert "x:ex:binance 600.00 + 600.00 > 1000.00" in detail
    detail = await assert_rejected(risk, spatial(asset="ETH", buy=("bybit", 3000), sell=("okx", 3001), qty="0.2"),
                                   reasons.EXPOSURE_EXCHANGE)
    assert "x:ex:bybit 0.00 + 600.00 > 500.00" in detail  # the per-exchange override
    await approve(risk, spatial(asset="ETH", buy=("bybit", 3000), sell=("okx", 3001), qty="0.1"))


async def test_total_exposure_is_capped(start_risk: StartRisk) -> None:
    risk = await start_risk(portfolio={"max_total_exposure": 1_500.0, "max_exposure_per_coin": 1_500.0,
                                       "max_exposure_per_exchange": 1_500.0})
    await approve(risk, spatial())
    await approve(risk, spatial(asset="ETH", buy=("bybit", 3000), sell=("okx", 3001), qty="0.2"))
    await assert_rejected(risk, spatial(buy=("bybit", 60_000), sell=("binance", 60_050)), reasons.EXPOSURE_TOTAL)


async def test_open_arbitrages_are_capped(start_risk: StartRisk) -> None:
    risk = await start_risk(max_open_arbitrages=2)
    first = await approve(risk, spatial())
    await approve(risk, spatial())
    await assert_rejected(risk, spatial(), reasons.MAX_OPEN)
    await risk.publish(EXECUTIONS, execution(first, "0.4"))  # releases one
    await risk.until(lambda: _open_count(risk, 1))
    await approve(risk, spatial())


async def _open_count(risk: RiskHarness, n: int) -> bool:
    return bool(await risk.bus.redis.hget(risk.service.state.keys.state, "open") == str(n).encode())


async def test_insufficient_or_unknown_balance_is_rejected(start_risk: StartRisk) -> None:
    risk = await start_risk(require_balances=True)
    now = time.time_ns()
    await risk.publish(BALANCES, Balance(exchange="binance", asset="USDT", free=Decimal("1000"), ts_ns=now),
                       Balance(exchange="okx", asset="BTC", free=Decimal("0.015"), ts_ns=now))
    await risk.until(lambda: _balances_known(risk, 2))
    await approve(risk, spatial())  # needs 600.6 USDT on binance (taker fee included), 0.01 BTC on okx
    detail = await assert_rejected(risk, spatial(), reasons.BALANCE)  # 1000 - 600.6 < 600.6
    assert "binance:USDT" in detail
    detail = await assert_rejected(risk, spatial(buy=("bybit", 60_000)), reasons.BALANCE)
    assert "no balance known" in detail


async def test_amounts_planned_for_withdrawal_are_not_available_to_trade(start_risk: StartRisk) -> None:
    risk = await start_risk(require_balances=True)
    now = time.time_ns()
    await risk.publish(BALANCES, Balance(exchange="binance", asset="USDT", free=Decimal("1000"), ts_ns=now),
                       Balance(exchange="okx", asset="BTC", free=Decimal("0.05"), ts_ns=now))
    await risk.until(lambda: _balances_known(risk, 2))
    # The rebalancer plans to withdraw 500 USDT from binance: 500 left, less than the 600.6 needed.
    await risk.bus.redis.hset(risk.bus.keys.transfers_in_flight("binance"), "outgoing:USDT", "500")
    await risk.until(lambda: _binance_usdt_is(risk, 500))
    detail = await assert_rejected(risk, spatial(), reasons.BALANCE)
    assert "binance:USDT" in detail
    await risk.bus.redis.delete(risk.bus.keys.transfers_in_flight("binance"))  # transfer cancelled
    await risk.until(lambda: _binance_usdt_is(risk, 1000))
    await approve(risk, spatial())


async def _binance_usdt_is(risk: RiskHarness, usdt: int) -> bool:
    raw = await risk.bus.redis.hget(risk.service.state.keys.balances, "b:binance:USDT")
    return raw is not None and int(raw) == usdt * 10**8  # risk counts in 1e-8 units


async def _balances_known(risk: RiskHarness, n: int) -> bool:
    return len(await risk.bus.redis.hgetall(risk.service.state.keys.balances)) == 2 * n


async def test_daily_loss_limit_stops_approvals_and_alerts(start_risk: StartRisk) -> None:
    risk = await start_risk(daily_loss_limit=10.0, daily_reset_timezone="Asia/Seoul")
    arb = await approve(risk, spatial())
    await risk.publish(EXECUTIONS, execution(arb, "-12.5"))
    await risk.until(lambda: _alerted(risk, "daily_loss"))
    detail = await assert_rejected(risk, spatial(), reasons.DAILY_LOSS)
    assert "-12.50" in detail


async def _alerted(risk: RiskHarness, kind: str) -> bool:
    return any(a.kind == kind for a in await risk.alerts())


async def test_drawdown_from_peak_equity_stops_approvals(start_risk: StartRisk) -> None:
    risk = await start_risk(starting_equity=1_000.0, max_drawdown=0.05, daily_loss_limit=500.0)
    win = await approve(risk, spatial())
    await risk.publish(EXECUTIONS, execution(win, "20"))  # peak 1020
    loss = await approve(risk, spatial())
    await risk.publish(EXECUTIONS, execution(loss, "-60"))  # 960: 5.9% below the peak
    await risk.until(lambda: _alerted(risk, "drawdown"))
    detail = await assert_rejected(risk, spatial(), reasons.DRAWDOWN)
    assert "below its peak 1020.00" in detail


async def test_consecutive_losses_open_the_circuit_breaker(start_risk: StartRisk) -> None:
    risk = await start_risk(circuit_breaker_losses=2, circuit_breaker_halt_s=600.0)
    for pnl in ("-1", "-2"):
        arb = await approve(risk, spatial())
        await risk.publish(EXECUTIONS, execution(arb, pnl))
    await risk.until(lambda: _alerted(risk, "circuit_breaker"))
    await assert_rejected(risk, spatial(), reasons.CIRCUIT_BREAKER)


async def test_symbol_cooldown_after_an_approval(start_risk: StartRisk) -> None:
    risk = await start_risk(symbol_cooldown_ms=60_000)
    await approve(risk, spatial())
    await assert_rejected(risk, spatial(buy=("bybit", 60_000), sell=("binance", 60_050)), reasons.COOLDOWN_SYMBOL)
    await approve(risk, spatial(asset="ETH", buy=("binance", 3000), sell=("okx", 3001), qty="0.2"))


async def test_venue_pair_cooldown_after_an_approval_and_after_a_loss(start_risk: StartRisk) -> None:
    risk = await start_risk(venue_pair_cooldown_ms=60_000, loss_cooldown_ms=60_000)
    await approve(risk, spatial())
    eth = dict(asset="ETH", qty="0.2")
    await assert_rejected(risk, spatial(buy=("okx", 3000), sell=("binance", 3001), **eth),  # type: ignore[arg-type]
                          reasons.COOLDOWN_VENUE)
    arb = await approve(risk, spatial(buy=("binance", 3000), sell=("bybit", 3001), **eth))  # type: ignore[arg-type]
    await risk.publish(EXECUTIONS, execution(arb, "-3", asset="ETH", venues=("binance", "bybit")))
    await risk.until(lambda: _open_count(risk, 1))
    await assert_rejected(risk, spatial(buy=("bybit", 60_000), sell=("binance", 60_050)), reasons.COOLDOWN_VENUE)


async def test_price_off_its_rolling_median_is_a_flash_crash(start_risk: StartRisk) -> None:
    risk = await start_risk(price_window_min_samples=5, max_price_deviation=0.02, max_venue_deviation=0.5)
    for _ in range(5):
        await approve(risk, spatial())
    detail = await assert_rejected(risk, spatial(buy=("binance", 54_000), sell=("okx", 60_060)), reasons.ANOMALY)
    assert "median" in detail
    assert any(a.kind == "guard_anomaly" for a in await risk.alerts())


async def test_venues_too_far_apart_is_a_flash_crash(start_risk: StartRisk) -> None:
    risk = await start_risk(max_venue_deviation=0.03)
    detail = await assert_rejected(risk, spatial(buy=("binance", 60_000), sell=("okx", 63_000)), reasons.ANOMALY)
    assert "apart" in detail


async def test_order_rate_is_limited_per_exchange(start_risk: StartRisk) -> None:
    risk = await start_risk(order_rate_limit=3, order_rate_window_ms=60_000)
    for _ in range(3):
        await approve(risk, spatial())
    detail = await assert_rejected(risk, spatial(buy=("bybit", 60_000), sell=("binance", 60_050)), reasons.ORDER_RATE)
    assert detail == "binance: 3 orders in the window + 1 > 3"


def _invalid_count() -> float:
    return REGISTRY.get_sample_value("arb_risk_decisions_total", {"reason": "invalid"}) or 0.0


async def test_malformed_signals_are_rejected_invalid_and_the_service_carries_on(start_risk: StartRisk) -> None:
    risk = await start_risk()
    before = _invalid_count()
    good = spatial()
    no_legs = msgspec.structs.replace(good, legs=[], signal_id="no-legs")
    one_leg = msgspec.structs.replace(good, legs=good.legs[:1], signal_id="one-leg")
    cases = {
        "no-legs": (no_legs, "at least 2 legs"),
        "one-leg": (one_leg, "at least 2 legs"),
        "negative": (spatial(qty="-0.01", signal_id="negative"), "quantity must be positive"),
        "zero-price": (spatial(buy=("binance", 0), signal_id="zero-price"), "price must be positive"),
        "nan-price": (spatial(buy=("binance", "NaN"), signal_id="nan-price", notional=600.0), "price must be positive"),
        "unknown-symbol": (spatial(asset="DOGE", signal_id="unknown-symbol"), "unknown symbol DOGE/USDT"),
        "disabled-exchange": (spatial(buy=("bithumb", 60_000), signal_id="disabled-exchange"), "bithumb"),
        "unknown-exchange": (spatial(buy=("ftx", 60_000), signal_id="unknown-exchange"), "ftx"),
    }
    for signal_id, (signal, words) in cases.items():
        detail = await assert_rejected(risk, signal, reasons.INVALID)
        assert words in detail, (signal_id, detail)
    # Payloads that do not even decode are answered too, not dead-lettered.
    raw = json.loads(encode(spatial(signal_id="missing-legs-field")))
    del raw["legs"]
    await risk.send(json.dumps(raw).encode(), b'{"type": "signal", "signal_id": "half"}', b"\xff not json")
    for signal_id in ("missing-legs-field", "half"):
        d = await risk.decision(signal_id)
        assert (d.approved, d.reason) == (False, reasons.INVALID)
        assert "undecodable" in d.detail
    await risk.until(lambda: _decided_entry_id(risk))
    assert not await risk.orders()
    await approve(risk, spatial())  # still deciding
    assert _invalid_count() - before == len(cases) + 3
    assert await risk.bus.redis.xlen(risk.bus.stream("dlq.signals")) == 0


async def _decided_entry_id(risk: RiskHarness) -> bool:
    decisions = await risk.read("decisions")
    return any(d.signal_id.startswith("entry:") for d in decisions)


def test_leg_builder_is_exact() -> None:
    assert leg("binance", "BTC/USDT", "buy", "60000.10", "0.01").price == Decimal("60000.10")


async def test_a_signal_whose_asset_is_not_traded_by_its_legs_is_invalid(start_risk: StartRisk) -> None:
    risk = await start_risk()
    s = spatial()
    for asset in ("ETH", "btc", "BTC FOO", "BTC\x1f1"):
        wrong = msgspec.structs.replace(s, asset=asset, signal_id=f"asset-{asset!r}")
        detail = await assert_rejected(risk, wrong, reasons.INVALID)
        assert "not traded by the legs" in detail


async def test_an_amount_too_large_for_the_counters_is_invalid(start_risk: StartRisk) -> None:
    risk = await start_risk(max_venue_deviation=0.5)
    tiny_price = spatial(buy=("binance", "0.0000000001"), sell=("okx", "0.0000000001"), qty="10000000000000",
                         notional=1.0)
    detail = await assert_rejected(risk, tiny_price, reasons.INVALID)
    assert "exceeds 1e9 units" in detail


async def test_a_state_redis_cannot_read_rejects_with_error_and_the_service_carries_on(start_risk: StartRisk) -> None:
    risk = await start_risk()
    key = risk.service.state.keys.state
    saved = await risk.bus.redis.hgetall(key)
    await risk.bus.redis.delete(key)
    await risk.bus.redis.set(key, "not a hash")  # e.g. an operator mistake
    detail = await assert_rejected(risk, spatial(), reasons.ERROR)
    assert "WRONGTYPE" in detail
    await risk.bus.redis.delete(key)
    await risk.bus.redis.hset(key, mapping=saved)
    assert (await risk.decide(spatial())).approved
