"""Pure cores of the executor: order state machine, leg-risk policy, PnL, rate limiter, intents."""

from __future__ import annotations

from decimal import Decimal as D

import msgspec
import pytest
from executor_support import BTC_KRW, BTC_USDT, spatial_intent

from services.executor.execution import InvalidIntent, correction_id, decode_intent
from services.executor.legs import LegPosition, LegRiskPolicy, classify, residuals
from services.executor.markets import bounded_to_tick, prepare
from services.executor.orders import InvalidTransition, OrderStateMachine
from services.executor.pnl import MissingFxRate, realised_pnl
from services.executor.ratelimit import RateLimiter
from shared.models import Fill, OrderLeg, Residual, encode

# --------------------------------------------------------------------------- state machine


def test_ioc_with_a_remainder_passes_through_partially_filled_to_canceled() -> None:
    m = OrderStateMachine("c1", D("1"))
    steps = m.settle("CANCELED", D("0.4"), "IOC: rest cancelled")
    assert [(t.status, t.filled_quantity) for t in steps] == [("PARTIALLY_FILLED", D("0.4")), ("CANCELED", D("0.4"))]
    assert m.terminal


def test_full_fill_goes_straight_to_filled_and_a_repeat_changes_nothing() -> None:
    m = OrderStateMachine("c1", D("1"))
    assert [t.status for t in m.settle("FILLED", D("1"))] == ["FILLED"]
    assert m.settle("FILLED", D("1")) == []


def test_unknown_then_reconciled() -> None:
    m = OrderStateMachine("c1", D("2"))
    m.settle("UNKNOWN", D(0), "timeout")
    assert [t.status for t in m.settle("FILLED", D("2"))] == ["FILLED"]


@pytest.mark.parametrize(("start", "filled", "to", "qty"), [
    ("FILLED", D(1), "CANCELED", D(1)),          # final states are final
    ("REJECTED", D(0), "FILLED", D(0)),
    ("NEW", D(0), "FILLED", D("0.5")),           # FILLED needs the whole quantity
    ("PARTIALLY_FILLED", D("0.5"), "PARTIALLY_FILLED", D("0.4")),  # filled never goes down
    ("NEW", D(0), "CANCELED", D("1.5")),         # never more than the order
    ("NEW", D(0), "REJECTED", D("0.1")),         # a rejected order has no fills
])
def test_impossible_transitions_are_refused(start, filled, to, qty) -> None:  # type: ignore[no-untyped-def]
    m = OrderStateMachine("c1", D(1), start, filled)
    with pytest.raises(InvalidTransition):
        m.apply(to, qty)


# --------------------------------------------------------------------------- leg risk


def leg(side: str, qty: str = "1", exchange: str = "binance", symbol: str = "BTC/USDT",
        price: str = "100") -> OrderLeg:
    return OrderLeg(client_order_id=f"{exchange}{side}", exchange=exchange, symbol=symbol, side=side,  # type: ignore[arg-type]
                    price=D(price), quantity=D(qty))


policy = LegRiskPolicy(D("0.003"))


def test_hedge_completes_the_short_leg_at_a_bounded_price() -> None:
    positions = [LegPosition(leg("buy"), D("1"), D("0.001"), best_bid=D("99"), best_ask=D("101")),
                 LegPosition(leg("sell", exchange="upbit"), D("0.4"), D("0.001"), best_bid=D("99"),
                             best_ask=D("101"))]
    [c] = policy.plan(positions, "hedge")
    assert (c.leg_index, c.role, c.side, c.quantity) == (1, "hedge", "sell", D("0.6"))
    assert c.price == D("99") * (1 - D("0.003"))


def test_unwind_takes_back_the_excess_of_the_long_leg() -> None:
    positions = [LegPosition(leg("buy"), D("1"), D("0.001"), best_bid=D("99"), best_ask=D("101")),
                 LegPosition(leg("sell", exchange="upbit"), D("0.4"), D("0.001"))]
    [c] = policy.plan(positions, "unwind")
    assert (c.leg_index, c.role, c.side, c.quantity) == (0, "unwind", "sell", D("0.6"))
    assert c.price == D("99") * (1 - D("0.003"))


def test_balanced_legs_need_nothing_and_leave_no_residual() -> None:
    positions = [LegPosition(leg("buy", "0.3"), D("0.1")), LegPosition(leg("sell", "0.3"), D("0.1"))]
    assert policy.plan(positions, "hedge") == [] and policy.plan(positions, "unwind") == []
    assert residuals(positions) == []


def test_what_is_below_the_lot_or_the_minimums_stays_as_a_residual() -> None:
    positions = [LegPosition(leg("buy", "1"), D("1"), D("0.01")),
                 LegPosition(leg("sell", "1", exchange="upbit"), D("0.995"), D("0.01"))]
    assert policy.plan(positions, "hedge") == []  # 0.005 < lot
    assert residuals(positions) == [Residual(exchange="binance", asset="BTC", quantity=D("0.005"))]
    notional = [LegPosition(leg("buy", "1"), D("1"), D("0.001"), min_notional=D("100")),
                LegPosition(leg("sell", "1", exchange="upbit"), D("0.5"), D("0.001"), min_notional=D("100"))]
    assert policy.plan(notional, "hedge") == []  # 0.5 * ~99.7 < 100


def test_residual_is_signed_long_after_a_buy_short_after_a_sell() -> None:
    long_ = residuals([LegPosition(leg("buy"), D("1")), LegPosition(leg("sell", exchange="upbit"), D("0"))])
    short = residuals([LegPosition(leg("buy"), D("0")), LegPosition(leg("sell", exchange="upbit"), D("0.25"))])
    assert long_ == [Residual(exchange="binance", asset="BTC", quantity=D("1"))]
    assert short == [Residual(exchange="upbit", asset="BTC", quantity=D("-0.25"))]


def test_exact_ratios_leave_no_phantom_residual_with_unequal_leg_sizes() -> None:
    positions = [LegPosition(leg("buy", "3"), D("1")), LegPosition(leg("sell", "6"), D("2"))]
    assert residuals(positions) == []
    assert policy.plan(positions, "hedge") == []


def test_execution_status_from_what_happened() -> None:
    assert classify(entry_complete=True, any_fill=True, hedged=False, unwound=False, residual=False) == "completed"
    assert classify(entry_complete=False, any_fill=False, hedged=False, unwound=False, residual=False) == "failed"
    assert classify(entry_complete=False, any_fill=True, hedged=True, unwound=False, residual=False) == "hedged"
    assert classify(entry_complete=False, any_fill=True, hedged=True, unwound=True, residual=False) == "unwound"
    assert classify(entry_complete=False, any_fill=True, hedged=True, unwound=False, residual=True) == "partial"
    assert classify(entry_complete=False, any_fill=True, hedged=False, unwound=False, residual=False) == "partial"


def test_correction_ids_are_deterministic_short_and_alphanumeric() -> None:
    a = correction_id("x" * 32, "hedge", 1)
    assert a == correction_id("x" * 32, "hedge", 1) != correction_id("x" * 32, "hedge", 2)
    assert a != correction_id("x" * 32, "unwind", 1)
    assert len(a) <= 32 and a.isalnum()


def test_bounded_price_goes_on_the_tick_without_passing_the_bound() -> None:
    assert bounded_to_tick(BTC_KRW, D("159999999.7"), "buy") == D("159999000")
    assert bounded_to_tick(BTC_KRW, D("159000000.3"), "sell") == D("159001000")
    assert bounded_to_tick(BTC_USDT, D("100.019"), "buy") == D("100.01")


def test_prepare_rounds_to_tick_and_lot_and_refuses_below_the_minimums() -> None:
    p = prepare(leg("buy", "0.0123456", price="115279.254"), BTC_USDT, known=True)
    assert (p.leg.price, p.leg.quantity, p.rejection) == (D("115279.26"), D("0.01234"), "")
    tiny = prepare(leg("buy", "0.00004", price="100000"), BTC_USDT, known=True)
    assert "below the minimum" in tiny.rejection
    zero = prepare(leg("buy", "0.000001", price="100000"), BTC_USDT, known=True)
    assert "rounds to 0" in zero.rejection and zero.leg.quantity == D("0.000001")
    assert "no trading rules" in prepare(leg("buy"), BTC_USDT, known=False, require_rules=True).rejection


# --------------------------------------------------------------------------- PnL


def fill(symbol: str, side: str, price: str, qty: str, fee: str, fee_asset: str, exchange: str = "x") -> Fill:
    return Fill(fill_id="f", client_order_id="c", arb_id="a", exchange=exchange, symbol=symbol, side=side,  # type: ignore[arg-type]
                price=D(price), quantity=D(qty), fee=D(fee), fee_asset=fee_asset, ts_ns=0)


def test_pnl_is_proceeds_minus_costs_minus_fees_per_currency_then_converted() -> None:
    fills = [
        fill("BTC/USDT", "buy", "100000", "0.01", "0.00001", "BTC"),      # fee in base: valued at 100000
        fill("BTC/KRW", "sell", "140000000", "0.01", "700", "KRW"),
    ]
    pnl = realised_pnl(fills, "USDT", {"USDT/KRW": D("1380")})
    assert pnl.by_currency == {"USDT": D("-1001.00000"), "KRW": D("1399300")}
    # 1399300 / 1380 = 1013.985507246376811594...: rounded half-even at 12 decimals.
    assert pnl.realised == D("-1001") + D("1013.985507246377")
    assert pnl.fees == D("1") + D("0.507246376812")
    assert pnl.fx_rates == {"USDT/KRW": D("1380")}


def test_pnl_without_the_rate_it_needs_says_so() -> None:
    fills = [fill("BTC/KRW", "sell", "140000000", "0.01", "700", "KRW")]
    with pytest.raises(MissingFxRate):
        realised_pnl(fills, "USDT", {})
    assert realised_pnl(fills, "USDT", {}, strict=False).missing == ("KRW",)


# --------------------------------------------------------------------------- rate limits


def test_binance_429_blocks_for_retry_after_and_418_for_the_ban() -> None:
    lim = RateLimiter("binance", capacity=6000, window_s=60)
    lim.on_response(429, {"Retry-After": "3"}, now=100.0)
    assert lim.wait_time(1, 100.0) == pytest.approx(3.0)
    assert lim.wait_time(1, 103.0) == 0
    lim.on_response(418, {"Retry-After": "120"}, now=200.0)
    assert lim.wait_time(1, 250.0) == pytest.approx(70.0)
    assert (lim.throttled, lim.banned) == (1, 1)


def test_weight_window_and_the_exchange_reported_weight() -> None:
    lim = RateLimiter("binance", capacity=10, window_s=60)
    for _ in range(10):
        assert lim.wait_time(1, 61.0) == 0
        lim.record(1, 61.0)
    assert lim.wait_time(1, 62.0) == pytest.approx(59.0)  # our oldest request leaves the window at 121
    other = RateLimiter("binance", capacity=10, window_s=60)
    other.on_response(200, {"X-MBX-USED-WEIGHT-1M": "10"}, now=125.0)
    assert other.wait_time(1, 125.0) == pytest.approx(55.0)  # the exchange's minute ends at 180


def test_upbit_remaining_req_zero_waits_for_the_next_second() -> None:
    lim = RateLimiter("upbit.order", capacity=8, window_s=1)
    lim.on_response(201, {"Remaining-Req": "group=order; min=1800; sec=0"}, now=10.25)
    assert lim.wait_time(1, 10.25) == pytest.approx(0.75)
    lim.on_response(429, {}, now=11.0)  # no Retry-After: the default back-off
    assert lim.wait_time(1, 11.0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- intents


def test_a_valid_intent_decodes() -> None:
    intent = spatial_intent()
    assert decode_intent(encode(intent)) == intent


@pytest.mark.parametrize(("change", "message"), [
    ({"client_order_id": "has-dash"}, "letters or digits"),
    ({"client_order_id": "x" * 33}, "letters or digits"),
    ({"exchange": "nowhere"}, "not a known exchange"),
    ({"symbol": "BTCUSDT"}, "BASE/QUOTE"),
    ({"quantity": "0"}, "must be positive"),
    ({"price": "-1"}, "must be positive"),
])
def test_a_bad_intent_is_refused_with_the_reason(change, message) -> None:  # type: ignore[no-untyped-def]
    doc = msgspec.json.decode(encode(spatial_intent()))
    doc["legs"][0].update(change)
    with pytest.raises(InvalidIntent, match=message):
        decode_intent(msgspec.json.encode(doc))


def test_duplicate_client_ids_and_garbage_are_refused() -> None:
    doc = msgspec.json.decode(encode(spatial_intent()))
    doc["legs"][1]["client_order_id"] = doc["legs"][0]["client_order_id"]
    with pytest.raises(InvalidIntent, match="used by another leg"):
        decode_intent(msgspec.json.encode(doc))
    with pytest.raises(ValueError):
        decode_intent(b'{"type":"order","arb_id":')
