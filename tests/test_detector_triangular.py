"""The triangular core, case by case: direction, fees, depth, rounding, staleness, and which
cycles an update re-evaluates."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.detector.books import FallbackRules, InstrumentTable
from services.detector.triangular import Cycle, TriangularConfig, TriangularDetector
from shared.models import BookSnapshot, Instrument

NOW = 1_700_000_000_000_000_000
MS = 1_000_000


def detector(fee: float = 0.0, *instruments: Instrument, **config: object) -> TriangularDetector:
    settings: dict[str, object] = dict(min_profit=0.0005, max_notional=10_000.0, cooldown_ns=0,
                                       max_book_age_ns=2_000 * MS)
    settings.update(config)
    return TriangularDetector(TriangularConfig(**settings),  # type: ignore[arg-type]
                              InstrumentTable(FallbackRules({"ex": fee}), instruments))


def book(symbol: str, bid: tuple[float, float], ask: tuple[float, float], *, age_ms: int = 0,
         seq: int = 1) -> BookSnapshot:
    ts = NOW - age_ms * MS
    return BookSnapshot(exchange="ex", symbol=symbol, seq=seq, bids=[bid], asks=[ask], ts_exchange_ns=ts,
                        ts_recv_ns=ts)


# USDT -> BTC (ask 100,010) -> ETH (ask 0.04 BTC) -> USDT (bid 4,010): 4010 / 4000.4 = +24 bps.
# ETH/BTC offers 0.2 ETH = 0.008 BTC = 800.08 USDT of the start currency: that is the size.
TRIANGLE = (
    book("BTC/USDT", (100_000.0, 1.0), (100_010.0, 0.01)),
    book("ETH/USDT", (4_010.0, 1.0), (4_011.0, 1.0)),
    book("ETH/BTC", (0.0399, 1.0), (0.04, 0.2)),
)


def test_the_profitable_direction_is_found_with_its_legs_sized_by_the_thinnest_book() -> None:
    det = detector()
    signals = [s for b in TRIANGLE for s in det.on_book(b, NOW)]
    [sig] = signals
    assert sig.meta["cycle"] == ["USDT", "BTC", "ETH"]
    assert [(leg.symbol, leg.side, leg.price, leg.quantity) for leg in sig.legs] == [
        ("BTC/USDT", "buy", Decimal("100010.0"), Decimal("0.008")),
        ("ETH/BTC", "buy", Decimal("0.04"), Decimal("0.2")),
        ("ETH/USDT", "sell", Decimal("4010.0"), Decimal("0.2")),
    ]
    assert sig.expected_profit == pytest.approx(0.2 * 4010.0 - 0.008 * 100_010.0)
    assert sig.notional == pytest.approx(800.08)
    assert sig.net_edge_bps == pytest.approx((4010.0 / 4000.4 - 1) * 10_000)
    assert sig.strategy == "triangular" and sig.asset == "USDT" and sig.ts_origin_ns == NOW


def test_three_taker_fees_can_take_the_whole_edge() -> None:
    det = detector(0.001)  # 24 bps gross against 30 bps of fees
    assert [s for b in TRIANGLE for s in det.on_book(b, NOW)] == []
    assert det.opportunities(NOW) == []
    det = detector(0.0002)  # 6 bps of fees: 18 bps net
    [sig] = [s for b in TRIANGLE for s in det.on_book(b, NOW)]
    # Flooring each leg to its lot leaves a little dust behind, valued at nothing.
    assert sig.net_edge_bps == pytest.approx((4010.0 / 4000.4 * 0.9998**3 - 1) * 10_000, rel=1e-4)
    assert sig.net_edge_bps < (4010.0 / 4000.4 * 0.9998**3 - 1) * 10_000


def test_a_stale_book_in_the_cycle_produces_no_signal() -> None:
    det = detector()
    det.on_book(book("BTC/USDT", (100_000.0, 1.0), (100_010.0, 0.01), age_ms=2_001), NOW)
    assert [s for b in TRIANGLE[1:] for s in det.on_book(b, NOW)] == []


def test_an_update_re_evaluates_only_the_cycles_through_its_market() -> None:
    det = detector()
    for b in TRIANGLE:
        det.on_book(b, NOW)
    det.on_book(book("SOL/USDT", (151.0, 1.0), (151.1, 1.0)), NOW)
    det.on_book(book("SOL/BTC", (0.0015, 1.0), (0.001501, 1.0)), NOW)
    assert len(det.cycles) == 4  # two triangles, two directions each
    # USDT -> BTC -> SOL -> USDT crosses too (151 / (100,010 x 0.001501) = 1.0059): it must not be
    # looked at when only ETH/BTC moves.
    assert any(o.cycle.currencies == ("USDT", "BTC", "SOL") for o in det.opportunities(NOW))
    evaluated: list[Cycle] = []
    original = det._size

    def spy(cycle: Cycle, now_ns: int) -> object:
        evaluated.append(cycle)
        return original(cycle, now_ns)

    det._size = spy  # type: ignore[method-assign,assignment]
    det.on_book(book("ETH/BTC", (0.0395, 1.0), (0.04, 0.2), seq=2), NOW)
    symbols = {det._markets[m].symbol for c in evaluated for m in c.markets}
    assert evaluated and "SOL/USDT" not in symbols and "SOL/BTC" not in symbols


def test_each_leg_is_on_its_lot_and_spends_no_more_than_the_previous_leg_returned() -> None:
    lots = {"BTC/USDT": "0.00001", "ETH/BTC": "0.0001", "ETH/USDT": "0.0001"}  # Binance's steps
    instruments = [Instrument(exchange="ex", symbol=s, native=s, base=s.split("/")[0], quote=s.split("/")[1],
                              tick_size=Decimal("1e-8"), lot_size=Decimal(lot), taker_fee=Decimal("0.0002"))
                   for s, lot in lots.items()]
    det = detector(0.0002, *instruments)
    [sig] = [s for b in TRIANGLE for s in det.on_book(b, NOW)]
    for leg in sig.legs:
        assert leg.quantity % Decimal(lots[leg.symbol]) == 0
    btc, eth, _ = sig.legs
    btc_received = float(btc.quantity) * 0.9998
    assert float(eth.quantity) * 0.04 <= btc_received  # ETH/BTC buy spends BTC the first leg returned
    assert float(sig.legs[2].quantity) <= float(eth.quantity) * 0.9998
    assert sig.expected_profit == pytest.approx(
        float(sig.legs[2].quantity) * 4010.0 * 0.9998 - float(btc.quantity) * 100_010.0)


def test_a_cycle_starting_in_btc_books_its_profit_in_usdt_through_the_btc_book() -> None:
    det = detector(start_currencies=("USDT", "BTC"))
    books = [book("BTC/USDT", (50_000.0, 1.0), (50_010.0, 1.0)),
             book("SOL/BTC", (0.00301, 10.0), (0.003011, 10.0)),
             book("SOL/ETH", (0.0749, 10.0), (0.075, 10.0)),
             book("ETH/BTC", (0.0409, 10.0), (0.041, 10.0))]
    signals = [s for b in books for s in det.on_book(b, NOW)]
    # BTC -> ETH (ask 0.041) -> SOL (ask 0.075) -> BTC (bid 0.00301): 0.00301 / 0.003075 < 1;
    # BTC -> SOL (ask 0.003011) -> ETH (bid 0.0749) -> BTC (bid 0.0409): 0.0749 * 0.0409 / 0.003011 > 1.
    [sig] = signals
    assert sig.meta["cycle"] == ["BTC", "SOL", "ETH"]
    assert sig.meta["start_value"] == pytest.approx(50_005.0)
    assert sig.expected_profit == pytest.approx(sig.meta["profit_start_currency"] * 50_005.0)
    assert sig.notional <= 10_000.0 * (1 + 1e-9)


def test_books_stored_without_evaluation_feed_later_cycles() -> None:
    det = detector()
    assert det.on_book(TRIANGLE[0], NOW, evaluate=False) == []
    assert det.on_book(TRIANGLE[1], NOW, evaluate=False) == []
    assert det.on_book(TRIANGLE[2], NOW)


def test_a_fee_published_after_the_books_applies_to_them() -> None:
    det = detector(0.0)
    for b in TRIANGLE:
        det.on_book(b, NOW)
    [before] = det.opportunities(NOW)
    for b in TRIANGLE:
        base, quote = b.symbol.split("/")
        det.set_instrument(Instrument(exchange="ex", symbol=b.symbol, native=b.symbol, base=base, quote=quote,
                                      tick_size=Decimal("1e-8"), lot_size=Decimal("1e-8"),
                                      taker_fee=Decimal("0.0002")))
    [after] = det.opportunities(NOW)
    fresh = detector(0.0002)
    for b in TRIANGLE:
        fresh.on_book(b, NOW)
    [expected] = fresh.opportunities(NOW)
    assert after.net_profit == pytest.approx(expected.net_profit) and after.net_profit < before.net_profit
