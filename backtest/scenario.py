"""The bundled scenario: real Binance BTCUSDT traffic plus a SYNTHETIC Upbit, generated from it.

No simultaneous multi-venue recording exists in the bundled data, so the second venue is
generated, deterministically (seeded), and labelled synthetic wherever it appears:

- **Binance** (real): the recorded ``btcusdt`` traffic of 2024-08-08 23:54-23:59 UTC
  (hftbacktest: REST snapshot, ``depth@100ms`` diffs, ``bookTicker``, trades), byte for byte
  (``backtest/data/SOURCES.md``), plus Binance's recorded ``exchangeInfo`` for the trading
  rules. A shorter scenario keeps the first ``duration_s`` seconds (the lines unchanged).
- **Upbit KRW-BTC** (synthetic), in Upbit's own SIMPLE message format, so the real Upbit
  decoding and book code run on it: every 80-250 ms (uniform) Upbit publishes a 15-level
  book around ``binance_mid(t - lag) x fx_mid(t) x exp(premium(t))`` on its KRW tick
  (1,000 KRW above 1M), one or two ticks wide, with occasional one-tick gaps and level
  sizes drawn log-normally (median 0.05 BTC) that persist from message to message. ``lag``
  (log-normal, median 150 ms) is how far Upbit's quotes trail Binance's: an assumption, no
  data in the bundle measures it.
- **Upbit KRW-USDT** (synthetic): the book the collector derives USDT/KRW from. Its bid
  walks on the 0.5 KRW tick around the long-run level of the real series, one step at most
  every 0.5-2 s, pulled back towards that level; one tick wide.
- **The premium**: ``log(upbit BTC/KRW) - log(binance BTC/USDT x USDT/KRW)`` is an
  Ornstein-Uhlenbeck process plus white noise, calibrated on the real 5-minute Upbit KRW-BTC
  and Binance BTC/USDT closes (2025-05/08, ``calibrate_premium``): the variogram of their
  log ratio within its gap-free runs gives the stationary deviation, the mean-reversion rate
  and the noise. The OU clock runs ``accel`` times faster than the recording (default 300:
  one 5-minute bar per recorded second), so six minutes of order-book data carry about a day
  of premium regimes. It is a fair model of the premium's shape, not a forecast.

Every run of the same parameters writes the same bytes. The demo, the backtest tests, the
pipeline benchmark and the parity test all use it.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from shared.capture import CaptureWriter, read_capture

DATA = Path(__file__).resolve().parent / "data"
BINANCE_CAPTURE = DATA / "hftbacktest_spot_btcusdt_20240808.gz"
BINANCE_INFO = DATA / "cryptofeed_BINANCE.0.txt"
BINANCE_5M = DATA / "kimchi-premium-arbitrage_binance_BTC_USDT_5m_20250824_082608.csv.gz"
UPBIT_5M = DATA / "kimchi-premium-arbitrage_upbit_BTC_KRW_5m_20250824_082622.csv.gz"
GENERATOR_VERSION = 2
UPBIT_MARKETS_URL = "https://api.upbit.com/v1/market/all?isDetails=false"
SYNTHETIC_NOTE = ("SYNTHETIC second venue: the Upbit KRW-BTC and KRW-USDT books are generated from the real "
                  "Binance BTCUSDT recording (2024-08-08) with a premium process calibrated on real 5-minute "
                  "Upbit/Binance closes; see backtest/scenario.py")

_MS = 1_000_000
_S = 1_000_000_000


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class PremiumModel:
    """``log(KRW price / USDT price)`` of BTC as long-run level + OU deviation + white noise."""

    mean_log: float
    """Long-run log ratio: the USDT/KRW level the synthetic FX book sits at."""
    sigma: float
    """Stationary standard deviation of the OU part (log units)."""
    theta: float
    """Mean reversion per bar (the OU half-life is ln 2 / theta bars)."""
    noise: float
    """Standard deviation of the white noise (log units)."""
    bar_s: float
    bars: int
    runs: int

    @property
    def half_life_bars(self) -> float:
        return math.log(2) / self.theta


def _closes(path: Path) -> dict[int, float]:
    """Unix second -> close, from a ``timestamp,open,high,low,close,volume`` CSV (naive UTC)."""
    import datetime as dt

    out: dict[int, float] = {}
    with gzip.open(path, "rt") as fh:
        next(fh)
        for line in fh:
            stamp, _, _, _, close, _ = line.rstrip("\n").split(",")
            moment = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)
            out[int(moment.timestamp())] = float(close)
    return out


def calibrate_premium(binance_csv: Path = BINANCE_5M, upbit_csv: Path = UPBIT_5M, max_lag: int = 48) -> PremiumModel:
    """Fit ``V(k) = 2 noise^2 + 2 sigma^2 (1 - exp(-theta k))``, the variogram of the log ratio
    at lags of k bars, pooled over the gap-free runs (the Upbit series has 26 gaps), with
    relative errors so short lags count as much as long ones."""
    from scipy.optimize import curve_fit

    upbit, binance = _closes(upbit_csv), _closes(binance_csv)
    times = sorted(set(upbit) & set(binance))
    ratio = np.log(np.array([upbit[t] / binance[t] for t in times]))
    steps = np.diff(np.array(times))
    bar = float(np.median(steps))
    runs = np.split(ratio, np.flatnonzero(steps != bar) + 1)
    lags = np.arange(1, max_lag + 1)
    variogram = []
    for k in lags:
        diffs = np.concatenate([r[k:] - r[:-k] for r in runs if len(r) > k])
        variogram.append(float(np.mean(diffs * diffs)))
    values = np.array(variogram)

    def model(k: np.ndarray, noise: float, sigma: float, theta: float) -> np.ndarray:
        return 2 * noise**2 + 2 * sigma**2 * (1 - np.exp(-theta * k))

    fitted, _ = curve_fit(model, lags, values, p0=[3e-4, 2e-3, 0.02], sigma=values,
                          bounds=([0.0, 0.0, 1e-6], [0.1, 0.1, 10.0]))
    noise, sigma, theta = (float(v) for v in fitted)
    return PremiumModel(mean_log=float(ratio.mean()), sigma=sigma, theta=theta, noise=noise, bar_s=bar,
                        bars=len(ratio), runs=len(runs))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ScenarioParams:
    seed: int = 7
    duration_s: float | None = None
    """Seconds of the Binance recording, from its start (it begins with the REST snapshot the
    book needs); None = all of it (346 s)."""
    accel: float = 300.0
    """The premium's clock, in bars of the calibration per ``bar_s`` of recording (300: one 5-minute bar per second)."""
    premium_start: float = 0.0
    """The OU deviation at the start, in log units (0: at the long-run level)."""
    lag_ms: float = 150.0
    lag_sigma: float = 0.5
    upbit_interval_ms: tuple[float, float] = (80.0, 250.0)
    upbit_levels: int = 15
    upbit_size_median: float = 0.05
    upbit_size_sigma: float = 1.0
    fx_interval_ms: tuple[float, float] = (500.0, 2000.0)
    fx_tick: float = 0.5
    fx_size_median: float = 20_000.0
    net_delay_ms: float = 10.0
    """Upbit's message time (``tms``) is this long before we receive the message."""
    follow_depth: bool = False
    """Upbit answers each Binance depth update ``lag`` later (and the FX book moves half-way
    between), instead of on its own clock: books then never change within a few ms of each
    other, which is what the parity test's slow live replay needs."""

    def key(self) -> str:
        blob = json.dumps({"params": asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Scenario:
    captures: dict[str, list[str]]
    """Exchange -> capture files, ready for ``collector.replay`` or ``arb backtest --capture``."""
    params: ScenarioParams
    model: PremiumModel
    start_ns: int
    end_ns: int
    counts: dict[str, int] = field(default_factory=dict)
    note: str = SYNTHETIC_NOTE

    def to_json(self) -> dict[str, Any]:
        return {"captures": self.captures, "params": asdict(self.params), "model": asdict(self.model),
                "start_ns": self.start_ns, "end_ns": self.end_ns, "counts": self.counts, "note": self.note}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Scenario:
        params = doc["params"]
        for name in ("upbit_interval_ms", "fx_interval_ms"):
            params[name] = tuple(params[name])
        return cls(captures=doc["captures"], params=ScenarioParams(**params), model=PremiumModel(**doc["model"]),
                   start_ns=doc["start_ns"], end_ns=doc["end_ns"], counts=doc["counts"], note=doc["note"])

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / _S


# --------------------------------------------------------------------------- generation


class _TickerData(msgspec.Struct):
    b: str
    a: str


class _Ticker(msgspec.Struct):
    data: _TickerData


_ticker = msgspec.json.Decoder(_Ticker)


def _krw_tick(price: float) -> float:
    """Upbit's KRW tick for ``price`` (the table of services/collector/exchanges/upbit.py)."""
    from services.collector.exchanges.upbit import KRW_TICKS

    for threshold, tick in KRW_TICKS:
        if price >= float(threshold):
            return float(tick)
    return 1.0


class _Book:
    """A synthetic book whose level sizes persist, so consecutive messages differ as a real book's do."""

    def __init__(self, rng: np.random.Generator, median: float, sigma: float, decimals: int) -> None:
        self.rng = rng
        self.median = median
        self.sigma = sigma
        self.decimals = decimals
        self.sizes: dict[float, float] = {}

    def size(self, price: float, refresh: float) -> float:
        held = self.sizes.get(price)
        if held is None or self.rng.random() < refresh:
            held = round(max(self.median * float(np.exp(self.sigma * self.rng.standard_normal())),
                             10.0 ** -min(self.decimals, 4)), self.decimals)
            self.sizes[price] = held
        return held

    def side(self, best: float, tick: float, step: int, levels: int, gap: float) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        price = best
        while len(out) < levels:
            if not out or self.rng.random() >= gap:
                out.append((price, self.size(price, 0.3)))
            price = round(price + step * tick, 8)
        return out

    def forget_far(self, keep: set[float]) -> None:
        self.sizes = {p: s for p, s in self.sizes.items() if p in keep}


def _frame(code: str, tms: int, bids: list[tuple[float, float]], asks: list[tuple[float, float]]) -> bytes:
    units = [{"ap": a[0], "bp": b[0], "as": a[1], "bs": b[1]} for a, b in zip(asks, bids, strict=True)]
    doc = {"ty": "orderbook", "cd": code, "tms": tms, "tas": round(sum(a[1] for a in asks), 8),
           "tbs": round(sum(b[1] for b in bids), 8), "obu": units, "st": "REALTIME"}
    return msgspec.json.encode(doc)


def _markets_body() -> bytes:
    return msgspec.json.encode([
        {"market": "KRW-BTC", "korean_name": "비트코인", "english_name": "Bitcoin"},
        {"market": "KRW-USDT", "korean_name": "테더", "english_name": "Tether"},
    ])


def generate(params: ScenarioParams, out_dir: Path, *, model: PremiumModel | None = None,
             premium_path: Callable[[float], float] | None = None) -> Scenario:
    """Write the scenario's captures under ``out_dir``. ``premium_path`` (seconds since the start
    -> log premium) replaces the calibrated process (tests that need a premium of a given shape)."""
    model = model or calibrate_premium()
    rng = np.random.Generator(np.random.PCG64(params.seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(read_capture(BINANCE_CAPTURE))
    start = records[0].recv_ns
    end = records[-1].recv_ns if params.duration_s is None else start + int(params.duration_s * _S)
    kept = [r for r in records if r.recv_ns <= end]
    if params.duration_s is None:
        binance_file = str(BINANCE_CAPTURE)
    else:  # the first lines of the recording, unchanged
        binance_file = str(out_dir / "binance.gz")
        with CaptureWriter(binance_file) as writer:
            for r in kept:
                writer.frame(r.recv_ns, r.data)
    mids_t: list[int] = []
    mids: list[float] = []
    for r in kept:
        if b"@bookTicker" in r.data[:40]:
            ticker = _ticker.decode(r.data).data
            mids_t.append(r.recv_ns)
            mids.append((float(ticker.b) + float(ticker.a)) / 2)

    fx_level = round(math.exp(model.mean_log) / params.fx_tick) * params.fx_tick
    fx_bid = math.floor(fx_level / params.fx_tick) * params.fx_tick
    btc = _Book(rng, params.upbit_size_median, params.upbit_size_sigma, 8)
    usdt = _Book(rng, params.fx_size_median, 1.0, 8)
    deviation = params.premium_start
    premium_t = start
    counts = {"upbit_btc": 0, "upbit_usdt": 0}

    def uniform_ms(bounds: tuple[float, float]) -> int:
        return int(rng.uniform(bounds[0], bounds[1]) * _MS)

    upbit_file = out_dir / "upbit.gz"
    with CaptureWriter(upbit_file) as writer:
        writer.rest(start - _S, UPBIT_MARKETS_URL, _markets_body())
        events: list[tuple[int, int]] = []  # (time, 0 = FX book, 1 = BTC book)
        if params.follow_depth:
            fx_due = start
            for r in kept:
                if b"@depth" not in r.data[:40]:
                    continue
                lag = int(params.lag_ms * _MS)
                if r.recv_ns >= fx_due:
                    events.append((r.recv_ns + lag // 2, 0))
                    fx_due = r.recv_ns + uniform_ms(params.fx_interval_ms)
                events.append((r.recv_ns + lag, 1))
        else:
            t = start
            while t <= end:
                events.append((t, 0))
                t += uniform_ms(params.fx_interval_ms)
            t = start + uniform_ms(params.upbit_interval_ms)
            while t <= end:
                events.append((t, 1))
                t += uniform_ms(params.upbit_interval_ms)
        events.sort()
        for t, kind in events:
            if t > end:
                break
            if kind == 0:  # the FX book: a bounded walk on its tick, pulled to its level
                if counts["upbit_usdt"] and rng.random() < 0.5:
                    pull = (fx_bid - fx_level) / params.fx_tick
                    up = min(0.9, max(0.1, 0.5 - 0.1 * pull))
                    fx_bid = round(fx_bid + (params.fx_tick if rng.random() < up else -params.fx_tick), 8)
                bids = usdt.side(fx_bid, params.fx_tick, -1, params.upbit_levels, 0.0)
                asks = usdt.side(round(fx_bid + params.fx_tick, 8), params.fx_tick, 1, params.upbit_levels, 0.0)
                usdt.forget_far({p for p, _ in bids + asks})
                writer.frame(t, _frame("KRW-USDT", (t - int(params.net_delay_ms * _MS)) // _MS, bids, asks))
                counts["upbit_usdt"] += 1
                continue
            lag = int(params.lag_ms * float(np.exp(params.lag_sigma * rng.standard_normal())) * _MS)
            i = bisect.bisect_right(mids_t, t - lag) - 1
            if i < 0 or not counts["upbit_usdt"]:
                continue
            if premium_path is not None:
                premium = premium_path((t - start) / _S)
            else:
                bars = (t - premium_t) / _S * params.accel / model.bar_s
                decay = math.exp(-model.theta * bars)
                deviation = deviation * decay + model.sigma * math.sqrt(1 - decay * decay) * float(
                    rng.standard_normal())
                premium = deviation + model.noise * float(rng.standard_normal())
            premium_t = t
            fx_mid = fx_bid + params.fx_tick / 2
            mid = mids[i] * fx_mid * math.exp(premium)
            tick = _krw_tick(mid)
            best_bid = math.floor(mid / tick) * tick
            best_ask = best_bid + tick * (1 if rng.random() < 0.8 else 2)
            bids = btc.side(best_bid, tick, -1, params.upbit_levels, 0.15)
            asks = btc.side(best_ask, tick, 1, params.upbit_levels, 0.15)
            btc.forget_far({p for p, _ in bids + asks})
            writer.frame(t, _frame("KRW-BTC", (t - int(params.net_delay_ms * _MS)) // _MS, bids, asks))
            counts["upbit_btc"] += 1
    counts["binance"] = len(kept)
    return Scenario(captures={"binance": [binance_file, str(BINANCE_INFO)], "upbit": [str(upbit_file)]},
                    params=params, model=model, start_ns=start, end_ns=end, counts=counts)


def ensure(params: ScenarioParams, cache_dir: Path) -> Scenario:
    """The scenario of ``params``, generated once under ``cache_dir`` and reused while its manifest matches."""
    where = cache_dir / f"scenario-{params.key()}"
    manifest = where / "scenario.json"
    if manifest.exists():
        try:
            scenario = Scenario.from_json(json.loads(manifest.read_text()))
            if all(Path(f).exists() for files in scenario.captures.values() for f in files):
                return scenario
        except (ValueError, KeyError, TypeError):
            pass
    scenario = generate(params, where)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(scenario.to_json(), indent=2))
    tmp.replace(manifest)
    return scenario


def fx_level(model: PremiumModel, tick: float = 0.5) -> Decimal:
    """The USDT/KRW level the synthetic FX book walks around."""
    return Decimal(repr(round(math.exp(model.mean_log) / tick) * tick))
