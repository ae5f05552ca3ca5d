"""FX conversions: direction, conservative sides, two hops, age and bad rates."""

from __future__ import annotations

import pytest

from services.detector.fx import IDENTITY, FxTable, fx_problem
from shared.models import FxRate

NOW = 1_700_000_000_000_000_000
MS = 1_000_000


def rate(pair: str, value: float, *, age_ms: int = 0, bid: float | None = None, ask: float | None = None) -> FxRate:
    return FxRate(pair=pair, rate=value, bid=bid, ask=ask, source="test", ts_source_ns=NOW - age_ms * MS)


def test_a_currency_is_worth_itself() -> None:
    assert FxTable(60_000 * MS).conversion("USDT", "USDT", NOW) is IDENTITY


def test_krw_is_valued_in_usdt_through_usdt_krw_with_the_worse_side_for_each_direction() -> None:
    table = FxTable(60_000 * MS)
    table.update(rate("USDT/KRW", 1380.0, bid=1379.0, ask=1381.0, age_ms=5))
    conv = table.conversion("KRW", "USDT", NOW)
    assert conv is not None
    assert conv.cost == pytest.approx(1 / 1379.0)  # KRW paid costs the most USDT at the bid
    assert conv.proceeds == pytest.approx(1 / 1381.0)  # KRW received buys the fewest USDT at the ask
    assert conv.mid == pytest.approx(1 / 1380.0)
    assert conv.age_ns(NOW) == 5 * MS and conv.rates == (("USDT/KRW", 1380.0),)
    back = table.conversion("USDT", "KRW", NOW)
    assert back is not None and (back.cost, back.proceeds) == (1381.0, 1379.0)


def test_two_rates_chain_through_a_common_currency_and_the_older_sets_the_age() -> None:
    table = FxTable(60_000 * MS)
    table.update(rate("USDC/KRW", 1382.0, age_ms=10))
    table.update(rate("USDC/USDT", 1.001, age_ms=30))
    conv = table.conversion("KRW", "USDT", NOW)
    assert conv is not None
    assert conv.mid == pytest.approx(1.001 / 1382.0)
    assert conv.age_ns(NOW) == 30 * MS


def test_a_stale_or_missing_rate_converts_nothing() -> None:
    table = FxTable(60_000 * MS)
    assert table.conversion("KRW", "USDT", NOW) is None
    table.update(rate("USDT/KRW", 1380.0, age_ms=60_001))
    assert table.conversion("KRW", "USDT", NOW) is None
    assert table.route("KRW", "USDT") is not None  # held, but too old to use


def test_an_older_rate_does_not_replace_a_newer_one() -> None:
    table = FxTable(60_000 * MS)
    assert table.update(rate("USDT/KRW", 1380.0, age_ms=1))
    assert not table.update(rate("USDT/KRW", 1300.0, age_ms=2))
    latest = table.latest("USDT/KRW")
    assert latest is not None and latest.rate == 1380.0


@pytest.mark.parametrize("bad, reason", [
    (rate("USDTKRW", 1380.0), "pair"),
    (rate("USDT/USDT", 1.0), "pair"),
    (rate("USDT/KRW", 0.0), "rate"),
    (rate("USDT/KRW", float("nan")), "rate"),
    (rate("USDT/KRW", 1380.0, bid=1381.0, ask=1379.0), "bid_ask"),
    (rate("USDT/KRW", 1380.0, bid=1379.0), "one_sided"),
])
def test_unusable_rates_are_named_and_refused(bad: FxRate, reason: str) -> None:
    assert fx_problem(bad) == reason
    table = FxTable(60_000 * MS)
    assert not table.update(bad)
