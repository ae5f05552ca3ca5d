"""The spatial core, case by case: depth, fees, FX, staleness, cooldown, limits and rounding."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from services.detector.books import FallbackRules, InstrumentTable
from services.detector.common import InvalidInput
from services.detector.spatial import SpatialConfig, SpatialDetector
from shared.models import Balance, BookSnapshot, BookStatus, FxRate, Instrument, Signal

NOW = 1_700_000_000_000_000_000
MS = 1_000_000
FEES = {"a": 0.001, "b": 0.001, "c": 0.001, "upbit": 0.0005, "bithumb": 0.001}


def detector(**overrides: object) -> SpatialDetector:
    config: dict[str, object] = dict(min_profit=0.0005, max_notional=10_000.0, max_book_age_ns=2_000 * MS,
                                     max_fx_age_ns=60_000 * MS, cooldown_ns=5_000 * MS, reemit_edge_step_bps=1.0)
    config.update(overrides)
    return SpatialDetector(SpatialConfig(**config), InstrumentTable(FallbackRules(FEES)))  # type: ignore[arg-type]


def book(exchange: str, bids: list[tuple[float, float]], asks: list[tuple[float, float]], *,
         symbol: str = "BTC/USDT", age_ms: int = 0, seq: int = 1) -> BookSnapshot:
    ts = NOW - age_ms * MS
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=seq, bids=bids, asks=asks, ts_exchange_ns=ts,
                        ts_recv_ns=ts)


def fx(rate: float, *, age_ms: int = 0, bid: float | None = None, ask: float | None = None) -> FxRate:
    return FxRate(pair="USDT/KRW", rate=rate, bid=bid, ask=ask, source="test", ts_source_ns=NOW - age_ms * MS)


def feed(det: SpatialDetector, *books: BookSnapshot, now: int = NOW) -> list[Signal]:
    out: list[Signal] = []
    for b in books:
        out = det.on_book(b, now)
    return out


def legs(signal: Signal) -> list[tuple[str, str, Decimal, Decimal]]:
    return [(leg.exchange, leg.side, leg.price, leg.quantity) for leg in signal.legs]


# ------------------------------------------------------------------ edge, depth, fees


def test_buys_where_cheapest_and_sells_where_dearest() -> None:
    det = detector()
    [sig] = feed(det, book("a", [(99.0, 1.0)], [(100.0, 1.0)]),
                 book("b", [(100.5, 1.0)], [(101.5, 1.0)]),
                 book("c", [(102.0, 1.0)], [(103.0, 1.0)]))
    assert legs(sig) == [("a", "buy", Decimal("100.0"), Decimal("1.0")),
                         ("c", "sell", Decimal("102.0"), Decimal("1.0"))]
    # 102 - 100 = 2 gross; fees 0.1 + 0.102; notional 100.
    assert sig.expected_profit == pytest.approx(2.0 - 0.1 - 0.102)
    assert sig.net_edge_bps == pytest.approx((2.0 - 0.202) / 100 * 10_000)
    assert sig.gross_edge_bps == pytest.approx(200.0)
    assert sig.meta["gross_profit"] == pytest.approx(2.0) and sig.meta["fees"] == pytest.approx(0.202)
    assert sig.notional == pytest.approx(100.0) and sig.profit_currency == "USDT"


def test_walks_both_books_while_the_marginal_unit_clears_the_threshold_and_limits_are_the_worst_levels() -> None:
    det = detector(min_profit=0.001)
    # Units: 0.5 @100 vs 102 (+), 0.5 @100 vs 101 (+), 1 @100.5 vs 101 (~0.3% net: +),
    # then 100.9 vs 101: 0.1% gross, below the 0.2% of fees: stop.
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 1.0), (100.5, 1.0), (100.9, 5.0)]),
                 book("b", [(102.0, 0.5), (101.0, 1.5), (100.0, 5.0)], [(103.0, 1.0)]))
    assert legs(sig) == [("a", "buy", Decimal("100.5"), Decimal("2.0")),
                         ("b", "sell", Decimal("101.0"), Decimal("2.0"))]
    cost = 100.0 + 100.5
    proceeds = 0.5 * 102.0 + 1.5 * 101.0
    assert sig.expected_profit == pytest.approx(proceeds * 0.999 - cost * 1.001)
    assert sig.meta["buy_vwap"] == pytest.approx(cost / 2) and sig.meta["sell_vwap"] == pytest.approx(proceeds / 2)


def test_a_spread_smaller_than_both_fees_gives_no_signal() -> None:
    det = detector(min_profit=0.0)
    assert feed(det, book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(100.15, 1.0)], [(101.0, 1.0)])) == []
    assert det.opportunities("BTC", NOW) == []


def test_the_marginal_threshold_is_net_of_fees_and_the_transfer_cost() -> None:
    # 30 bps gross - 20 bps fees = 10 bps net: clears 5 bps, not 5 bps plus 6 bps of transfer cost.
    books = (book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(100.3, 1.0)], [(101.0, 1.0)]))
    assert feed(detector(min_profit=0.0005), *books)
    assert feed(detector(min_profit=0.0005, transfer_cost=0.0006), *books) == []
    [sig] = feed(detector(min_profit=0.0005, transfer_cost=0.0002), *books)
    assert sig.meta["transfer_cost"] == pytest.approx(100.0 * 0.0002)


def test_the_trigger_is_the_origin_and_ages_are_reported() -> None:
    det = detector()
    det.on_book(book("a", [(99.0, 1.0)], [(100.0, 1.0)], age_ms=300, seq=7), NOW)
    [sig] = det.on_book(book("b", [(101.0, 1.0)], [(102.0, 1.0)], age_ms=10, seq=9), NOW)
    assert sig.ts_origin_ns == NOW - 10 * MS and sig.ts_ns == NOW
    assert [(leg.book_seq, leg.book_age_ns) for leg in sig.legs] == [(7, 300 * MS), (9, 10 * MS)]
    assert sig.fx_rate is None and sig.fx_age_ns is None  # both books in USDT


# ------------------------------------------------------------------ FX


def test_a_krw_book_is_valued_through_the_published_rate() -> None:
    binance = book("a", [(99_990.0, 1.0)], [(100_000.0, 1.0)])
    upbit = book("upbit", [(139_500_000.0, 1.0)], [(139_600_000.0, 1.0)], symbol="BTC/KRW")
    cheap_krw, dear_krw = detector(), detector()
    cheap_krw.on_fx(fx(1380.0, age_ms=100), NOW)  # 139.5M KRW = 101,087 USDT: sell in Korea
    dear_krw.on_fx(fx(1400.0), NOW)  # 139.6M KRW = 99,714 USDT: buy in Korea
    [up] = feed(cheap_krw, binance, upbit)
    [down] = feed(dear_krw, binance, upbit)
    assert [(leg.exchange, leg.side) for leg in up.legs] == [("a", "buy"), ("upbit", "sell")]
    assert [(leg.exchange, leg.side) for leg in down.legs] == [("upbit", "buy"), ("a", "sell")]
    assert up.fx_rate == 1380.0 and up.fx_age_ns == 100 * MS and up.meta["fx"] == {"USDT/KRW": 1380.0}
    # 0.1 BTC (the 10,000 USDT limit) sold in KRW, valued in USDT at 1380, less Upbit's 0.05% fee.
    assert up.legs[0].quantity == Decimal("0.1")
    assert up.expected_profit == pytest.approx(0.1 * (139_500_000.0 / 1380.0 * 0.9995 - 100_000.0 * 1.001))


def test_without_an_fx_rate_a_krw_book_is_never_compared() -> None:
    det = detector()
    assert feed(det, book("a", [(99_990.0, 1.0)], [(100_000.0, 1.0)]),
                book("upbit", [(160_000_000.0, 1.0)], [(160_100_000.0, 1.0)], symbol="BTC/KRW")) == []


def test_the_fx_spread_is_charged_against_the_trade() -> None:
    binance = book("a", [(99_990.0, 1.0)], [(100_000.0, 1.0)])
    upbit = book("upbit", [(139_500_000.0, 1.0)], [(139_600_000.0, 1.0)], symbol="BTC/KRW")
    mid_only, with_spread = detector(), detector()
    mid_only.on_fx(fx(1380.0), NOW)
    with_spread.on_fx(fx(1380.0, bid=1379.0, ask=1381.0), NOW)
    [a] = feed(mid_only, binance, upbit)
    [b] = feed(with_spread, binance, upbit)
    # KRW received is valued at the ask (fewer USDT per KRW): the worse side of the rate.
    assert b.expected_profit == pytest.approx(0.1 * (139_500_000.0 / 1381.0 * 0.9995 - 100_000.0 * 1.001))
    assert b.expected_profit < a.expected_profit


def test_two_books_in_the_same_foreign_quote_pay_no_fx_spread() -> None:
    det = detector()
    det.on_fx(fx(1380.0, bid=1370.0, ask=1390.0), NOW)  # a wide 1.4% spread
    [sig] = feed(det, book("upbit", [(139_000_000.0, 1.0)], [(139_100_000.0, 1.0)], symbol="BTC/KRW"),
                 book("bithumb", [(139_500_000.0, 1.0)], [(139_600_000.0, 1.0)], symbol="BTC/KRW"))
    # 0.36% in KRW less 0.05% + 0.1% of fees, valued at the mid: the spread costs nothing.
    krw = 139_500_000.0 * 0.999 - 139_100_000.0 * 1.0005
    assert sig.expected_profit == pytest.approx(float(sig.legs[0].quantity) * krw / 1380.0)


# ------------------------------------------------------------------ staleness


def test_a_book_older_than_its_limit_produces_no_signal() -> None:
    crossing = (book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(101.0, 1.0)], [(102.0, 1.0)]))
    assert feed(detector(), *crossing)
    old = book("a", [(99.0, 1.0)], [(100.0, 1.0)], age_ms=2_001)
    assert feed(detector(), old, crossing[1]) == []
    at_limit = book("a", [(99.0, 1.0)], [(100.0, 1.0)], age_ms=2_000)
    assert feed(detector(), at_limit, crossing[1])


def test_a_book_ages_out_with_time_alone() -> None:
    det = detector(cooldown_ns=0)
    a, b = book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(101.0, 1.0)], [(102.0, 1.0)])
    assert feed(det, a, b)
    assert det.opportunities("BTC", NOW + 2_001 * MS) == []


def test_an_fx_rate_older_than_its_limit_produces_no_signal() -> None:
    binance = book("a", [(99_990.0, 1.0)], [(100_000.0, 1.0)])
    upbit = book("upbit", [(139_500_000.0, 1.0)], [(139_600_000.0, 1.0)], symbol="BTC/KRW")
    fresh, stale = detector(), detector()
    fresh.on_fx(fx(1380.0, age_ms=60_000), NOW)
    stale.on_fx(fx(1380.0, age_ms=60_001), NOW)
    assert feed(fresh, binance, upbit)
    assert feed(stale, binance, upbit) == []


def test_a_stale_status_drops_the_book_and_the_next_synced_snapshot_restores_it() -> None:
    det = detector(cooldown_ns=0)
    a, b = book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(101.0, 1.0)], [(102.0, 1.0)])
    assert feed(det, a, b)
    det.on_status(BookStatus(exchange="a", symbol="BTC/USDT", status="stale", reason="gap", ts_ns=NOW), NOW)
    assert det.opportunities("BTC", NOW) == [] and det.on_book(b, NOW) == []
    det.on_status(BookStatus(exchange="a", symbol="BTC/USDT", status="synced", reason="resync", ts_ns=NOW), NOW)
    assert det.opportunities("BTC", NOW) == []  # nothing to restore until a synced snapshot arrives
    assert det.on_book(book("a", [(99.0, 1.0)], [(100.0, 1.0)], seq=2), NOW)


def test_a_stale_snapshot_drops_the_book() -> None:
    det = detector(cooldown_ns=0)
    feed(det, book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(101.0, 1.0)], [(102.0, 1.0)]))
    stale = BookSnapshot(exchange="a", symbol="BTC/USDT", seq=2, bids=[], asks=[], ts_exchange_ns=NOW,
                         ts_recv_ns=NOW, status="stale")
    assert det.on_book(stale, NOW) == []
    assert det.books.get("a", "BTC/USDT") is None


def test_an_older_frame_does_not_replace_a_newer_book() -> None:
    det = detector()
    det.on_book(book("a", [(99.0, 1.0)], [(100.0, 1.0)], seq=5), NOW)
    det.on_book(book("a", [(89.0, 1.0)], [(90.0, 1.0)], seq=4, age_ms=50), NOW)
    held = det.books.get("a", "BTC/USDT")
    assert held is not None and held.seq == 5


# ------------------------------------------------------------------ cooldown


def test_the_same_opportunity_is_not_signalled_again_within_the_cooldown_unless_its_edge_grows() -> None:
    det = detector(cooldown_ns=5_000 * MS, reemit_edge_step_bps=1.0)
    a = book("a", [(99.0, 1.0)], [(100.0, 1.0)])
    assert feed(det, a, book("b", [(101.0, 1.0)], [(102.0, 1.0)]))
    assert det.on_book(book("b", [(101.005, 1.0)], [(102.0, 1.0)], seq=2), NOW + MS) == []  # +0.5 bp
    [grown] = det.on_book(book("b", [(101.02, 1.0)], [(102.0, 1.0)], seq=3), NOW + 2 * MS)  # +2 bp
    assert grown.legs[1].price == Decimal("101.02")
    assert det.on_book(book("b", [(101.02, 1.0)], [(102.0, 1.0)], seq=4), NOW + 3 * MS) == []
    later = NOW + 5_003 * MS  # the cooldown is over: the same edge is signalled again
    assert det.on_book(book("b", [(101.02, 1.0)], [(102.0, 1.0)], seq=5, age_ms=-5_003), later) == []  # a is stale
    assert det.on_book(book("a", [(99.0, 1.0)], [(100.0, 1.0)], seq=6, age_ms=-5_003), later)


def test_two_opportunities_sharing_a_book_do_not_both_count_its_depth() -> None:
    det = detector()
    signals = feed(det, book("a", [(99.0, 1.0)], [(100.0, 1.0)]),
                   book("b", [(101.0, 1.0)], [(102.0, 1.0)]),
                   book("c", [(101.5, 1.0)], [(102.5, 1.0)]))
    assert [legs(s)[1][0] for s in signals] == ["c"]  # a->c is best; a->b would reuse a's asks
    assert len(det.opportunities("BTC", NOW)) == 2


# ------------------------------------------------------------------ limits and balances


def test_the_max_notional_caps_the_size() -> None:
    det = detector(max_notional=150.0)
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 5.0)]), book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    assert sig.legs[0].quantity == Decimal("1.5") and sig.notional == pytest.approx(150.0)


def test_known_balances_cap_the_size() -> None:
    det = detector()
    det.on_balance(Balance(exchange="b", asset="BTC", free=Decimal("0.7"), ts_ns=NOW))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 5.0)]), book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    assert sig.legs[0].quantity == Decimal("0.7")
    det = detector()
    det.on_balance(Balance(exchange="a", asset="USDT", free=Decimal("100.1"), ts_ns=NOW))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 5.0)]), book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    assert sig.legs[0].quantity == Decimal("1")  # 1 x 100 x 1.001 = 100.1 of quote locked


# ------------------------------------------------------------------ rounding


def instruments(*items: Instrument) -> InstrumentTable:
    return InstrumentTable(FallbackRules(FEES), items)


def inst(exchange: str, tick: str, lot: str, min_notional: str = "0") -> Instrument:
    return Instrument(exchange=exchange, symbol="BTC/USDT", native="BTCUSDT", base="BTC", quote="USDT",
                      tick_size=Decimal(tick), lot_size=Decimal(lot), min_notional=Decimal(min_notional),
                      taker_fee=Decimal("0.001"))


def test_the_quantity_is_floored_to_both_lots_and_the_edge_recomputed_on_it() -> None:
    det = SpatialDetector(SpatialConfig(max_notional=10_000.0), instruments(inst("a", "0.01", "0.001"),
                                                                            inst("b", "0.01", "0.0003")))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 0.5), (100.01, 0.01)]),
                 book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    # 0.51 walked; the common lot of 0.001 and 0.0003 is 0.003: 0.51 is on it.
    assert sig.legs[0].quantity == Decimal("0.510")
    det = SpatialDetector(SpatialConfig(max_notional=10_000.0), instruments(inst("a", "0.01", "0.001"),
                                                                            inst("b", "0.01", "0.0004")))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.0, 0.5), (100.01, 0.011)]),
                 book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    assert sig.legs[0].quantity == Decimal("0.510")  # 0.511 floored to the 0.002 common lot
    assert sig.legs[0].price == Decimal("100.01")
    assert sig.expected_profit == pytest.approx(0.51 * 102 * 0.999 - (0.5 * 100 + 0.01 * 100.01) * 1.001)


def test_limit_prices_round_buys_up_and_sells_down_to_the_tick() -> None:
    det = SpatialDetector(SpatialConfig(max_notional=10_000.0), instruments(inst("a", "0.5", "0.001"),
                                                                            inst("b", "0.5", "0.001")))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.2, 1.0)]), book("b", [(102.3, 1.0)], [(103.0, 5.0)]))
    assert (sig.legs[0].price, sig.legs[1].price) == (Decimal("100.5"), Decimal("102.0"))


def test_a_known_quote_balance_covers_the_rounded_up_limit_price() -> None:
    det = SpatialDetector(SpatialConfig(max_notional=10_000.0), instruments(inst("a", "1", "0.001"),
                                                                            inst("b", "0.01", "0.001")))
    det.on_balance(Balance(exchange="a", asset="USDT", free=Decimal("100.3"), ts_ns=NOW))
    [sig] = feed(det, book("a", [(99.0, 5.0)], [(100.2, 5.0)]), book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    # At 100.2 the balance covers 1.0; the limit rounds up to 101, which locks 101 x 1.001 per unit.
    assert sig.legs[0].price == Decimal("101")
    assert sig.legs[0].quantity * sig.legs[0].price * Decimal("1.001") <= Decimal("100.3")
    assert sig.legs[0].quantity == Decimal("0.992")


def test_a_trade_below_the_minimum_notional_is_not_signalled() -> None:
    det = SpatialDetector(SpatialConfig(max_notional=10_000.0), instruments(inst("a", "0.01", "0.001", "10"),
                                                                            inst("b", "0.01", "0.001")))
    small = (book("a", [(99.0, 5.0)], [(100.0, 0.09)]), book("b", [(102.0, 5.0)], [(103.0, 5.0)]))
    assert feed(det, *small) == []
    assert feed(det, book("a", [(99.0, 5.0)], [(100.0, 0.1)], seq=2))


# ------------------------------------------------------------------ identity and bad input


def test_signal_ids_depend_only_on_the_inputs() -> None:
    books = (book("a", [(99.0, 1.0)], [(100.0, 1.0)]), book("b", [(101.0, 1.0)], [(102.0, 1.0)]))
    [one] = feed(detector(), *books)
    [two] = feed(detector(), *books, now=NOW + 500 * MS)  # processed later: same inputs, same id
    assert one.signal_id == two.signal_id
    [other] = feed(detector(), books[0], book("b", [(101.0, 1.0)], [(102.0, 1.0)], seq=2))
    assert other.signal_id != one.signal_id


@pytest.mark.parametrize("bids, asks, reason", [
    ([(101.0, 1.0)], [(100.0, 1.0)], "crossed"),
    ([(99.0, 1.0), (99.5, 1.0)], [(100.0, 1.0)], "unsorted"),
    ([(99.0, 1.0)], [(100.0, 1.0), (100.0, 1.0)], "unsorted"),
    ([(99.0, -1.0)], [(100.0, 1.0)], "unsorted"),
    ([(99.0, 1.0)], [(100.0, math.nan)], "unsorted"),
    ([(math.nan, 1.0)], [(100.0, 1.0)], "unsorted"),
    ([(99.0, 1.0)], [(math.inf, 1.0)], "unsorted"),
    ([(0.0, 1.0)], [(100.0, 1.0)], "unsorted"),
    ([], [(100.0, 1.0)], "empty"),
])
def test_a_book_no_exchange_could_send_is_rejected_with_its_reason_and_not_used(
        bids: list[tuple[float, float]], asks: list[tuple[float, float]], reason: str) -> None:
    det = detector()
    det.on_book(book("a", [(101.0, 1.0)], [(102.0, 1.0)]), NOW)
    with pytest.raises(InvalidInput) as err:
        det.on_book(book("b", bids, asks), NOW)
    assert err.value.reason == reason
    assert det.books.get("b", "BTC/USDT") is None


def test_an_invalid_fx_rate_is_rejected() -> None:
    det = detector()
    with pytest.raises(InvalidInput):
        det.on_fx(fx(-1.0), NOW)
    with pytest.raises(InvalidInput):
        det.on_fx(fx(1380.0, bid=1381.0, ask=1379.0), NOW)
    assert det.fx.latest("USDT/KRW") is None


def test_premium_of_a_krw_venue_is_its_mid_through_fx_over_the_usdt_venues_median() -> None:
    det = detector()
    det.on_fx(fx(1400.0), NOW)
    feed(det, book("a", [(99.0, 1.0)], [(101.0, 1.0)]),  # mid 100
         book("b", [(101.0, 1.0)], [(103.0, 1.0)]),  # mid 102: median of a and b is 101
         book("upbit", [(143_000.0, 1.0)], [(144_200.0, 1.0)], symbol="BTC/KRW"))  # mid 143_600 KRW = 102.571 USDT
    premiums = det.premiums("BTC", NOW)
    assert premiums["a"] == pytest.approx(100 / 101 - 1)
    assert premiums["upbit"] == pytest.approx(143_600 / 1400 / 101 - 1)
    assert det.premiums("ETH", NOW) == {}
    assert "upbit" not in det.premiums("BTC", NOW + 5_000 * MS)  # stale books have no premium
