"""Conversions at the book and marks: what the planner relies on (monotone inputs, planned
output always delivered on the same book)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.rebalancer.market import ConversionMarket, Marks
from services.rebalancer.networks import TransferNetwork
from services.rebalancer.planner import WithdrawalEdge
from shared.models import FxRate
from tests.rebalancer_scenarios import D, book

STEPS = {"KRW": D(1)}


def usdt_krw() -> ConversionMarket:
    return ConversionMarket.from_book(book("upbit", "USDT/KRW", 1389, 1390, 1000), D("0.0005"), STEPS)


def test_buying_walks_the_asks_and_charges_the_fee_in_what_is_received() -> None:
    m = usdt_krw()  # asks: 1390 x 1000, 1391.39 x 2000, ...
    done = m.convert("KRW", D(1390 * 1000 + 1391.39 * 500))
    assert done is not None
    assert done.worst_price == D("1391.39")
    gross = D(1500)
    assert done.fee == gross * D("0.0005") and done.amount_out == gross - done.fee


def test_selling_walks_the_bids_and_rounds_krw_down_to_the_won() -> None:
    m = usdt_krw()
    done = m.convert("USDT", D("10.5"))
    assert done is not None
    gross = D("10.5") * D(1389)
    assert done.fee == (gross * D("0.0005")).to_integral_value(rounding="ROUND_CEILING")
    assert done.amount_out == (gross - done.fee).to_integral_value(rounding="ROUND_FLOOR")


def test_a_book_too_thin_for_the_amount_converts_nothing() -> None:
    m = usdt_krw()  # 1000 + 2000 + 3000 USDT on the asks
    assert m.convert("KRW", D(10**12)) is None
    assert m.input_for("KRW", D(6001)) is None
    assert m.input_for("KRW", D(5000)) is not None


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["KRW", "USDT"]),
    st.integers(1, 500_000_000).map(lambda n: D(n) / 100000),
    st.integers(1, 500_000_000).map(lambda n: D(n) / 100000),
    st.integers(0, 30).map(lambda n: D(n) / 10000),
)
def test_planned_input_always_yields_the_planned_output_and_grows_with_it(
    from_asset: str, a: Decimal, b: Decimal, fee: Decimal
) -> None:
    m = ConversionMarket.from_book(book("upbit", "USDT/KRW", 1389, 1390, 1000), fee, STEPS)
    to_asset = "USDT" if from_asset == "KRW" else "KRW"
    small, large = sorted((a, b))
    if to_asset == "KRW":
        small, large = small * 1000, large * 1000
    need_small, need_large = m.input_for(from_asset, small), m.input_for(from_asset, large)
    if need_small is not None:
        done = m.convert(from_asset, need_small)
        assert done is not None and done.amount_out >= small
    if need_large is not None:
        assert need_small is not None and need_small <= need_large


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9).map(lambda n: D(n) / 10**6), st.integers(0, 10**9).map(lambda n: D(n) / 10**6),
       st.integers(0, 500).map(lambda n: D(n) / 100), st.integers(0, 100).map(lambda n: D(n) / 10000),
       st.integers(0, 1000).map(lambda n: D(n) / 100))
def test_withdrawal_input_grows_with_the_amount_delivered(a: Decimal, b: Decimal, fee: Decimal, rate: Decimal,
                                                          minimum: Decimal) -> None:
    row = TransferNetwork(exchange="x", asset="USDT", network="TRON", label="TRX", withdraw_fee=fee,
                          withdraw_fee_rate=rate, withdraw_min=minimum, confirm_seconds=60, withdraw_enabled=True,
                          deposit_enabled=True)
    edge = WithdrawalEdge(row, replace(row, exchange="y"), None, D("0.00000001"))
    small, large = sorted((a, b))
    fs, fl = edge.flow_for(small), edge.flow_for(large)
    if fs is None:
        assert small == 0
        return
    assert fl is not None and fs.amount_in <= fl.amount_in
    assert fs.amount_out >= max(small, minimum) and fs.amount_in == fs.amount_out + fs.fee
    assert fs.fee >= fee + rate * fs.amount_out


def test_marks_come_from_reference_books_then_through_fx() -> None:
    books = [book("binance", "BTC/USDT", 60000, 60010, 1), book("okx", "BTC/USDT", 60100, 60110, 1),
             book("bybit", "BTC/USDT", 59000, 59010, 1), book("upbit", "ETH/KRW", 4_000_000, 4_001_000, 1)]
    ms = [ConversionMarket.from_book(b, D("0.001"), {}) for b in books]
    marks = Marks.from_market("USDT", ms, [FxRate(pair="USDT/KRW", rate=1400.0, source="t", ts_source_ns=0)])
    assert marks.get("USDT") == 1
    assert marks.get("BTC") == D("60005")  # the median venue's mid
    krw = marks.get("KRW")
    assert krw is not None and abs(krw - 1 / D(1400)) < D("1e-30")
    eth = marks.get("ETH")
    assert eth is not None and abs(eth - D("4000500") / 1400) < D("1e-20")
    assert marks.get("DOGE") is None
