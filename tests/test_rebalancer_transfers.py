"""The transfer state machine and its guards: approval policy, whitelist, in-flight amounts.
Also the configuration rules of the rebalancer section."""

from __future__ import annotations

import pytest

from services.rebalancer.planner import Node
from services.rebalancer.transfers import (
    ALL_STATES,
    FINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    NotWhitelisted,
    check_transition,
    check_whitelist,
    in_flight_by_exchange,
    initial_state,
    remaining_effects,
)
from shared.config import ConfigError
from shared.models import TransferStep
from tests.rebalancer_scenarios import KIMCHI_ADDRESSES, D, config


def krw_to_binance_usdt(address: str = "TBinanceDepositAddress000000000000") -> list[TransferStep]:
    return [
        TransferStep(kind="conversion", from_exchange="upbit", to_exchange="upbit", from_asset="KRW",
                     to_asset="USDT", amount=D("13890000"), fee=D("5"), network="USDT/KRW", amount_out=D("9995")),
        TransferStep(kind="withdrawal", from_exchange="upbit", to_exchange="binance", from_asset="USDT",
                     to_asset="USDT", amount=D("9994"), fee=D("1"), network="TRON", amount_out=D("9994"),
                     address=address),
    ]


def test_every_state_is_reachable_only_through_allowed_transitions() -> None:
    assert set(TRANSITIONS) == set(ALL_STATES)
    for state in FINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
    check_transition("t", "awaiting_approval", "approved")
    check_transition("t", "sent", "completed")
    for current, new in [("awaiting_approval", "sent"), ("planned", "sent"), ("sent", "cancelled"),
                         ("completed", "failed"), ("cancelled", "approved")]:
        with pytest.raises(IllegalTransition, match=f"is {current}: cannot become {new}"):
            check_transition("t", current, new)  # type: ignore[arg-type]


def test_paper_transfers_are_auto_approved_unless_rehearsing_approvals() -> None:
    assert initial_state(krw_to_binance_usdt(), "paper", config().rebalancer)[0] == "approved"
    rehearse = config({"paper_auto_approve": False}).rebalancer
    assert initial_state(krw_to_binance_usdt(), "paper", rehearse) == ("awaiting_approval",
                                                                        "no approval cap for KRW")


def test_live_transfer_over_any_cap_waits_for_a_person() -> None:
    caps = {"KRW": 20_000_000, "USDT": 5000}
    state, why = initial_state(krw_to_binance_usdt(), "live", config({"approval_caps": caps,
                                                                       "auto_approve": True}).rebalancer)
    assert state == "awaiting_approval" and why == "9995 USDT is over the approval cap of 5000"


def test_live_transfer_within_caps_is_approved_only_when_auto_approve_is_on() -> None:
    caps = {"KRW": 20_000_000, "USDT": 20000}
    assert initial_state(krw_to_binance_usdt(), "live", config({"approval_caps": caps}).rebalancer) == (
        "awaiting_approval", "auto_approve is off")
    on = config({"approval_caps": caps, "auto_approve": True}).rebalancer
    assert initial_state(krw_to_binance_usdt(), "live", on)[0] == "approved"


def test_withdrawal_to_an_address_off_the_whitelist_is_refused() -> None:
    settings = config({"addresses": KIMCHI_ADDRESSES}).rebalancer
    check_whitelist(krw_to_binance_usdt(), settings)
    with pytest.raises(NotWhitelisted, match="address is not the whitelisted one"):
        check_whitelist(krw_to_binance_usdt(address="TAttackerAddress"), settings)
    with pytest.raises(NotWhitelisted, match="no whitelisted address"):
        check_whitelist(krw_to_binance_usdt(), config().rebalancer)


def test_remaining_effects_follow_step_progress() -> None:
    steps = krw_to_binance_usdt()
    pending = remaining_effects(steps, ["pending", "pending"])
    assert pending == {Node("upbit", "KRW"): D("-13890000"), Node("upbit", "USDT"): D("9995") - D("9995"),
                       Node("binance", "USDT"): D("9994")}
    assert remaining_effects(steps, ["done", "sent"]) == {Node("binance", "USDT"): D("9994")}
    assert remaining_effects(steps, ["done", "done"]) == {}
    assert in_flight_by_exchange(pending) == {"upbit": {"outgoing:KRW": "13890000"},
                                              "binance": {"incoming:USDT": "9994"}}


@pytest.mark.parametrize(("override", "message"), [
    ({"networks": [{"exchange": "binance", "asset": "USDT", "network": "TRON", "withdraw_fee": "-1",
                    "confirm_seconds": 60}]}, "rebalancer.networks[0].withdraw_fee -1 must not be negative"),
    ({"networks": [{"exchange": "binance", "asset": "USDT", "network": "TRON", "withdraw_fee": "1",
                    "confirm_seconds": -5}]}, "rebalancer.networks[0].confirm_seconds -5"),
    ({"addresses": [{"exchange": "upbit", "asset": "USDT", "network": "SOL", "address": "x"}]},
     "rebalancer.addresses[0].network 'SOL' is not a known network of upbit USDT (ETH, TRON)"),
    ({"targets": [{"exchange": "upbit", "asset": "BTC", "target": 1, "low": 2}]},
     "rebalancer.targets[0].low 2 must not exceed target (1)"),
    ({"targets": [{"exchange": "mtgox", "asset": "BTC", "target": 1, "low": 0}]},
     "rebalancer.targets[0].exchange 'mtgox' must be one of"),
    ({"targets": [{"exchange": "upbit", "asset": "BTC", "target": 2, "low": 0, "kind": "share"}]},
     "at most 1"),
    ({"approval_caps": {"BTC": -1}}, "rebalancer.approval_caps.BTC -1 must not be negative"),
    ({"capital_cost_per_hour": "0.5"}, "rebalancer.capital_cost_per_hour 0.5 must be a fraction per hour"),
    ({"networks": [{"exchange": "binance", "asset": "USDT", "network": "TRON", "withdraw_fee": "abc",
                    "confirm_seconds": 60}]}, "rebalancer.networks[0].withdraw_fee 'abc' invalid decimal"),
])
def test_bad_rebalancer_configuration_is_refused_with_the_field_and_the_rule(override, message) -> None:
    with pytest.raises(ConfigError) as err:
        config(override)
    assert message in str(err.value)
