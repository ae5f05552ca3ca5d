"""Which books the detector cores accept: the compiled level check answers exactly what its
pure-Python reference answers, on any levels."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from services.detector import books
from services.detector.books import book_problem, ordered_levels
from shared.models import BookSnapshot

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 100.0, 100.5, math.inf, -math.inf, math.nan, 1e308]),
)
sorted_prices = st.lists(st.integers(1, 10_000), min_size=1, max_size=25, unique=True).map(sorted)


@settings(max_examples=2_000, deadline=None)
@given(st.lists(st.tuples(numbers, numbers), min_size=1, max_size=25), st.booleans())
def test_the_compiled_level_check_answers_what_the_reference_answers(levels: list[tuple[float, float]],
                                                                      descending: bool) -> None:
    assert books._compiled_ordered is not None, "shared._clevels was not built (pip install -e . needs a C compiler)"
    assert books._compiled_ordered(levels, descending) == ordered_levels(levels, descending=descending)


@settings(max_examples=500, deadline=None)
@given(sorted_prices, st.lists(st.integers(0, 3), min_size=25, max_size=25), st.booleans())
def test_the_compiled_level_check_agrees_on_real_looking_books(ticks: list[int], sizes: list[int],
                                                                descending: bool) -> None:
    levels = [(t / 100, sizes[i] / 2) for i, t in enumerate(ticks)]
    if descending:
        levels.reverse()
    assert books._compiled_ordered is not None
    assert books._compiled_ordered(levels, descending) == ordered_levels(levels, descending=descending)


def test_levels_the_compiled_check_cannot_read_are_left_to_the_reference() -> None:
    assert books._compiled_ordered is not None
    assert books._compiled_ordered([(100, 1.0)], True) is None  # an int price
    assert books._compiled_ordered([[100.0, 1.0]], True) is None  # a list, not a tuple
    assert books._compiled_ordered([], True) is None
    snapshot = BookSnapshot(exchange="a", symbol="BTC/USDT", seq=1, bids=[[100.0, 1.0]], asks=[(101.0, 2)],  # type: ignore[list-item]
                            ts_exchange_ns=1, ts_recv_ns=1)
    assert book_problem(snapshot) is None
    unsorted = BookSnapshot(exchange="a", symbol="BTC/USDT", seq=1, bids=[(99.0, 1.0), (100.0, 1.0)],
                            asks=[(101.0, 2.0)], ts_exchange_ns=1, ts_recv_ns=1)
    assert book_problem(unsorted) == "unsorted"
