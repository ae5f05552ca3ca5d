"""The fill simulator on recorded real books, against walks computed by hand.

Expected prices, quantities and fees below were worked out by hand from the recorded
levels (products checked with ``bc``), not by the code under test.
"""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from executor_support import BINANCE_BOOKS, UPBIT_BOOKS, recorded_books, recorded_depth
from hypothesis import given, settings
from hypothesis import strategies as st

from services.executor.fills import FillSimulator, InMemoryBalances, InsufficientFunds, fill_deltas
from shared.models import BookSnapshot, OrderLeg

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")
RICH = InMemoryBalances.from_mapping({"binance": {"USDT": "10000000", "BTC": "100", "NKN": "1000000"},
                                      "upbit": {"KRW": "100000000000", "BTC": "100"}})


def order(exchange: str, symbol: str, side: str, qty: str, price: str, tif: str = "IOC") -> OrderLeg:
    return OrderLeg(client_order_id="c1", exchange=exchange, symbol=symbol, side=side,  # type: ignore[arg-type]
                    price=D(price), quantity=D(qty), time_in_force=tif)  # type: ignore[arg-type]


def walk(result) -> list[tuple[D, D, D, str]]:  # type: ignore[no-untyped-def]
    return [(f.price, f.quantity, f.fee, f.fee_asset) for f in result.fills]


sim = FillSimulator()


def test_binance_buy_walks_three_ask_levels_and_pays_the_fee_in_btc() -> None:
    result = sim.fill(order("binance", "BTC/USDT", "buy", "8.611", "115279.81"), BINANCE[0], 0,
                      fee_rate=D("0.001"), balances=RICH)
    assert result.status == "FILLED"
    assert walk(result) == [
        (D("115279.26"), D("8.61031"), D("0.00861031"), "BTC"),
        (D("115279.27"), D("0.0006"), D("0.0000006"), "BTC"),
        (D("115279.81"), D("0.00009"), D("0.00000009"), "BTC"),
    ]
    assert result.filled_quantity == D("8.611")
    assert [f.fill_id for f in result.fills] == ["c1-0", "c1-1", "c1-2"]
    moved: dict[str, D] = {}
    for f in result.fills:
        for d in fill_deltas("binance", "BTC/USDT", "buy", f):
            moved[d.asset] = moved.get(d.asset, D(0)) + d.amount
    # 992590.1651706 + 69.167562 + 10.3751829 USDT paid; 8.611 - 0.008611 BTC received.
    assert moved == {"USDT": D("-992669.7079155"), "BTC": D("8.602389")}


def test_binance_buy_limit_cuts_the_walk_and_cancels_the_rest() -> None:
    result = sim.fill(order("binance", "BTC/USDT", "buy", "9", "115279.27"), BINANCE[0], 0,
                      fee_rate=D("0.001"), balances=RICH)
    assert result.status == "CANCELED"
    assert result.reason == "IOC: rest cancelled"
    assert walk(result) == [
        (D("115279.26"), D("8.61031"), D("0.00861031"), "BTC"),
        (D("115279.27"), D("0.0006"), D("0.0000006"), "BTC"),
    ]
    assert result.filled_quantity == D("8.61091")


def test_binance_sell_walks_bids_and_pays_the_fee_in_usdt() -> None:
    result = sim.fill(order("binance", "BTC/USDT", "sell", "3.0625", "115279.24"), BINANCE[0], 0,
                      fee_rate=D("0.001"), balances=RICH)
    assert result.status == "FILLED"
    assert walk(result) == [
        (D("115279.25"), D("3.06231"), D("353.0208000675"), "USDT"),
        (D("115279.24"), D("0.00019"), D("0.0219030556"), "USDT"),
    ]


def test_upbit_sell_pays_the_fee_in_krw() -> None:
    result = sim.fill(order("upbit", "BTC/KRW", "sell", "0.05", "159496000"), UPBIT[0], 0,
                      fee_rate=D("0.0005"), balances=RICH)
    assert result.status == "FILLED"
    assert walk(result) == [
        (D("159508000"), D("0.02069352"), D("1650.39099408"), "KRW"),
        (D("159507000"), D("0.02930648"), D("2337.29435268"), "KRW"),
    ]
    moved = {d.asset: d.amount for f in result.fills[:1] for d in fill_deltas("upbit", "BTC/KRW", "sell", f)}
    assert moved == {"BTC": D("-0.02069352"), "KRW": D("3300781.98816") - D("1650.39099408")}


def test_upbit_buy_partial_fill_when_the_limit_stops_at_the_second_level() -> None:
    result = sim.fill(order("upbit", "BTC/KRW", "buy", "0.5", "159525000"), UPBIT[0], 0,
                      fee_rate=D("0.0005"), balances=RICH)
    assert result.status == "CANCELED"
    assert walk(result) == [
        (D("159523000"), D("0.0046748"), D("372.8690602"), "KRW"),
        (D("159525000"), D("0.34580844"), D("27582.5456955"), "KRW"),
    ]
    assert result.filled_quantity == D("0.35048324")


def test_sell_on_a_raw_binance_rest_depth_snapshot() -> None:
    book = recorded_depth("NKNUSDT", symbol="NKN/USDT")
    result = sim.fill(order("binance", "NKN/USDT", "sell", "5000", "0.3518"), book, 0,
                      fee_rate=D("0.001"), balances=RICH)
    assert result.status == "FILLED"
    assert walk(result) == [
        (D("0.3521"), D("672"), D("0.2366112"), "USDT"),
        (D("0.352"), D("1144"), D("0.402688"), "USDT"),
        (D("0.3519"), D("3184"), D("1.1204496"), "USDT"),
    ]


def test_nothing_fills_when_the_limit_is_better_than_the_book() -> None:
    result = sim.fill(order("binance", "BTC/USDT", "buy", "1", "115000"), BINANCE[0], 0,
                      fee_rate=D("0.001"), balances=RICH)
    assert result.status == "CANCELED"
    assert result.fills == ()
    assert result.reason == "IOC: nothing within the limit"


def test_fok_fills_nothing_unless_the_whole_quantity_is_there() -> None:
    short = sim.fill(order("binance", "BTC/USDT", "buy", "9", "115279.27", "FOK"), BINANCE[0], 0,
                     fee_rate=D("0.001"), balances=RICH)
    assert short.status == "CANCELED" and short.fills == ()
    whole = sim.fill(order("binance", "BTC/USDT", "buy", "8.611", "115279.81", "FOK"), BINANCE[0], 0,
                     fee_rate=D("0.001"), balances=RICH)
    assert whole.status == "FILLED" and whole.filled_quantity == D("8.611")


def test_an_order_the_account_cannot_pay_for_is_rejected_whole() -> None:
    poor = InMemoryBalances.from_mapping({"upbit": {"KRW": "1000000", "BTC": "0.01"}})
    buy = sim.fill(order("upbit", "BTC/KRW", "buy", "0.01", "159525000"), UPBIT[0], 0,
                   fee_rate=D("0.0005"), balances=poor)
    assert buy.status == "REJECTED" and buy.fills == ()
    assert "insufficient KRW" in buy.reason
    sell = sim.fill(order("upbit", "BTC/KRW", "sell", "0.02", "159000000"), UPBIT[0], 0,
                    fee_rate=D("0.0005"), balances=poor)
    assert sell.status == "REJECTED" and "insufficient BTC" in sell.reason


def test_upbit_buy_locks_the_fee_on_top_of_the_notional() -> None:
    # 0.01 BTC at 159,525,000 = 1,595,250 KRW, plus 0.05% = 1,596,047.625 KRW.
    exact = InMemoryBalances.from_mapping({"upbit": {"KRW": "1596047.625"}})
    assert sim.fill(order("upbit", "BTC/KRW", "buy", "0.01", "159525000"), UPBIT[0], 0,
                    fee_rate=D("0.0005"), balances=exact).status == "FILLED"
    short = InMemoryBalances.from_mapping({"upbit": {"KRW": "1596047.624"}})
    assert sim.fill(order("upbit", "BTC/KRW", "buy", "0.01", "159525000"), UPBIT[0], 0,
                    fee_rate=D("0.0005"), balances=short).status == "REJECTED"


def test_stale_or_missing_book_fills_nothing() -> None:
    aged = FillSimulator(max_book_age_ns=1_000_000_000)
    book = BINANCE[0]  # ts_recv_ns = 0
    assert aged.fill(order("binance", "BTC/USDT", "buy", "1", "120000"), book, 2_000_000_000,
                     fee_rate=D("0.001")).reason == "book is stale"
    assert sim.fill(order("binance", "BTC/USDT", "buy", "1", "120000"), None, 0,
                    fee_rate=D("0.001")).status == "REJECTED"


def test_the_order_meets_the_book_after_the_latency() -> None:
    assert FillSimulator(latency_ns=50_000_000).arrival_ns(1_000) == 50_001_000


def test_in_memory_balances_move_like_the_ledger_and_refuse_to_go_negative() -> None:
    bal = InMemoryBalances.from_mapping({"binance": {"USDT": "1000"}})
    fill = sim.fill(order("binance", "BTC/USDT", "buy", "0.008", "115279.81"), BINANCE[0], 0,
                    fee_rate=D("0.001"), balances=bal).fills[0]
    bal.apply(fill_deltas("binance", "BTC/USDT", "buy", fill))
    assert bal.available("binance", "BTC") == D("0.008") - D("0.000008")
    assert bal.available("binance", "USDT") == D("1000") - D("0.008") * D("115279.26")
    with pytest.raises(InsufficientFunds):
        bal.apply(fill_deltas("binance", "BTC/USDT", "buy", fill) * 2)


levels = st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)), min_size=0, max_size=15)


@settings(max_examples=200, deadline=None)
@given(levels, levels, st.integers(1, 50_000), st.integers(1, 12_000), st.sampled_from(["buy", "sell"]),
       st.sampled_from(["binance", "upbit"]))
def test_fills_never_pass_the_limit_or_the_quantity_and_conserve_value(bids, asks, qty, limit, side, exchange):  # type: ignore[no-untyped-def]
    book = BookSnapshot(exchange=exchange, symbol="BTC/KRW", seq=1,
                        bids=sorted({(p / 100, s / 1000) for p, s in bids}, reverse=True),
                        asks=sorted({(p / 100, s / 1000) for p, s in asks}),
                        ts_exchange_ns=0, ts_recv_ns=0)
    o = order(exchange, "BTC/KRW", side, str(D(qty) / 1000), str(D(limit) / 100))
    result = sim.fill(o, book, 0, fee_rate=D("0.001"))
    assert result.filled_quantity <= o.quantity
    for f in result.fills:
        assert (f.price <= o.price) if side == "buy" else (f.price >= o.price)
        assert f.quantity > 0 and f.fee >= 0
    prices = [f.price for f in result.fills]
    assert prices == sorted(prices, reverse=side == "sell")
    assert (result.status == "FILLED") == (result.filled_quantity == o.quantity)
    # Paid + fees == received value: the deltas of every fill net to -fee in value terms.
    for f in result.fills:
        moves = {d.asset: d.amount for d in fill_deltas(exchange, "BTC/KRW", side, f)}
        value = moves.get("BTC", D(0)) * f.price + moves.get("KRW", D(0))
        fee_value = f.fee * f.price if f.fee_asset == "BTC" else f.fee
        assert value == -fee_value
