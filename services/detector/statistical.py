"""Statistical arbitrage on configured pairs: Engle-Granger cointegration on rolling windows.

For a pair (y, x), e.g. Upbit BTC/KRW against Binance BTC/USDT (the kimchi premium):

- bars: the last mid of each leg at the end of every ``bar_ms`` (converted to the reference
  currency through FX when ``to_reference``), as log prices; a hole longer than
  ``max_missing_bars`` in either leg restarts the window, because the test and the
  half-life assume evenly spaced bars;
- fit, on each bar once ``window`` bars precede it: OLS ``log y = a + b log x`` over those
  bars (b is the rolling hedge ratio), ADF on the residual (statsmodels ``adfuller``, no
  constant, ``adf_lags`` lags) with the Engle-Granger (MacKinnon, two variables) p-value,
  the half-life of the residual from ``d e_t = l e_(t-1)`` (``-ln 2 / l`` bars); the new
  bar's spread ``log y - a - b log x`` is then scored against the window (z-score), so the
  model is never fitted on the bar it judges;
- decisions: flat and cointegrated (p <= ``max_pvalue``, half-life <= ``max_half_life_bars``)
  with |z| >= ``entry_z``: open (z > 0: y is dear, sell y and buy x; z < 0 the reverse);
  open and |z| <= ``exit_z`` or z crossed zero: close.

``PairsModel`` is the maths on bars alone (the backtest and the fixture study drive it
directly); ``StatisticalDetector`` builds bars from books and turns decisions into signals.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
from statsmodels.tsa.adfvalues import mackinnonp
from statsmodels.tsa.stattools import adfuller

from services.detector.books import InstrumentTable, MarketKey, book_problem
from services.detector.common import InvalidInput, signal_id
from services.detector.depth import snap, take
from services.detector.fx import IDENTITY, FxTable, fx_problem
from shared.config import Config, StatPairSettings
from shared.models import BookSnapshot, BookStatus, FxRate, Instrument, Side, Signal, SignalLeg
from shared.money import meets_minimums, round_price, round_to_step

_MS = 1_000_000

Action = Literal["open_long", "open_short", "close"]
"""``open_long``: buy y, sell x (the spread is cheap); ``open_short``: sell y, buy x."""


@dataclass(frozen=True, slots=True)
class PairSpec:
    name: str
    y: MarketKey
    x: MarketKey
    to_reference: bool = True
    bar_ns: int = 60_000 * _MS
    window: int = 240
    entry_z: float = 2.0
    exit_z: float = 0.5
    max_pvalue: float = 0.05
    max_half_life_bars: float = 120.0
    max_missing_bars: int = 3
    adf_lags: int = 1
    notional: float = 0.0

    @classmethod
    def from_settings(cls, s: StatPairSettings) -> PairSpec:
        yx, _, ys = s.y.partition(":")
        xx, _, xs = s.x.partition(":")
        return cls(name=s.name, y=(yx, ys), x=(xx, xs), to_reference=s.to_reference, bar_ns=s.bar_ms * _MS,
                   window=s.window, entry_z=s.entry_z, exit_z=s.exit_z, max_pvalue=s.max_pvalue,
                   max_half_life_bars=s.max_half_life_bars, max_missing_bars=s.max_missing_bars,
                   adf_lags=s.adf_lags, notional=s.notional)


@dataclass(frozen=True, slots=True)
class PairFit:
    """The model's figures on one bar."""

    ts_ns: int
    hedge_ratio: float
    intercept: float
    spread: float
    """Last residual: log y - intercept - hedge_ratio * log x."""
    std: float
    zscore: float
    adf_stat: float
    pvalue: float
    half_life_bars: float
    cointegrated: bool


@dataclass(frozen=True, slots=True)
class PairDecision:
    action: Action
    fit: PairFit


class PairsModel:
    """Rolling Engle-Granger model of one pair, fed bar by bar; holds the pair's position."""

    def __init__(self, spec: PairSpec) -> None:
        self.spec = spec
        # The window the model is fitted on, plus the newest bar it scores.
        self._y: deque[float] = deque(maxlen=spec.window + 1)
        self._x: deque[float] = deque(maxlen=spec.window + 1)
        self._last_ts: int | None = None
        self.position: Literal[-1, 0, 1] = 0
        """+1 long the spread (long y), -1 short it, 0 flat."""
        self.entry_fit: PairFit | None = None
        self.last_fit: PairFit | None = None
        self.resets = 0
        """Windows restarted because of a hole in the data."""

    def on_bar(self, ts_ns: int, y: float, x: float) -> PairDecision | None:
        """Add one bar of prices (> 0) and return what to do, if anything. The caller confirms an
        open or close with ``opened``/``closed`` once it could build the trade."""
        if not (y > 0.0 and x > 0.0 and math.isfinite(y) and math.isfinite(x)):
            raise InvalidInput("price", f"{self.spec.name}: y={y} x={x}")
        if self._last_ts is not None:
            if ts_ns <= self._last_ts:
                return None
            if ts_ns - self._last_ts > (self.spec.max_missing_bars + 1) * self.spec.bar_ns:
                self._y.clear()
                self._x.clear()
                self.resets += 1
        self._last_ts = ts_ns
        self._y.append(math.log(y))
        self._x.append(math.log(x))
        if len(self._y) <= self.spec.window:
            return None
        fit = self.fit(ts_ns)
        self.last_fit = fit
        if self.position == 0:
            if fit.cointegrated and abs(fit.zscore) >= self.spec.entry_z:
                return PairDecision("open_short" if fit.zscore > 0 else "open_long", fit)
            return None
        entry = self.entry_fit
        crossed = entry is not None and fit.zscore * entry.zscore < 0
        if abs(fit.zscore) <= self.spec.exit_z or crossed:
            return PairDecision("close", fit)
        return None

    def opened(self, decision: PairDecision) -> None:
        self.position = 1 if decision.action == "open_long" else -1
        self.entry_fit = decision.fit

    def closed(self) -> None:
        self.position = 0
        self.entry_fit = None

    def fit(self, ts_ns: int) -> PairFit:
        """Fit on the window before the newest bar and score the newest bar against it, so an
        outlier is judged by the model it breaks, not folded into it."""
        ys = np.fromiter(self._y, dtype=float, count=len(self._y))
        xs = np.fromiter(self._x, dtype=float, count=len(self._x))
        y, x = ys[:-1], xs[:-1]
        design = np.column_stack((np.ones_like(x), x))
        (intercept, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
        resid = y - intercept - beta * x
        spread = float(ys[-1] - intercept - beta * xs[-1])
        std = float(resid.std(ddof=1))
        if not std > 0.0:
            return PairFit(ts_ns, float(beta), float(intercept), spread, 0.0, 0.0, 0.0, 1.0, math.inf, False)
        adf_stat = float(adfuller(resid, maxlag=self.spec.adf_lags, regression="n", autolag=None,
                                  result_object=False)[0])
        pvalue = float(mackinnonp(adf_stat, regression="c", N=2))
        lagged, step = resid[:-1], np.diff(resid)
        slope = float(np.dot(lagged - lagged.mean(), step - step.mean()) / np.dot(lagged - lagged.mean(),
                                                                                  lagged - lagged.mean()))
        half_life = -math.log(2) / slope if slope < 0 else math.inf
        z = spread / std  # OLS with an intercept: the window's residuals have mean 0
        cointegrated = pvalue <= self.spec.max_pvalue and half_life <= self.spec.max_half_life_bars
        return PairFit(ts_ns, float(beta), float(intercept), spread, std, z, adf_stat, pvalue, half_life,
                       cointegrated)


@dataclass(frozen=True, slots=True)
class StatisticalConfig:
    reference_currency: str = "USDT"
    min_profit: float = 0.0005
    max_notional: float = 1_000.0
    max_book_age_ns: int = 2_000 * _MS
    max_fx_age_ns: int = 60_000 * _MS
    pairs: tuple[PairSpec, ...] = ()

    @classmethod
    def from_config(cls, cfg: Config) -> StatisticalConfig:
        return cls(
            reference_currency=cfg.trading.reference_currency,
            min_profit=cfg.trading.min_profit_threshold,
            max_notional=cfg.trading.max_notional,
            max_book_age_ns=cfg.detector.max_book_age_ms * _MS,
            max_fx_age_ns=cfg.detector.max_fx_age_ms * _MS,
            pairs=tuple(PairSpec.from_settings(p) for p in cfg.detector.stat_pairs),
        )


class _PairState:
    __slots__ = ("bar", "entry_legs", "model", "pending", "spec")

    def __init__(self, spec: PairSpec) -> None:
        self.spec = spec
        self.model = PairsModel(spec)
        self.bar: int | None = None
        """Index of the bar being filled (time // bar_ns)."""
        self.entry_legs: list[SignalLeg] = []
        self.pending: PairDecision | None = None
        """The last bar's decision, until it could be traded or the next bar replaces it."""


class StatisticalDetector:
    """Pure core: books in, bars per pair, entry and exit signals out; time is an argument."""

    def __init__(self, config: StatisticalConfig, instruments: InstrumentTable, fx: FxTable | None = None) -> None:
        self.config = config
        self.instruments = instruments
        self.fx = fx if fx is not None else FxTable(config.max_fx_age_ns)
        self.pairs = [_PairState(spec) for spec in config.pairs]
        self._books: dict[MarketKey, BookSnapshot] = {}
        self._watching: dict[MarketKey, list[_PairState]] = {}
        for state in self.pairs:
            for key in (state.spec.y, state.spec.x):
                self._watching.setdefault(key, []).append(state)
        self.active_bases: set[str] | None = None

    @property
    def markets(self) -> set[MarketKey]:
        return set(self._watching)

    def set_active_bases(self, bases: set[str] | None) -> None:
        """Signal only for pairs whose y leg's base is in ``bases`` (None: all).

        Every replica runs every pair's model on every book, so a replica taking a pair over
        starts warm; only the one reading the y leg's stream signals, the others follow the
        same decisions silently.
        """
        self.active_bases = bases

    # ------------------------------------------------------------------ inputs

    def on_book(self, book: BookSnapshot, now_ns: int, *, evaluate: bool = True) -> list[Signal]:
        """Take a book of a pair's leg; bars that ended before ``now_ns`` close on the books
        held before it. ``evaluate`` is ignored: who signals is set by ``set_active_bases``."""
        key = (book.exchange, book.symbol)
        states = self._watching.get(key)
        if states is None:
            return []
        if book.status == "synced":
            problem = book_problem(book)
            if problem is not None:
                raise InvalidInput(problem, f"{book.exchange} {book.symbol} seq {book.seq}")
        closed = [(state, end, prices) for state in states for end, prices in self._closed_bars(state, now_ns)]
        held = self._books.get(key)
        if held is None or book.ts_recv_ns >= held.ts_recv_ns:
            if book.status == "synced":
                self._books[key] = book
            else:
                self._books.pop(key, None)
        for state, end, prices in closed:
            state.pending = state.model.on_bar(end, *prices)
        out: list[Signal] = []
        for state in states:
            if state.pending is not None:  # retried on every book of the bar until both legs are fresh
                out += self._act(state, state.pending, book, now_ns)
        return out

    def on_status(self, status: BookStatus, now_ns: int) -> None:
        if status.status == "stale":
            held = self._books.get((status.exchange, status.symbol))
            if held is not None and status.ts_ns >= held.ts_recv_ns:
                del self._books[(status.exchange, status.symbol)]

    def on_fx(self, rate: FxRate, now_ns: int) -> None:
        problem = fx_problem(rate)
        if problem is not None:
            raise InvalidInput(problem, rate.pair)
        self.fx.update(rate)

    def set_instrument(self, instrument: Instrument) -> None:
        self.instruments.set(instrument)

    def drop_asset(self, base: str) -> None:
        for key in [k for k in self._books if k[1].partition("/")[0] == base]:
            del self._books[key]

    # ------------------------------------------------------------------ bars and signals

    def _closed_bars(self, state: _PairState, now_ns: int) -> list[tuple[int, tuple[float, float]]]:
        """(bar end, closing prices) of every bar that ended since the last update of the pair.
        A quiet spell repeats the last prices while the books are young enough for a bar;
        beyond that the bar is a hole."""
        bar = now_ns // state.spec.bar_ns
        if state.bar is None or bar <= state.bar:
            state.bar = bar if state.bar is None else state.bar
            return []
        first = max(state.bar + 1, bar - state.spec.max_missing_bars - 1)  # older ones are a hole anyway
        state.bar = bar
        out = []
        for b in range(first, bar + 1):
            prices = self._bar_prices(state.spec, b * state.spec.bar_ns)
            if prices is not None:
                out.append((b * state.spec.bar_ns, prices))
        return out

    def _act(self, state: _PairState, decision: PairDecision, trigger: BookSnapshot, now_ns: int) -> list[Signal]:
        signal = self._signal(state, decision, trigger, now_ns)
        if signal is None:
            return []  # not tradable now (stale book, edge after costs, lot too small)
        state.pending = None
        if decision.action == "close":
            state.model.closed()
            state.entry_legs = []
        else:
            state.model.opened(decision)
            state.entry_legs = signal.legs
        y_base = state.spec.y[1].partition("/")[0]
        if self.active_bases is not None and y_base not in self.active_bases:
            return []  # another replica signals this pair; this one follows the same decision
        return [signal]

    def _bar_prices(self, spec: PairSpec, bar_end_ns: int) -> tuple[float, float] | None:
        """Closing mids of both legs at the bar's end; None if either has no fresh book."""
        out = []
        for key in (spec.y, spec.x):
            book = self._books.get(key)
            if book is None or bar_end_ns - book.ts_recv_ns > max(self.config.max_book_age_ns, spec.bar_ns):
                return None
            mid = (book.bids[0][0] + book.asks[0][0]) / 2
            if spec.to_reference:
                quote = key[1].partition("/")[2]
                conv = IDENTITY if quote == self.config.reference_currency else self.fx.conversion(
                    quote, self.config.reference_currency, bar_end_ns)
                if conv is None:
                    return None
                mid *= conv.mid
            out.append(mid)
        return out[0], out[1]

    def _signal(self, state: _PairState, decision: PairDecision, trigger: BookSnapshot,
                now_ns: int) -> Signal | None:
        spec, fit = state.spec, decision.fit
        ref = self.config.reference_currency
        books = []
        for key in (spec.y, spec.x):
            book = self._books.get(key)
            if book is None or now_ns - book.ts_recv_ns > self.config.max_book_age_ns:
                return None
            books.append(book)
        convs = []
        for key in (spec.y, spec.x):
            quote = key[1].partition("/")[2]
            conv = IDENTITY if quote == ref else self.fx.conversion(quote, ref, now_ns)
            if conv is None:
                return None
            convs.append(conv)
        fees = [self.instruments.taker_fee(*key) for key in (spec.y, spec.x)]
        notional = min(spec.notional or self.config.max_notional, self.config.max_notional)
        mids = [(b.bids[0][0] + b.asks[0][0]) / 2 * c.mid for b, c in zip(books, convs, strict=True)]
        if decision.action == "close":
            entry = state.model.entry_fit
            sides: list[Side] = ["sell", "buy"] if state.model.position > 0 else ["buy", "sell"]
            if state.entry_legs:
                quantities = [float(leg.quantity) for leg in state.entry_legs]
            else:  # taken over from another replica: size it as that replica did
                hedge = abs(entry.hedge_ratio) if entry else abs(fit.hedge_ratio)
                quantities = [notional / mids[0], notional * hedge / mids[1]]
            # What the spread gave back since the entry, in log units (~ fraction of notional).
            gross = (entry.spread - fit.spread) * state.model.position * -1 if entry else 0.0
            net = gross - (fees[0] + fees[1] * abs(fit.hedge_ratio))
        else:
            sides = ["sell", "buy"] if decision.action == "open_short" else ["buy", "sell"]
            # Log-price regression: a 1% move in x goes with a b% move in y, so hold b times the value in x.
            quantities = [notional / mids[0], notional * abs(fit.hedge_ratio) / mids[1]]
            gross = (abs(fit.zscore) - spec.exit_z) * fit.std
            net = gross - 2 * (fees[0] + fees[1] * abs(fit.hedge_ratio))  # in and out, both legs
            if net < self.config.min_profit:
                return None
        legs: list[SignalLeg] = []
        for key, book, side, qty in zip((spec.y, spec.x), books, sides, quantities, strict=True):
            inst = self.instruments.get(*key)
            rounded = round_to_step(snap(qty), inst.lot_size, up=False)
            filled = take(book.asks if side == "buy" else book.bids, float(rounded), paying=side == "buy")
            if rounded <= 0 or filled is None:
                return None
            price = round_price(inst, filled[1], side)
            if not meets_minimums(inst, price, rounded):
                return None
            legs.append(SignalLeg(exchange=key[0], symbol=key[1], side=side, price=price, quantity=rounded,
                                  book_seq=book.seq, book_age_ns=now_ns - book.ts_recv_ns))
        traded = float(legs[0].quantity) * mids[0]
        fx_used = [c for c in convs if c.ts_ns]
        return Signal(
            signal_id=signal_id("statistical", spec.name, legs, (decision.action, fit.ts_ns,
                                                                  *(b.ts_recv_ns for b in books))),
            strategy="statistical",
            asset=spec.name,
            legs=legs,
            gross_edge_bps=gross * 10_000,
            net_edge_bps=net * 10_000,
            expected_profit=net * traded,
            profit_currency=ref,
            notional=traded,
            ts_ns=now_ns,
            ts_origin_ns=trigger.ts_recv_ns,
            fx_rate=fx_used[0].rates[0][1] if fx_used else None,
            fx_age_ns=max(c.age_ns(now_ns) for c in fx_used) if fx_used else None,
            action="close" if decision.action == "close" else "open",
            meta={
                "pair": spec.name,
                "decision": decision.action,
                "hedge_ratio": fit.hedge_ratio,
                "intercept": fit.intercept,
                "zscore": fit.zscore,
                "spread": fit.spread,
                "spread_std": fit.std,
                "half_life_bars": fit.half_life_bars,
                "adf_stat": fit.adf_stat,
                "pvalue": fit.pvalue,
                "window": spec.window,
                "bar_ts_ns": fit.ts_ns,
            },
        )
