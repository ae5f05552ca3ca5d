"""The executor's configuration section: defaults, and the rules that span its fields."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load_config


def test_paper_is_the_default_and_hedging_with_an_unwind_fallback() -> None:
    cfg = load_config(environ={})
    assert cfg.trading.mode == "paper"
    assert (cfg.executor.leg_risk_policy, cfg.executor.leg_risk_fallback) == ("hedge", "unwind")
    assert cfg.executor.unknown_order_grace_ms == 5000


def test_start_balances_come_from_the_environment_as_json() -> None:
    cfg = load_config(environ={"ARB_EXECUTOR__START_BALANCES": '{"binance": {"USDT": 1000, "BTC": 0.5}}'})
    assert cfg.executor.start_balances == {"binance": {"USDT": 1000.0, "BTC": 0.5}}


@pytest.mark.parametrize(("executor", "message"), [
    ({"start_balances": {"nowhere": {"USDT": 1}}}, "executor.start_balances.nowhere must be one of"),
    ({"start_balances": {"binance": {"usdt": 1}}}, "executor.start_balances.binance.usdt must name an asset"),
    ({"start_balances": {"binance": {"USDT": -1}}}, "executor.start_balances.binance.USDT -1.0 must be a number"),
    ({"fill_poll_interval_ms": 500, "fill_poll_timeout_ms": 100}, "executor.fill_poll_interval_ms 500 must be below"),
    ({"request_timeout_ms": 6000}, "executor.request_timeout_ms 6000 must be below executor.unknown_order_grace_ms"),
    ({"unknown_order_grace_ms": 70000}, "executor.unknown_order_grace_ms"),
    ({"leg_risk_policy": "pray"}, "executor.leg_risk_policy 'pray' must be one of hedge, unwind"),
    ({"max_slippage_bps": 0}, "executor.max_slippage_bps"),
])
def test_bad_executor_settings_are_refused_with_the_field_and_the_rule(executor, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        load_config(environ={}, overrides={"executor": executor})
    assert str(err.value).startswith(message), str(err.value)
