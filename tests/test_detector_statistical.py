"""The statistical core: Engle-Granger pairs model on bars, and the detector that feeds it books.

Includes the study of the recorded Binance BTC/USDT and Upbit KRW-BTC 5-minute series
(tests/fixtures, see SOURCES.md): the KRW price over the USDT price is the kimchi premium
times the USD/KRW rate, and the figures are printed with ``-s``.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import math
import random
import statistics
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from services.detector.books import FallbackRules, InstrumentTable
from services.detector.common import InvalidInput
from services.detector.statistical import PairDecision, PairsModel, PairSpec, StatisticalConfig, StatisticalDetector
from shared.models import BookSnapshot, FxRate, Instrument

FIXTURES = Path(__file__).parent / "fixtures"
BINANCE_5M = FIXTURES / "binance" / "kimchi-premium-arbitrage_binance_BTC_USDT_5m_20250824_082608.csv.gz"
UPBIT_5M = FIXTURES / "upbit" / "kimchi-premium-arbitrage_upbit_BTC_KRW_5m_20250824_082622.csv.gz"
BAR = 300_000_000_000
S = 1_000_000_000


def spec(**overrides: object) -> PairSpec:
    base: dict[str, object] = dict(name="pair", y=("upbit", "BTC/KRW"), x=("binance", "BTC/USDT"),
                                   to_reference=False, bar_ns=BAR, window=60, entry_z=2.0, exit_z=0.5,
                                   max_pvalue=0.05, max_half_life_bars=30.0, max_missing_bars=3)
    base.update(overrides)
    return PairSpec(**base)  # type: ignore[arg-type]


def cointegrated_series(n: int, seed: int, shock_at: int | None = None) -> list[tuple[float, float]]:
    """x a random walk, log y = 0.3 + 0.8 log x + an AR(1) residual (half-life 1 bar)."""
    rng = random.Random(seed)
    lx, e, out = math.log(100.0), 0.0, []
    for i in range(n):
        lx += rng.gauss(0.0, 0.01)
        e = 0.5 * e + rng.gauss(0.0, 0.002)
        if i == shock_at:
            e += 0.02
        out.append((math.exp(0.3 + 0.8 * lx + e), math.exp(lx)))
    return out


def drive(model: PairsModel, series: list[tuple[float, float]], start: int = 0) -> list[PairDecision]:
    decisions = []
    for i, (y, x) in enumerate(series):
        d = model.on_bar(start + (i + 1) * BAR, y, x)
        if d is not None:
            decisions.append(d)
            model.closed() if d.action == "close" else model.opened(d)
    return decisions


# ------------------------------------------------------------------ the model


def test_model_finds_the_hedge_ratio_and_half_life_of_a_cointegrated_pair() -> None:
    model = PairsModel(spec(window=200))
    drive(model, cointegrated_series(201, seed=1))
    fit = model.last_fit
    assert fit is not None
    assert fit.hedge_ratio == pytest.approx(0.8, abs=0.05)
    assert fit.pvalue < 0.01 and fit.cointegrated
    assert 0.7 < fit.half_life_bars < 2.5  # AR(1) of 0.5: d e = -0.5 e, -ln 2 / -0.5 ~ 1.4 bars


def test_model_opens_short_on_a_rich_y_and_closes_when_the_spread_reverts() -> None:
    series = cointegrated_series(130, seed=3, shock_at=110)
    model = PairsModel(spec(window=100))
    decisions = drive(model, series)
    assert [d.action for d in decisions] == ["open_short", "close"], decisions
    opens = [d for d in decisions if d.action != "close" and d.fit.ts_ns == 111 * BAR]
    assert opens and opens[0].action == "open_short", decisions  # y jumped up: sell y, buy x
    assert opens[0].fit.zscore >= 2.0 and opens[0].fit.cointegrated
    after = [d for d in decisions if d.fit.ts_ns > 111 * BAR]
    assert after and after[0].action == "close"
    assert abs(after[0].fit.zscore) <= 0.5 or after[0].fit.zscore < 0


def test_model_never_opens_on_a_window_that_is_not_cointegrated() -> None:
    rng = random.Random(3)
    ly = lx = 4.0
    walks = []
    for _ in range(600):
        ly += rng.gauss(0, 0.01)
        lx += rng.gauss(0, 0.01)
        walks.append((math.exp(ly), math.exp(lx)))
    model = PairsModel(spec())
    for d in drive(model, walks):
        if d.action != "close":
            assert d.fit.cointegrated and d.fit.pvalue <= 0.05


def test_a_hole_longer_than_max_missing_bars_restarts_the_window() -> None:
    series = cointegrated_series(100, seed=4)
    model = PairsModel(spec(window=60, max_missing_bars=3))
    drive(model, series[:70])
    assert model.last_fit is not None and model.resets == 0
    model.on_bar(75 * BAR, *series[70])  # 4 bars missing (> 3): the window starts again
    assert model.resets == 1
    before = model.last_fit
    drive(model, series[71:100], start=75 * BAR)
    assert model.last_fit is before  # 30 bars since the hole: not enough for a 60-bar window


def test_a_short_hole_keeps_the_window() -> None:
    series = cointegrated_series(70, seed=5)
    model = PairsModel(spec(window=60, max_missing_bars=3))
    drive(model, series[:65])
    model.on_bar(69 * BAR, *series[65])  # 3 bars missing: allowed
    assert model.resets == 0 and model.last_fit is not None and model.last_fit.ts_ns == 69 * BAR


def test_non_positive_prices_are_rejected() -> None:
    with pytest.raises(InvalidInput):
        PairsModel(spec()).on_bar(BAR, 0.0, 100.0)


# ------------------------------------------------------------------ the recorded kimchi premium


def load_closes(path: Path) -> dict[int, float]:
    out = {}
    with gzip.open(path, "rt") as fh:
        for row in csv.DictReader(fh):
            ts = datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            out[int(ts.timestamp()) * S] = float(row["close"])
    return out


def test_kimchi_premium_on_recorded_binance_and_upbit_5m_series() -> None:
    binance = load_closes(BINANCE_5M)
    upbit = load_closes(UPBIT_5M)
    bars = sorted(binance.keys() & upbit.keys())  # Upbit has holes of days: only common bars
    assert len(binance) == 25_920 and len(upbit) == 5_200 and len(bars) == 5_200
    holes = sum(1 for a, b in itertools.pairwise(bars) if b - a > BAR)
    ratio = [upbit[t] / binance[t] for t in bars]  # KRW per USDT implied by BTC: FX x (1 + premium)

    window = 144  # 12 hours: the Upbit file's unbroken runs are ~200 bars (16.7 hours)
    model = PairsModel(spec(name="kimchi", window=window, max_half_life_bars=window / 2))
    fits, trades, entry, held, gated = [], [], None, 0, 0
    for t in bars:
        decision = model.on_bar(t, upbit[t], binance[t])
        held += model.position != 0
        if model.last_fit is not None and model.last_fit.ts_ns == t:
            fits.append(model.last_fit)
        if decision is None:
            continue
        if decision.action == "close":
            assert entry is not None
            # Log-spread captured, sign by direction: what the trade earned before costs.
            captured = (entry.fit.spread - decision.fit.spread) * (1 if entry.action == "open_short" else -1)
            # Taker fees in and out: Upbit 0.05% on y, Binance 0.1% on the hedge (|b| times the value).
            costs = 2 * (0.0005 + 0.001 * abs(entry.fit.hedge_ratio))
            trades.append((held, captured, costs))  # held: bars observed in the position, holes excluded
            model.closed()
            entry, held = None, 0
        else:
            assert decision.fit.cointegrated and abs(decision.fit.zscore) >= 2.0
            assert entry is None
            # The detector's own gate: expected reversion to exit_z, less fees in and out, >= 5 bps.
            expected = (abs(decision.fit.zscore) - 0.5) * decision.fit.std
            gated += expected - 2 * (0.0005 + 0.001 * abs(decision.fit.hedge_ratio)) >= 0.0005
            model.opened(decision)
            entry = decision

    cointegrated = [f for f in fits if f.cointegrated]
    half_lives = [f.half_life_bars for f in cointegrated]
    report = {
        "aligned_bars": len(bars),
        "holes": holes,
        "window_restarts": model.resets,
        "implied_krw_per_usdt": {
            "mean": round(statistics.fmean(ratio), 2), "std": round(statistics.stdev(ratio), 2),
            "min": round(min(ratio), 2), "max": round(max(ratio), 2),
        },
        "fits": len(fits),
        "cointegrated_share": round(len(cointegrated) / len(fits), 3),
        "hedge_ratio_median": round(statistics.median(f.hedge_ratio for f in fits), 3),
        "hedge_ratio_range": [round(min(f.hedge_ratio for f in fits), 3), round(max(f.hedge_ratio for f in fits), 3)],
        "residual_std_median_bps": round(statistics.median(f.std for f in fits) * 10_000, 2),
        "half_life_bars_median_when_cointegrated": round(statistics.median(half_lives), 2),
        "pvalue_median": round(statistics.median(f.pvalue for f in fits), 3),
        "round_trips": len(trades),
        "holding_bars_mean": round(statistics.fmean(h for h, _, _ in trades), 1),
        "captured_bps_mean_before_costs": round(statistics.fmean(c for _, c, _ in trades) * 10_000, 2),
        "taker_fees_bps_mean": round(statistics.fmean(f for _, _, f in trades) * 10_000, 2),
        "net_bps_mean_after_taker_fees": round(statistics.fmean(c - f for _, c, f in trades) * 10_000, 2),
        "round_trips_positive_after_fees": sum(1 for _, c, f in trades if c > f),
        "entries_the_detector_would_signal": gated,
    }
    print(f"\nkimchi premium, Binance BTC/USDT vs Upbit BTC/KRW, 5m closes: {report}")
    assert holes == 26
    assert 1_300 < report["implied_krw_per_usdt"]["mean"] < 1_450  # type: ignore[index]
    assert model.resets == 25  # every hole but the 3-missing-bar one (2025-07-30 16:20) restarts
    assert fits and trades
    assert all(h > 0 for h, _, _ in trades)


# ------------------------------------------------------------------ the detector on books


def make_book(exchange: str, symbol: str, mid: float, ts: int, seq: int, half: float) -> BookSnapshot:
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=seq, ts_exchange_ns=ts, ts_recv_ns=ts,
                        bids=[(round(mid - half, 2), 50.0), (round(mid - 2 * half, 2), 50.0)],
                        asks=[(round(mid + half, 2), 50.0), (round(mid + 2 * half, 2), 50.0)])


def test_detector_builds_bars_from_books_and_signals_entry_and_exit_with_model_figures() -> None:
    pair = spec(name="kimchi", to_reference=True, window=100, notional=500.0)
    instruments = InstrumentTable(FallbackRules({"upbit": 0.0005, "binance": 0.001}), [
        Instrument(exchange="upbit", symbol="BTC/KRW", native="KRW-BTC", base="BTC", quote="KRW",
                   tick_size=Decimal("1"), lot_size=Decimal("0.00000001"), taker_fee=Decimal("0.0005")),
    ])
    det = StatisticalDetector(StatisticalConfig(max_book_age_ns=2 * S, max_notional=1000.0, min_profit=0.0,
                                                pairs=(pair,)), instruments)
    series = cointegrated_series(130, seed=3, shock_at=110)
    signals = []
    for seq, (y_usdt, x) in enumerate(series, 1):
        t = seq * BAR - S  # a second before each bar ends
        krw = 1380.0 + seq * 0.1  # the FX rate moves; the model sees USDT prices
        det.on_fx(FxRate(pair="USDT/KRW", rate=krw, source="test", ts_source_ns=t), t)
        signals += det.on_book(make_book("upbit", "BTC/KRW", y_usdt * krw, t, seq, 500.0), t)
        signals += det.on_book(make_book("binance", "BTC/USDT", x, t + 1, seq, 0.01), t + 1)
    opens = [s for s in signals if s.action == "open"]
    closes = [s for s in signals if s.action == "close"]
    assert opens and closes, signals
    entry = opens[-1]
    assert entry.meta["decision"] == "open_short"
    assert entry.meta["zscore"] >= 2.0 and entry.meta["pvalue"] <= 0.05
    assert entry.meta["hedge_ratio"] == pytest.approx(0.8, abs=0.1)
    assert [(leg.exchange, leg.side) for leg in entry.legs] == [("upbit", "sell"), ("binance", "buy")]
    assert entry.legs[0].price % 1 == 0 and entry.fx_rate is not None and entry.fx_age_ns is not None
    assert entry.notional == pytest.approx(500.0, rel=0.01)
    exit_ = next(s for s in closes if s.ts_ns > entry.ts_ns)
    assert [(leg.side, leg.quantity) for leg in exit_.legs] == [("buy", entry.legs[0].quantity),
                                                                ("sell", entry.legs[1].quantity)]


def test_detector_signals_only_for_pairs_it_owns_but_follows_their_decisions() -> None:
    pair = spec(name="eth_btc", y=("okx", "ETH/USDT"), window=100)
    make = lambda: StatisticalDetector(  # noqa: E731
        StatisticalConfig(max_book_age_ns=2 * S, min_profit=0.0, pairs=(pair,)), InstrumentTable(FallbackRules({})))
    owner, follower = make(), make()
    owner.set_active_bases({"ETH"})
    follower.set_active_bases({"BTC"})  # reads x's stream only: the pair belongs to y's reader
    series = cointegrated_series(130, seed=3, shock_at=110)
    got: dict[str, list[str]] = {"owner": [], "follower": []}
    for i, (y, x) in enumerate(series):
        t = (i + 1) * BAR - S
        for name, det in (("owner", owner), ("follower", follower)):
            for s in det.on_book(make_book("okx", "ETH/USDT", y, t, i, 0.01), t) + det.on_book(
                    make_book("binance", "BTC/USDT", x, t, i, 0.01), t):
                got[name].append(s.action)
        assert owner.pairs[0].model.position == follower.pairs[0].model.position
    assert got["owner"] and not got["follower"]


def test_a_pair_whose_exit_is_not_inside_its_entry_is_a_config_error() -> None:
    from shared.config import ConfigError, load_config

    pair = {"name": "kimchi", "y": "upbit:BTC/KRW", "x": "binance:BTC/USDT", "entry_z": 2.0, "exit_z": 2.0}
    with pytest.raises(ConfigError, match="exit_z"):
        load_config(environ={}, overrides={"detector": {"stat_pairs": [pair]}})
    cfg = load_config(environ={}, overrides={"detector": {"stat_pairs": [{**pair, "exit_z": 0.5}]}})
    assert PairSpec.from_settings(cfg.detector.stat_pairs[0]).y == ("upbit", "BTC/KRW")
