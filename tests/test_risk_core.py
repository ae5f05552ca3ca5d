"""The pure core: no Redis, no clock; what the backtest drives."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from risk_support import execution, fx, leg, risk_config, spatial

from services.risk import reasons
from services.risk.core import Assessment, Rejection, RiskEngine, _DayClock, day_label
from services.risk.limits import RiskLimits
from services.risk.market import PriceWindow
from services.risk.units import to_float, units_up
from shared.config import ConfigError
from shared.models import Balance, Instrument, Residual, Signal

T0 = 1_700_000_000_000_000_000


def engine(**risk: object) -> RiskEngine:
    return RiskEngine(RiskLimits.from_config(risk_config(**risk)))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4_000_000_000), st.sampled_from(["UTC", "Asia/Seoul", "America/New_York", "Europe/London",
                                                       "Australia/Lord_Howe"]))
def test_the_cached_trading_day_matches_the_time_zone_calendar(seconds: int, tz: str) -> None:
    limits = RiskLimits.from_config(risk_config(daily_reset_timezone=tz))
    clock = _DayClock(limits)
    for offset in (0, 1, 3599, 86_399, 86_400):
        now_ns = (seconds + offset) * 1_000_000_000
        assert clock.label(now_ns) == day_label(now_ns, limits)


def test_the_daily_loss_resets_at_midnight_of_the_configured_zone() -> None:
    e = engine(daily_loss_limit=10.0, daily_reset_timezone="Asia/Seoul")
    seoul = ZoneInfo("Asia/Seoul")
    before_midnight = int(datetime(2024, 5, 1, 23, 59, 0, tzinfo=seoul).timestamp() * 1e9)
    after_midnight = int(datetime(2024, 5, 2, 0, 0, 1, tzinfo=seoul).timestamp() * 1e9)
    v = e.check(spatial(ts_ns=before_midnight), before_midnight)
    assert v.intent is not None
    e.on_execution(execution(v.intent.arb_id, "-11", ts_ns=before_midnight))
    assert e.check(spatial(ts_ns=before_midnight + 10**9), before_midnight + 10**9).decision.reason == \
        reasons.DAILY_LOSS
    assert e.check(spatial(ts_ns=after_midnight), after_midnight).decision.approved


def test_a_krw_leg_is_valued_through_the_fx_rate() -> None:
    e = engine()
    e.on_fx(fx(1_400.0, ts_ns=T0))
    s = spatial(buy=("upbit", 84_000_000), quote="KRW", sell=("binance", 60_060), sell_quote="USDT", ts_ns=T0)
    v = e.check(s, T0)
    assert v.decision.approved
    assert v.decision.reservation is not None
    counters = v.decision.reservation.counters
    assert counters["x:ex:upbit"] == units_up(Decimal(840_000) / Decimal(1400))  # 600 USDT
    assert counters["x:total"] == units_up(Decimal("600.6"))
    # the buy leg needs KRW with Upbit's taker fee (0.05%); the sell leg needs the BTC itself
    assert counters["rb:upbit:KRW"] == units_up(Decimal(840_000) * Decimal("1.0005"))
    assert counters["rb:binance:BTC"] == units_up(Decimal("0.01"))


def test_a_leg_quoted_in_a_coin_is_valued_from_the_signal_itself() -> None:
    e = engine(max_venue_deviation=0.5)
    s = Signal(signal_id="tri-1", strategy="triangular", asset="ETH", legs=[
        leg("binance", "BTC/USDT", "buy", "60000", "0.01"),
        leg("binance", "ETH/BTC", "buy", "0.05", "0.2"),
        leg("binance", "ETH/USDT", "sell", "3001", "0.2"),
    ], gross_edge_bps=3, net_edge_bps=1, expected_profit=0.2, profit_currency="USDT", notional=600.0, ts_ns=T0)
    limits = e.book.limits
    limits.exchanges["binance"] = type(limits.exchanges["binance"])(
        frozenset({"BTC/USDT", "ETH/BTC", "ETH/USDT"}), Decimal("0.001"))
    assessed = e.book.assess(s, T0)
    assert isinstance(assessed, Assessment)
    # 0.2 ETH x 0.05 BTC = 0.01 BTC, x 60000 = 600 USDT
    assert dict(zip([c.field for c in assessed.request.claims], [c.units for c in assessed.request.claims],
                    strict=True))["x:ex:binance"] == units_up(Decimal(600) + Decimal(600) + Decimal("600.2"))


def test_the_rolling_median_ignores_old_prices_and_needs_enough_samples() -> None:
    w = PriceWindow(window_ns=10_000)
    for i, p in enumerate((100.0, 101.0, 99.0, 250.0)):
        w.add(i * 1000, p)
    assert w.median(3000, min_samples=5) is None
    assert w.median(3000, min_samples=4) == 100.5
    assert w.median(10_500, min_samples=1) == 101.0  # the first fell out of the window
    assert w.median(11_500, min_samples=1) == 174.5  # and the second


def test_a_flash_crash_on_one_venue_is_caught_even_without_history() -> None:
    e = engine(max_venue_deviation=0.05)
    v = e.check(spatial(buy=("binance", 48_000), sell=("okx", 60_000), ts_ns=T0), T0)
    assert v.decision.reason == reasons.ANOMALY and "25.00% apart" in v.decision.detail
    assert [a.kind for a in v.alerts] == ["guard_anomaly"]


def test_reject_alerts_are_throttled_per_reason_and_count_what_they_held_back() -> None:
    e = engine(max_book_age_ms=100, alert_interval_s=10.0)
    stale = [e.check(spatial(book_age_ns=200_000_000, ts_ns=T0 + i), T0 + i) for i in range(5)]
    assert [len(v.alerts) for v in stale] == [1, 0, 0, 0, 0]
    later = e.check(spatial(book_age_ns=200_000_000, ts_ns=T0 + 11 * 10**9), T0 + 11 * 10**9)
    assert len(later.alerts) == 1 and "4 more since the last alert" in later.alerts[0].message


def test_instrument_rules_make_off_tick_or_tiny_orders_invalid() -> None:
    e = engine()
    e.book.set_instruments("binance", [Instrument(exchange="binance", symbol="BTC/USDT", native="BTCUSDT",
                                                  base="BTC", quote="USDT", tick_size=Decimal("0.01"),
                                                  lot_size=Decimal("0.00001"), min_notional=Decimal("5"))])
    off_tick = e.book.assess(spatial(buy=("binance", "60000.005"), ts_ns=T0), T0)
    assert isinstance(off_tick, Rejection) and "tick" in off_tick.detail
    off_lot = e.book.assess(spatial(qty="0.000015", ts_ns=T0), T0)
    assert isinstance(off_lot, Rejection) and "lot" in off_lot.detail
    unlisted = e.book.assess(spatial(asset="ETH", buy=("binance", 3000), sell=("okx", 3001), ts_ns=T0), T0)
    assert isinstance(unlisted, Rejection) and "not listed" in unlisted.detail


def test_a_balance_is_floored_to_the_unit_and_never_negative() -> None:
    units = RiskEngine(RiskLimits.from_config(risk_config())).book.balance_units
    assert units(Balance(exchange="okx", asset="BTC", free=Decimal("0.123456789"), ts_ns=0)) == 12_345_678
    assert units(Balance(exchange="okx", asset="BTC", free=Decimal("-1"), ts_ns=0)) == 0
    assert units(Balance(exchange="okx", asset="BTC", free=Decimal("NaN"), ts_ns=0)) is None


def test_a_residual_worth_less_than_the_threshold_does_not_halt() -> None:
    e = engine(residual_halt_notional=10.0)
    v = e.check(spatial(ts_ns=T0), T0)  # BTC seen at ~60,000
    assert v.intent is not None
    dust = Residual(exchange="okx", asset="BTC", quantity=Decimal("0.0001"))  # 6 USDT
    assert e.on_execution(execution(v.intent.arb_id, "-1", ts_ns=T0, residuals=[dust])) == []
    assert e.state.halt is None
    v = e.check(spatial(ts_ns=T0 + 1), T0 + 1)
    assert v.intent is not None
    big = Residual(exchange="okx", asset="BTC", quantity=Decimal("-0.001"))  # 60 USDT short
    [alert] = e.on_execution(execution(v.intent.arb_id, "-1", ts_ns=T0 + 1, residuals=[big]))
    assert alert.kind == "kill_switch" and e.state.halt is not None
    assert json.loads(e.state.halt)["source"] == "auto"


def test_pnl_reported_in_another_currency_is_converted_and_nan_pnl_is_refused() -> None:
    e = engine()
    e.on_fx(fx(1_000.0, ts_ns=T0))
    ex = execution("a1", "-5000", ts_ns=T0)
    ex.pnl_currency = "KRW"
    assert e.book.settlement(ex).pnl == -500_000_000  # -5 USDT
    bad = execution("a2", "NaN", ts_ns=T0)
    with pytest.raises(ValueError):
        e.book.settlement(bad)


def test_a_zero_pnl_execution_neither_extends_nor_breaks_a_losing_streak() -> None:
    e = engine(circuit_breaker_losses=2)
    arbs = []
    for i in range(3):
        v = e.check(spatial(ts_ns=T0 + i), T0 + i)
        assert v.intent is not None
        arbs.append(v.intent.arb_id)
    e.on_execution(execution(arbs[0], "-1", ts_ns=T0))
    e.on_execution(execution(arbs[1], "0", ts_ns=T0))
    [alert] = e.on_execution(execution(arbs[2], "-1", ts_ns=T0))
    assert alert.kind == "circuit_breaker"


def test_the_intent_carries_the_signal_legs_as_ioc_limits_with_an_expiry() -> None:
    e = engine(intent_ttl_ms=2_500)
    s = spatial(ts_ns=T0)
    v = e.check(s, T0 + 1000)
    assert v.intent is not None
    i = v.intent
    assert (i.signal_id, i.ts_origin_ns, i.expires_ns) == (s.signal_id, s.ts_origin_ns, T0 + 1000 + 2_500_000_000)
    assert [(x.exchange, x.symbol, x.side, x.price, x.quantity, x.order_type, x.time_in_force) for x in i.legs] == \
        [(x.exchange, x.symbol, x.side, x.price, x.quantity, "limit", "IOC") for x in s.legs]
    assert [x.client_order_id for x in i.legs] == [i.arb_id + "0", i.arb_id + "1"]
    assert to_float(v.decision.reservation.counters["x:total"]) == pytest.approx(600.6)  # type: ignore[union-attr]


def test_risk_config_rules_name_the_field() -> None:
    cases = {
        "risk.daily_reset_timezone": dict(daily_reset_timezone="Mars/Olympus"),
        "risk.portfolio.max_exposure_per_coin": dict(portfolio={"max_exposure_per_coin": 2e6,
                                                               "max_total_exposure": 1e6}),
        "risk.portfolio.exchanges.ftx": dict(portfolio={"exchanges": {"ftx": 5.0}}),
        "risk.max_notional_per_trade": dict(max_notional_per_trade=5_000.0,
                                            portfolio={"max_exposure_per_coin": 1_000.0}),
        "risk.symbols.BTC.max_notional_per_trade": dict(symbols={"BTC": {"max_exposure": 500.0}}),
        "risk.daily_loss_limit": dict(daily_loss_limit=20_000.0),
        "risk.verdict_retention_s": dict(verdict_retention_s=1, max_signal_age_ms=5_000),
        "risk.max_drawdown": dict(max_drawdown=1.5),
        "risk.symbols.btc": dict(symbols={"btc": {"max_exposure": 5.0}}),
    }
    for field, overrides in cases.items():
        with pytest.raises(ConfigError) as err:
            risk_config(**overrides)  # type: ignore[arg-type]
        assert str(err.value).startswith(field), (field, str(err.value))
        assert "\n" not in str(err.value)


def test_per_symbol_limits_inherit_what_they_do_not_set() -> None:
    limits = RiskLimits.from_config(risk_config(max_notional_per_trade=800.0, symbol_cooldown_ms=50,
                                                symbols={"ETH": {"max_exposure": 900.0}}))
    eth, btc = limits.for_asset("ETH"), limits.for_asset("BTC")
    assert eth.max_exposure == 900 * 10**8 and eth.max_notional_per_trade == btc.max_notional_per_trade == 800 * 10**8
    assert eth.cooldown_ms == btc.cooldown_ms == 50
