"""Client order ids: deterministic, never reused, valid on every exchange we trade."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from services.risk.ids import arb_id, client_order_id, decision_id

# Each exchange's documented rule (docs/exchanges.md); Gate's is after its own "t-" prefix.
RULES = {
    "binance": re.compile(r"^[.A-Z:/a-z0-9_-]{1,36}$"),
    "okx": re.compile(r"^[A-Za-z0-9]{1,32}$"),
    "bybit": re.compile(r"^[A-Za-z0-9_-]{1,36}$"),
    "kucoin": re.compile(r"^[A-Za-z0-9_-]{1,40}$"),
    "gateio": re.compile(r"^[0-9A-Za-z_.-]{1,28}$"),
    "upbit": re.compile(r"^[A-Za-z0-9]{1,32}$"),
    "bitget": re.compile(r"^[A-Za-z0-9]{1,32}$"),
}


@given(st.text(min_size=1, max_size=128), st.integers(0, 61))
def test_client_order_ids_are_valid_on_every_exchange(signal_id: str, leg: int) -> None:
    cid = client_order_id(arb_id("production", "main", signal_id), leg)
    assert len(cid) == 23
    for exchange, rule in RULES.items():
        assert rule.match(cid), exchange


@given(st.text(min_size=1, max_size=64))
def test_the_same_signal_always_gets_the_same_ids(signal_id: str) -> None:
    assert arb_id("staging", "s1", signal_id) == arb_id("staging", "s1", signal_id)
    assert decision_id(arb_id("staging", "s1", signal_id)).startswith("d")


def test_ids_never_repeat_across_signals_legs_or_sessions() -> None:
    seen: set[str] = set()
    for session in ("paper", "live"):
        for i in range(20_000):
            arb = arb_id("production", session, f"spatial:BTC:{i}")
            for leg in range(3):
                seen.add(client_order_id(arb, leg))
    assert len(seen) == 2 * 20_000 * 3


def test_a_leg_index_outside_the_alphabet_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError):
        client_order_id("x" * 22, 62)
