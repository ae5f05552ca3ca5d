"""The L2 book: its top levels always equal a naively sorted book, whatever the changes, and the
compiled book the collector runs gives exactly what the pure-Python reference gives."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.collector.book import COMPILED, WINDOW, WINDOW_MAX, L2Book, OrderBook, new_book
from services.collector.exchanges.binance import Binance

prices = st.integers(1, 3000).map(lambda i: i / 100)
positive = st.integers(1, 10_000).map(lambda i: i / 1000)
sizes = st.one_of(st.just(0.0), positive)
changes = st.lists(st.tuples(st.sampled_from("ba"), prices, sizes), max_size=300)
snapshots = st.lists(st.tuples(prices, positive), max_size=400)


def _naive(book: dict[float, float], reverse: bool, n: int) -> list[tuple[float, float]]:
    return sorted(book.items(), reverse=reverse)[:n]


@settings(max_examples=150, deadline=None)
@given(snapshots, snapshots, st.lists(changes, max_size=6), st.sampled_from([1, 5, 20, 25, 200, 1000]))
def test_top_levels_equal_a_naively_sorted_book(
    bids0: list[tuple[float, float]], asks0: list[tuple[float, float]], rounds: list[list[tuple[str, float, float]]],
    n: int,
) -> None:
    book = OrderBook()
    book.replace(bids0, asks0)
    ref_bids, ref_asks = dict(bids0), dict(asks0)
    for changes_ in rounds:
        bids = [(p, q) for side, p, q in changes_ if side == "b"]
        asks = [(p, q) for side, p, q in changes_ if side == "a"]
        book.apply(bids, asks)
        for ref, levels in ((ref_bids, bids), (ref_asks, asks)):
            for p, q in levels:
                if q == 0:
                    ref.pop(p, None)
                else:
                    ref[p] = q
        top_bids, top_asks = book.top(n)
        assert top_bids == _naive(ref_bids, True, n)
        assert top_asks == _naive(ref_asks, False, n)
        assert book.best_bid() == (max(ref_bids) if ref_bids else None)
        assert book.best_ask() == (min(ref_asks) if ref_asks else None)


def test_far_levels_stay_out_of_the_sorted_window_until_needed() -> None:
    book = OrderBook()
    book.replace([(100.0 - i / 100, 1.0) for i in range(5000)], [(101.0 + i / 100, 1.0) for i in range(5000)])
    assert len(book.bids.keys) == WINDOW  # 5000 levels known, only the best ones sorted
    book.apply([], [(101.0 + i / 100, 0.0) for i in range(WINDOW)])  # eat the whole ask window
    assert book.asks.top(3) == [(101.0 + WINDOW / 100, 1.0), (101.0 + (WINDOW + 1) / 100, 1.0),
                                (101.0 + (WINDOW + 2) / 100, 1.0)]
    book.apply([(50.0 + i / 1000, 2.0) for i in range(WINDOW_MAX)], [])  # far below the window: dict only
    assert len(book.bids.keys) == WINDOW
    book.apply([(200.0 - i / 1000, 2.0) for i in range(WINDOW_MAX + 1)], [])  # at the touch: window grows, is cut
    assert len(book.bids.keys) == WINDOW
    assert book.bids.top(1) == [(200.0, 2.0)]


def test_a_book_keeps_the_exchange_strings_for_checksums() -> None:
    book = OrderBook(keep_strings=True)
    book.replace_raw([["100.10", "1.500", "0", "2"]], [["100.2", "0.1", "0", "1"]])
    book.apply_raw([["100.10", "2.000", "0", "3"], ["99.9", "5", "0", "1"]], [["100.2", "0", "0", "0"]])
    assert book.bids.top_raw(5) == [("100.10", "2.000"), ("99.9", "5")]
    assert book.asks.top_raw(5) == []
    assert book.top(5) == ([(100.1, 2.0), (99.9, 5.0)], [])


def test_crossed_means_best_bid_at_or_above_best_ask() -> None:
    book = OrderBook()
    book.replace([(100.0, 1.0)], [(101.0, 1.0)])
    assert not book.crossed()
    book.apply([(101.0, 1.0)], [])
    assert book.crossed()


def test_memory_is_bounded_by_dropping_the_levels_furthest_from_the_touch() -> None:
    book = OrderBook(max_levels=100)
    book.apply([(1000.0 - i, 1.0) for i in range(150)], [])
    assert len(book.bids) == 100
    assert book.bids.top(1) == [(1000.0, 1.0)]
    assert min(book.bids.levels) == 901.0


# --------------------------------------------------------------------------- the compiled book

ops = st.lists(st.one_of(
    st.tuples(st.just("apply"), st.lists(st.tuples(prices, sizes), max_size=40),
              st.lists(st.tuples(prices, sizes), max_size=40)),
    st.tuples(st.just("replace"), st.lists(st.tuples(prices, sizes), max_size=60),
              st.lists(st.tuples(prices, sizes), max_size=60)),
    st.tuples(st.just("set"), st.sampled_from("ba"), prices, sizes),
    st.tuples(st.just("trim"), st.sampled_from("ba"), st.integers(0, 80)),
    st.tuples(st.just("clear")),
), max_size=40)


def _state(book: L2Book, n: int) -> tuple[object, ...]:
    return (book.top(n), book.best_bid(), book.best_ask(), book.crossed(), bool(book), len(book.bids),
            len(book.asks), book.bids.best(), book.asks.top(n))


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([1, 5, 20, 1000]), st.sampled_from([5, 50, 20_000]))
def test_the_compiled_book_gives_what_the_reference_gives_on_any_update_sequence(
    sequence: list[tuple[object, ...]], n: int, max_levels: int,
) -> None:
    assert COMPILED is not None, "the compiled book was not built (pip install -e . needs a C compiler)"
    fast: L2Book = COMPILED(max_levels=max_levels)
    ref = OrderBook(max_levels=max_levels)
    for op in sequence:
        for book in (fast, ref):
            side = {"b": book.bids, "a": book.asks}
            if op[0] == "apply":
                book.apply(op[1], op[2])  # type: ignore[arg-type]
            elif op[0] == "replace":
                book.replace(op[1], op[2])  # type: ignore[arg-type]
            elif op[0] == "set":
                side[op[1]].set(op[2], op[3])  # type: ignore[index, arg-type]
            elif op[0] == "trim":
                side[op[1]].trim(op[2])  # type: ignore[index, arg-type]
            else:
                book.clear()
        assert _state(fast, n) == _state(ref, n)
    assert fast.bids.levels == ref.bids.levels and fast.asks.levels == ref.asks.levels  # type: ignore[attr-defined]


def test_exchange_books_are_compiled_unless_they_keep_the_exchange_strings() -> None:
    assert COMPILED is not None
    assert type(new_book()) is COMPILED
    assert type(new_book(keep_strings=True)) is OrderBook  # checksummed books keep strings: the reference
    assert type(Binance().new_book("BTCUSDT").book) is COMPILED


def test_the_compiled_book_rejects_what_would_break_its_order() -> None:
    assert COMPILED is not None
    book = COMPILED()
    with pytest.raises(ValueError):
        book.apply([(math.nan, 1.0)], [])
    with pytest.raises(ValueError):
        book.apply([(1.0, 2.0, 3.0)], [])  # the reference's unpacking refuses it too
    with pytest.raises(ValueError):
        COMPILED(keep_strings=True)
