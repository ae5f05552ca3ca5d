"""``RiskLimits``: the typed, hierarchical view of the risk config the core decides with.

Three levels: global values, the portfolio (everything open at once: total, per coin, per
exchange), and per-symbol (per asset) overrides that inherit what they do not set. Money
limits are converted once to fixed-point units (``units.py``), times to nanoseconds or
milliseconds, so the hot path does no conversions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo

from services.risk.units import units_of_float
from shared.config import Config

SETTLED_RETENTION_MS = 24 * 3600 * 1000
"""How long a settled arbitrage is remembered, so a redelivered execution never counts twice."""


@dataclass(frozen=True, slots=True)
class SymbolLimits:
    """Effective limits of one asset, overrides applied."""

    max_notional_per_trade: int
    max_exposure: int
    cooldown_ms: int
    max_book_age_ns: int
    max_price_deviation: float
    max_venue_deviation: float


@dataclass(frozen=True, slots=True)
class ExchangeMarkets:
    symbols: frozenset[str]
    taker_fee: Decimal


@dataclass(frozen=True, slots=True)
class RiskLimits:
    reference_currency: str
    live: bool
    exchanges: dict[str, ExchangeMarkets]
    """Enabled exchanges only: anything else is an unknown symbol."""
    # global
    max_signal_age_ns: int
    max_fx_age_ns: int
    max_clock_skew_ns: int
    daily_loss_limit: int
    timezone: ZoneInfo
    starting_equity: int
    max_drawdown: float
    breaker_losses: int
    breaker_halt_ms: int
    venue_pair_cooldown_ms: int
    loss_cooldown_ms: int
    price_window_ns: int
    price_window_min_samples: int
    order_rate_limit: int
    order_rate_window_ms: int
    require_balances: bool
    intent_ttl_ns: int
    reservation_grace_ms: int
    halt_on_residuals: bool
    residual_halt_notional: int
    verdict_retention_ms: int
    settled_retention_ms: int
    alert_interval_ns: int
    # portfolio
    max_open_arbitrages: int
    max_total_exposure: int
    max_exposure_per_exchange: int
    exchange_exposure: dict[str, int]
    # per symbol
    default_symbol: SymbolLimits
    symbols: dict[str, SymbolLimits] = field(default_factory=dict)

    def for_asset(self, asset: str) -> SymbolLimits:
        return self.symbols.get(asset, self.default_symbol)

    def exchange_cap(self, exchange: str) -> int:
        return self.exchange_exposure.get(exchange, self.max_exposure_per_exchange)

    @classmethod
    def from_config(cls, cfg: Config) -> RiskLimits:
        r, p = cfg.risk, cfg.risk.portfolio
        default = SymbolLimits(
            max_notional_per_trade=units_of_float(r.max_notional_per_trade),
            max_exposure=units_of_float(p.max_exposure_per_coin),
            cooldown_ms=r.symbol_cooldown_ms,
            max_book_age_ns=r.max_book_age_ms * 1_000_000,
            max_price_deviation=r.max_price_deviation,
            max_venue_deviation=r.max_venue_deviation,
        )
        symbols = {}
        for asset, s in r.symbols.items():
            symbols[asset] = SymbolLimits(
                max_notional_per_trade=(units_of_float(s.max_notional_per_trade) if s.max_notional_per_trade
                                        else default.max_notional_per_trade),
                max_exposure=units_of_float(s.max_exposure) if s.max_exposure else default.max_exposure,
                cooldown_ms=default.cooldown_ms if s.cooldown_ms is None else s.cooldown_ms,
                max_book_age_ns=(s.max_book_age_ms * 1_000_000 if s.max_book_age_ms
                                 else default.max_book_age_ns),
                max_price_deviation=s.max_price_deviation or default.max_price_deviation,
                max_venue_deviation=s.max_venue_deviation or default.max_venue_deviation,
            )
        live = cfg.trading.mode == "live"
        return cls(
            reference_currency=cfg.trading.reference_currency,
            live=live,
            exchanges={
                name: ExchangeMarkets(frozenset(ex.symbols), Decimal(repr(ex.taker_fee)))
                for name, ex in cfg.exchanges.items() if ex.enabled
            },
            max_signal_age_ns=r.max_signal_age_ms * 1_000_000,
            max_fx_age_ns=r.max_fx_age_ms * 1_000_000,
            max_clock_skew_ns=r.max_clock_skew_ms * 1_000_000,
            daily_loss_limit=units_of_float(r.daily_loss_limit),
            timezone=ZoneInfo(r.daily_reset_timezone),
            starting_equity=units_of_float(r.starting_equity),
            max_drawdown=r.max_drawdown,
            breaker_losses=r.circuit_breaker_losses,
            breaker_halt_ms=int(r.circuit_breaker_halt_s * 1000),
            venue_pair_cooldown_ms=r.venue_pair_cooldown_ms,
            loss_cooldown_ms=r.loss_cooldown_ms,
            price_window_ns=int(r.price_window_s * 1e9),
            price_window_min_samples=r.price_window_min_samples,
            order_rate_limit=r.order_rate_limit,
            order_rate_window_ms=r.order_rate_window_ms,
            require_balances=live if r.require_balances is None else r.require_balances,
            intent_ttl_ns=r.intent_ttl_ms * 1_000_000,
            reservation_grace_ms=r.reservation_grace_ms,
            halt_on_residuals=r.halt_on_residuals,
            residual_halt_notional=units_of_float(r.residual_halt_notional),
            verdict_retention_ms=r.verdict_retention_s * 1000,
            settled_retention_ms=SETTLED_RETENTION_MS,
            alert_interval_ns=int(r.alert_interval_s * 1e9),
            max_open_arbitrages=r.max_open_arbitrages,
            max_total_exposure=units_of_float(p.max_total_exposure),
            max_exposure_per_exchange=units_of_float(p.max_exposure_per_exchange),
            exchange_exposure={name: units_of_float(v) for name, v in p.exchanges.items()},
            default_symbol=default,
            symbols=symbols,
        )
