"""shared.money.common_step: a quantity traded on two markets sits on both lot grids."""

from __future__ import annotations

from decimal import Decimal

import pytest

from shared.money import common_step


@pytest.mark.parametrize("a, b, step", [
    ("0.001", "0.0001", "0.001"),
    ("0.0003", "0.0002", "0.0006"),
    ("1E-8", "0.001", "0.001"),
    ("0.5", "1", "1"),
    ("0.25", "0.1", "0.5"),
    ("0", "0.01", "0.01"),
])
def test_common_step_is_the_smallest_multiple_of_both(a: str, b: str, step: str) -> None:
    got = common_step(Decimal(a), Decimal(b))
    assert got == Decimal(step)
    for lot in (Decimal(a), Decimal(b)):
        if lot > 0:
            assert got % lot == 0
