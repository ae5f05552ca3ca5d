"""Building the detector cores from the configuration, and which markets and streams they need.

The service shell, ``arb detect`` and the backtest all build their cores here, so the three
run the same detectors with the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.detector.books import InstrumentTable, MarketKey
from services.detector.common import DetectorCore, fallback_rules
from services.detector.spatial import SpatialConfig, SpatialDetector
from services.detector.triangular import TriangularConfig, TriangularDetector
from shared.config import Config
from shared.models import Instrument
from shared.streams import md


def build_cores(cfg: Config, instruments: Iterable[Instrument] = ()) -> dict[str, DetectorCore]:
    """One core per configured strategy, sharing one instrument table."""
    table = InstrumentTable(fallback_rules(cfg), instruments)
    cores: dict[str, DetectorCore] = {}
    for strategy in cfg.detector.strategies:
        if strategy == "spatial":
            cores[strategy] = SpatialDetector(SpatialConfig.from_config(cfg), table)
        elif strategy == "triangular":
            cores[strategy] = TriangularDetector(TriangularConfig.from_config(cfg), table)
        else:
            # Imported here: statsmodels takes ~1.5 s to load, which only this strategy needs.
            from services.detector.statistical import StatisticalConfig, StatisticalDetector

            cores[strategy] = StatisticalDetector(StatisticalConfig.from_config(cfg), table)
    return cores


def configured_markets(cfg: Config) -> list[MarketKey]:
    """Every (exchange, symbol) the enabled exchanges trade, plus the statistical pairs' legs."""
    markets = [(name, symbol) for name, ex in cfg.exchanges.items() if ex.enabled for symbol in ex.symbols]
    for pair in cfg.detector.stat_pairs:
        for leg in (pair.y, pair.x):
            exchange, _, symbol = leg.partition(":")
            markets.append((exchange, symbol))
    return list(dict.fromkeys(markets))


def base_of(symbol: str) -> str:
    return symbol.partition("/")[0]


def market_streams(cfg: Config, strategy: str) -> list[str]:
    """The ``md.<BASE>`` streams a strategy's group reads and leases."""
    if strategy == "statistical":
        bases = {base_of(leg.partition(":")[2]) for p in cfg.detector.stat_pairs for leg in (p.y, p.x)}
    else:
        bases = set(cfg.detector.assets) or {base_of(symbol) for _, symbol in configured_markets(cfg)}
    return sorted(md(base) for base in bases)
