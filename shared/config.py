"""Typed configuration: defaults in code, an optional TOML file, then environment variables.

Load order (later wins):
1. the defaults below;
2. a TOML file: ``--config PATH``, else ``$ARB_CONFIG``, else ``./arb.toml`` if present;
3. environment variables: ``ARB_<SECTION>__<FIELD>`` (nesting with ``__``; JSON for lists),
   plus the conventional ``ARB_ENV``, ``ARB_SESSION``, ``REDIS_URL``, ``DATABASE_URL`` and
   ``CLICKHOUSE_URL``.

The result is frozen and validated before any service starts. A bad value raises
``ConfigError`` whose message is one line naming the field and the rule, e.g.
``risk.max_open_arbitrages 'many' must be an integer``.

Secrets (API keys, bot tokens) are never part of the config: they come only from the
environment or from ``$ARB_SECRETS_FILE`` and are wrapped in ``Secret``, which never
prints its value.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Env = Literal["development", "staging", "production"]
EXCHANGES = ("binance", "upbit", "okx", "bybit", "bithumb", "kucoin", "gateio", "bitget")
SERVICES = ("collector", "detector", "risk", "executor", "rebalancer", "alerter")

PosInt = Annotated[int, Meta(gt=0)]
NonNegInt = Annotated[int, Meta(ge=0)]
PosFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0, lt=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
UnifiedSymbol = Annotated[str, Meta(pattern=r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")]
Asset = Annotated[str, Meta(pattern=r"^[A-Z0-9]{1,20}$")]
NetworkName = Annotated[str, Meta(pattern=r"^[A-Z0-9_-]{1,40}$")]


_PATTERN_WORDS = {
    typing.get_args(UnifiedSymbol)[1].pattern: "must be a BASE/QUOTE symbol in capitals, like BTC/USDT",
    typing.get_args(Name)[1].pattern: "must be 1-64 letters, digits, '_' or '-'",
    typing.get_args(Asset)[1].pattern: "must be an asset code in capitals, like BTC",
    typing.get_args(NetworkName)[1].pattern: "must be a network name in capitals, like TRON",
}


class ConfigError(ValueError):
    """A configuration mistake: ``str(err)`` is one line naming the field and the rule."""

    def __init__(self, field: str, rule: str, value: Any = None, *, show_value: bool = True) -> None:
        self.field = field
        self.rule = rule
        shown = f" {_show(value)}" if show_value else ""
        super().__init__(f"{field}{shown} {rule}")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if re.fullmatch(r"-?\d+(\.\d+)?([eE]-?\d+)?", value) else repr(value)
    if value is None:
        return "(unset)"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


class _Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


# --------------------------------------------------------------------------- sections


class RedisSettings(_Section, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = ""
    """Prepended to every stream name; empty in production, unique per test run."""
    block_ms: PosInt = 1000
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 256
    claim_idle_ms: PosInt = 30_000
    """Entries pending longer than this are taken over from their (presumed dead) consumer."""
    claim_interval_ms: PosInt = 5_000
    max_deliveries: Annotated[int, Meta(ge=1, le=1000)] = 5
    """After this many failed deliveries a message moves to ``dlq.<stream>``."""


class PostgresSettings(_Section, frozen=True):
    url: str = "postgresql://postgres@127.0.0.1:5432/arb"
    pool_min: Annotated[int, Meta(ge=1)] = 1
    pool_max: Annotated[int, Meta(ge=1)] = 8


class ClickHouseSettings(_Section, frozen=True):
    url: str = "chdb://./var/clickhouse"
    enabled: bool = True
    batch_rows: PosInt = 5_000
    flush_interval_ms: PosInt = 1_000
    spill_dir: str = "./var/spill"
    spill_max_bytes: PosInt = 1 << 30


class HttpSettings(_Section, frozen=True):
    host: str = "127.0.0.1"
    base_port: Port = 9100
    """Service i listens on base_port + offset (collector 1, detector 2, ...); 0 = any free port."""


class LogSettings(_Section, frozen=True):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ServicesSettings(_Section, frozen=True):
    enabled: tuple[str, ...] = ("collector", "detector", "risk", "executor", "rebalancer")
    restart_backoff_s: PosFloat = 1.0
    restart_backoff_max_s: PosFloat = 30.0


class ExchangeSettings(_Section, frozen=True):
    enabled: bool = False
    symbols: tuple[UnifiedSymbol, ...] = ()
    taker_fee: Fraction = 0.001
    """Fallback; production reads the account's fee from the exchange at start-up."""
    maker_fee: Fraction = 0.001
    ws_url: str = ""
    """Override the exchange's public WebSocket URL (e.g. the local simulator)."""
    rest_url: str = ""
    book_depth: NonNegInt = 0
    """Depth of the book channel where the exchange offers several (Bybit 1/50/200/1000); 0 = the module's."""
    book_channel: str = ""
    """Another book channel of the same protocol (OKX ``books-l2-tbt``, VIP only); empty = the module's."""


def _ex(enabled: bool, symbols: tuple[str, ...], taker: float, maker: float | None = None) -> ExchangeSettings:
    return ExchangeSettings(
        enabled=enabled, symbols=symbols, taker_fee=taker, maker_fee=taker if maker is None else maker
    )


class ExchangesSettings(_Section, frozen=True):
    binance: ExchangeSettings = _ex(True, ("BTC/USDT", "ETH/USDT"), 0.001)
    upbit: ExchangeSettings = _ex(True, ("BTC/KRW", "ETH/KRW", "USDT/KRW"), 0.0005)
    okx: ExchangeSettings = _ex(True, ("BTC/USDT", "ETH/USDT"), 0.001, 0.0008)
    bybit: ExchangeSettings = _ex(True, ("BTC/USDT", "ETH/USDT"), 0.001)
    bithumb: ExchangeSettings = _ex(False, ("BTC/KRW",), 0.0025)
    kucoin: ExchangeSettings = _ex(False, ("BTC/USDT",), 0.001)
    gateio: ExchangeSettings = _ex(False, ("BTC/USDT",), 0.002)
    bitget: ExchangeSettings = _ex(False, ("BTC/USDT",), 0.001)

    def items(self) -> Iterator[tuple[str, ExchangeSettings]]:
        for name in EXCHANGES:
            yield name, getattr(self, name)

    def enabled(self) -> list[str]:
        return [name for name, ex in self.items() if ex.enabled]

    def get(self, name: str) -> ExchangeSettings:
        if name not in EXCHANGES:
            raise KeyError(name)
        return typing.cast(ExchangeSettings, getattr(self, name))


class TradingSettings(_Section, frozen=True):
    mode: Literal["paper", "live"] = "paper"
    reference_currency: Annotated[str, Meta(pattern=r"^[A-Z0-9]{2,10}$")] = "USDT"
    min_profit_threshold: Annotated[float, Meta(ge=0, lt=0.1)] = 0.0005
    """Minimum net edge (after both taker fees) of the marginal unit traded, as a fraction."""
    max_notional: PosFloat = 950.0
    """Largest size of one arbitrage (its buy cost), in the reference currency. Risk checks the
    larger leg at its limit price against ``risk.max_notional_per_trade``; the sell leg is worth
    more than the buy by the edge, so this stays a little below that limit."""


class CollectorSettings(_Section, frozen=True):
    depth: Annotated[int, Meta(ge=1, le=1000)] = 20
    stale_after_ms: PosInt = 5_000
    """A book with no change for this long is published stale until its next update."""
    latest_book_ttl_ms: NonNegInt = 0
    """TTL of the latest-book keys; 0 = the key layout's ``book`` domain TTL."""
    snapshot_depth: Annotated[int, Meta(ge=5, le=5000)] = 1000
    """Levels asked of REST book snapshots (Binance weight: 50 up to 1000, 250 up to 5000)."""
    trades: bool = True
    bbo: bool = True
    """Also publish the faster best bid/offer channel where one exists (Binance bookTicker)."""
    upbit_format: Literal["DEFAULT", "SIMPLE"] = "SIMPLE"
    reconnect_initial_ms: PosInt = 50
    reconnect_max_ms: PosInt = 30_000
    silence_timeout_ms: PosInt = 30_000
    """A connection with no frame for this long is dropped and reconnected."""
    fx_source: UnifiedSymbol = "USDT/KRW"
    """The Upbit book whose mid is the USDT/KRW rate."""
    fx_reference_url: str = ""
    """Optional HTTP source of USD/KRW (JSON); empty = none."""
    fx_reference_field: str = ""
    """Dotted path to KRW per 1 USD in the reference's JSON, e.g. ``rates.KRW``."""
    fx_reference_interval_ms: PosInt = 60_000
    fx_max_divergence: Annotated[float, Meta(gt=0, lt=1)] = 0.03
    """Alert when |USDT/KRW / USD/KRW - 1| exceeds this."""
    replay: dict[str, tuple[str, ...]] = {}
    """Replay mode: exchange -> capture files played instead of connecting (docs/collector.md);
    empty = connect to the exchanges."""
    replay_speed: PosFloat = 1.0
    """Replay pace: recorded time / speed. Each frame is stamped with the time it is due, so a
    backtest with the same start and speed sees the very same messages."""
    replay_rate: NonNegFloat = 0.0
    """Frames per second, evenly spaced and stamped with the time each is actually handled
    (benchmarks); 0 = paced by ``replay_speed``."""
    replay_start_ns: NonNegInt = 0
    """When the first frame is due (ns since the epoch); 0 = one second after the collector started."""


class StatPairSettings(_Section, frozen=True):
    """One statistical-arbitrage pair: ``y`` is modelled on ``x`` (log prices, Engle-Granger)."""

    name: Name
    y: Annotated[str, Meta(pattern=r"^[a-z0-9_-]+:[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")]
    """``exchange:BASE/QUOTE``, e.g. ``upbit:BTC/KRW``."""
    x: Annotated[str, Meta(pattern=r"^[a-z0-9_-]+:[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$")]
    to_reference: bool = True
    """Convert both legs into the reference currency through FX before modelling (the kimchi premium)."""
    bar_ms: PosInt = 60_000
    window: Annotated[int, Meta(ge=30, le=100_000)] = 240
    """Bars in the rolling window of the regression, the ADF test and the z-score."""
    entry_z: PosFloat = 2.0
    exit_z: NonNegFloat = 0.5
    max_pvalue: Annotated[float, Meta(gt=0, le=1)] = 0.05
    """Engle-Granger (ADF on the residual, MacKinnon p-value) must reject a unit root at this level."""
    max_half_life_bars: PosFloat = 120.0
    max_missing_bars: NonNegInt = 3
    """A longer hole in either series restarts the window (the model assumes evenly spaced bars)."""
    adf_lags: NonNegInt = 1
    notional: NonNegFloat = 0.0
    """Size of one entry in the reference currency; 0 = trading.max_notional."""


class DetectorSettings(_Section, frozen=True):
    strategies: tuple[Literal["spatial", "triangular", "statistical"], ...] = ("spatial", "triangular")
    max_book_age_ms: PosInt = 2_000
    max_fx_age_ms: PosInt = 60_000
    lease_ttl_ms: PosInt = 5_000
    assets: tuple[Annotated[str, Meta(pattern=r"^[A-Z0-9]{1,20}$")], ...] = ()
    """Base assets whose ``md.<BASE>`` streams the detector reads; empty = every base of the enabled symbols."""
    cooldown_ms: NonNegInt = 5_000
    """Quiet time per (asset, buy venue, sell venue) after a signal, unless the edge grows."""
    reemit_edge_step_bps: NonNegFloat = 1.0
    """Within the cooldown, an opportunity is signalled again only if its net edge grew by this much."""
    transfer_cost_bps: NonNegFloat = 0.0
    """Amortised cost of moving inventory back, charged on each spatial trade's notional."""
    default_tick_size: Annotated[float, Meta(gt=0)] = 1e-8
    """Tick when no instrument metadata is published: finer than any listed price, so book prices stay as they are."""
    default_lot_size: Annotated[float, Meta(gt=0)] = 1e-8
    """Lot when no instrument metadata is published: one satoshi, the finest step the listed venues use."""
    triangular_start_currencies: tuple[Annotated[str, Meta(pattern=r"^[A-Z0-9]{1,20}$")], ...] = (
        "USDT", "USDC", "USD", "KRW", "BTC", "ETH",
    )
    """A cycle starts (and books its profit) in the first of these it contains; cycles with none are skipped."""
    fx_pairs: tuple[UnifiedSymbol, ...] = ("USDT/KRW", "USDC/USDT", "USD/USDT", "USDC/KRW")
    """FX pairs read from their latest-value keys at start-up (later ones arrive on the ``fx`` stream)."""
    instruments_refresh_s: PosFloat = 5.0
    stat_pairs: tuple[StatPairSettings, ...] = ()
    spread_history_ms: NonNegInt = 1_000
    """Each spatial route's best top-of-book net edge of every such interval goes to the ``spreads``
    stream (the collector stores it in ClickHouse ``spread_history``); 0 = not recorded."""


PosFraction = Annotated[float, Meta(gt=0, lt=1)]


class RiskSymbolSettings(_Section, frozen=True):
    """Overrides for one asset (``[risk.symbols.BTC]``); an unset field inherits the global value."""

    max_notional_per_trade: PosFloat | None = None
    max_exposure: PosFloat | None = None
    """Cap on the reserved notional of open arbitrages in this asset (else ``portfolio.max_exposure_per_coin``)."""
    cooldown_ms: NonNegInt | None = None
    max_book_age_ms: PosInt | None = None
    max_price_deviation: PosFraction | None = None
    max_venue_deviation: PosFraction | None = None


class RiskPortfolioSettings(_Section, frozen=True):
    """Limits on everything open at once, in the reference currency."""

    max_total_exposure: PosFloat = 5_000.0
    max_exposure_per_coin: PosFloat = 2_000.0
    max_exposure_per_exchange: PosFloat = 3_000.0
    exchanges: dict[str, PosFloat] = {}
    """Per-exchange overrides of ``max_exposure_per_exchange``, e.g. {upbit = 1000}."""


class RiskSettings(_Section, frozen=True):
    """Risk limits: global values here, ``portfolio`` for what is open at once, ``symbols`` per asset.

    Money is in the reference currency (``trading.reference_currency``). Reloadable at run
    time (``arb risk reload`` or SIGHUP): a reload is validated first and refused if invalid.
    """

    max_notional_per_trade: PosFloat = 1_000.0
    max_open_arbitrages: PosInt = 5
    daily_loss_limit: PosFloat = 200.0
    """Realised loss of one day (from ``daily_reset_timezone`` midnight) that stops approvals."""
    daily_reset_timezone: str = "UTC"
    starting_equity: PosFloat = 10_000.0
    """Equity = this + realised PnL of the session; drawdown is measured from its peak."""
    max_drawdown: PosFraction = 0.05
    circuit_breaker_losses: PosInt = 5
    """This many losing arbitrages in a row halt approvals for ``circuit_breaker_halt_s``."""
    circuit_breaker_halt_s: PosFloat = 300.0
    symbol_cooldown_ms: NonNegInt = 0
    """After an approval, no new arbitrage in the same asset for this long (0 = off)."""
    venue_pair_cooldown_ms: NonNegInt = 0
    """After an approval, no new arbitrage on the same set of exchanges for this long (0 = off)."""
    loss_cooldown_ms: NonNegInt = 0
    """After a losing arbitrage, its asset and venue pair cool down for this long (0 = off)."""
    max_signal_age_ms: PosInt = 1_000
    max_book_age_ms: PosInt = 2_000
    max_fx_age_ms: PosInt = 60_000
    max_clock_skew_ms: PosInt = 1_000
    """A signal stamped further in the future than this is invalid."""
    max_price_deviation: PosFraction = 0.05
    """Flash-crash guard: a leg price further than this from its venue's rolling median is rejected."""
    price_window_s: PosFloat = 60.0
    price_window_min_samples: PosInt = 5
    max_venue_deviation: PosFraction = 0.10
    """Flash-crash guard: legs of one asset on different venues further apart than this are rejected."""
    order_rate_limit: PosInt = 20
    """Orders per exchange per ``order_rate_window_ms``, across all replicas."""
    order_rate_window_ms: PosInt = 1_000
    require_balances: bool | None = None
    """Unknown balance = not enough (true) or unchecked (false); unset: true in live mode, false in paper."""
    intent_ttl_ms: PosInt = 5_000
    """An order intent not sent within this is void (``expires_ns``)."""
    reservation_grace_ms: NonNegInt = 60_000
    """A reservation with no execution is released this long after its intent expired."""
    halt_on_residuals: bool = True
    """An execution leaving residual exposure worth at least ``residual_halt_notional`` sets the kill switch."""
    residual_halt_notional: NonNegFloat = 10.0
    verdict_retention_s: PosInt = 120
    """Verdicts are remembered this long, so a redelivered signal gets the same verdict."""
    snapshot_interval_s: PosFloat = 5.0
    snapshot_min_interval_ms: PosInt = 1_000
    snapshot_keep: PosInt = 1_000
    restore_margin_ms: Annotated[int, Meta(gt=0, le=3_600_000)] = 5_000
    """Replay the streams from this long before the snapshot when restoring (replay is idempotent; at
    most an hour, far inside the 24 h for which settled arbitrages are remembered)."""
    alert_interval_s: NonNegFloat = 60.0
    """At most one alert per reject reason per interval and replica (halts always alert)."""
    portfolio: RiskPortfolioSettings = RiskPortfolioSettings()
    symbols: dict[str, RiskSymbolSettings] = {}
    """Per-asset overrides, keyed by the asset in capitals (``BTC``)."""


class ExecutorSettings(_Section, frozen=True):
    order_latency_ms: NonNegFloat = 50.0
    """Paper: an order meets the book as it is this long after it was sent."""
    start_balances: dict[str, dict[str, float]] = msgspec.field(default_factory=lambda: {
        "binance": {"USDT": 10_000.0, "BTC": 0.2, "ETH": 3.0},
        "upbit": {"KRW": 14_000_000.0, "BTC": 0.2, "ETH": 3.0, "USDT": 1_000.0},
        "okx": {"USDT": 10_000.0, "BTC": 0.2, "ETH": 3.0},
        "bybit": {"USDT": 10_000.0, "BTC": 0.2, "ETH": 3.0},
    })
    """Paper balances per exchange and asset (a file's table replaces this whole default)."""
    max_book_age_ms: PosInt = 5_000
    """Paper: a book older than this when the order arrives counts as no book (nothing fills)."""
    leg_risk_policy: Literal["hedge", "unwind"] = "hedge"
    """When legs fill unevenly: complete the short legs (hedge) or take back the long ones (unwind)."""
    leg_risk_fallback: Literal["unwind", "hedge", "none"] = "unwind"
    """A second corrective round when the first leaves exposure; ``none`` records the residual."""
    max_slippage_bps: Annotated[float, Meta(gt=0, le=1000)] = 30.0
    """Bound of a hedge/unwind IOC's limit price beyond the best price, in basis points."""
    request_timeout_ms: PosInt = 2_000
    """Live: an order request without an answer after this is in an unknown state."""
    unknown_order_grace_ms: Annotated[int, Meta(ge=100, le=60_000)] = 5_000
    """Live: how long a sent order may still reach the exchange (Binance recvWindow). An order
    not found by client id after this (plus the clock margin) never reached the exchange."""
    clock_margin_ms: Annotated[int, Meta(ge=0, le=10_000)] = 1_000
    fill_poll_interval_ms: PosInt = 100
    fill_poll_timeout_ms: PosInt = 5_000
    binance_weight_per_minute: PosInt = 6_000
    upbit_orders_per_second: PosInt = 8
    upbit_requests_per_second: PosInt = 30
    concurrency: Annotated[int, Meta(ge=1, le=64)] = 8
    """Intents handled at once by one replica (each with its own PostgreSQL connection), so
    one arbitrage's database work or exchange round trips never hold up another's; intents of
    one arbitrage are still handled one after another."""
    transfer_poll_interval_ms: PosInt = 10_000
    """Live transfers: how often withdrawals in progress are asked about."""
    transfer_timeout_s: PosInt = 4 * 3600
    """Live transfers: a withdrawal not credited at its destination this long after it was
    accepted fails its transfer (alerted: the funds may still arrive)."""
    unknown_withdrawal_timeout_s: PosInt = 900
    """Live transfers: a withdrawal request whose outcome stays unknown this long (not found
    on the exchange) fails its transfer; it is never sent again."""


class InventoryTarget(_Section, frozen=True, kw_only=True):
    """Where one asset should sit on one venue.

    ``kind = "absolute"``: amounts of the asset; ``kind = "share"``: fractions of the asset's
    total over every venue holding it. Below ``low`` the venue is restored to ``target``;
    above ``high`` its excess goes to venues of the same asset below their target.
    """

    exchange: str
    asset: Asset
    target: Decimal
    low: Decimal
    high: Decimal | None = None
    kind: Literal["absolute", "share"] = "absolute"


class TransferNetworkSettings(_Section, frozen=True, kw_only=True):
    """One way to move one asset in or out of one exchange: a blockchain network.

    A withdrawal from A to B over network N needs A's row withdraw-enabled and B's row
    deposit-enabled. ``network`` is our name for the chain (the same on every exchange);
    ``label`` is the exchange's own name for it (``TRX``, ``TRC20``, ``USDT-TRC20``), used to
    match the exchange's wallet endpoint on refresh. Fees are in the asset and charged on
    top of the amount that arrives: ``withdraw_fee + withdraw_fee_rate * amount``.
    """

    exchange: str
    asset: Asset
    network: NetworkName
    label: str = ""
    withdraw_fee: Decimal
    withdraw_fee_rate: Decimal = Decimal(0)
    withdraw_min: Decimal = Decimal(0)
    """Smallest amount one withdrawal may send (the fee not included)."""
    confirm_seconds: NonNegFloat
    """Typical seconds from the withdrawal request until the deposit is credited."""
    withdraw_enabled: bool = True
    deposit_enabled: bool = True


class WithdrawalAddress(_Section, frozen=True, kw_only=True):
    """A whitelisted deposit address: the only places a live withdrawal may go."""

    exchange: str
    """The exchange that owns the address (the destination)."""
    asset: Asset
    network: NetworkName
    address: Annotated[str, Meta(min_length=1, max_length=256)]
    memo: str = ""


class RebalancerSettings(_Section, frozen=True):
    enabled: bool = True
    interval_s: PosFloat = 10.0
    """Planning runs this often, and after every execution."""
    max_steps: Annotated[int, Meta(ge=1, le=6)] = 4
    """Longest route considered (withdrawals plus conversions)."""
    capital_cost_per_hour: Decimal = Decimal("0.00002")
    """Cost of capital in flight, as a fraction of its value per hour: weighs time against fees."""
    targets: tuple[InventoryTarget, ...] = ()
    networks: tuple[TransferNetworkSettings, ...] = ()
    addresses: tuple[WithdrawalAddress, ...] = ()
    approval_caps: dict[str, Decimal] = {}
    """Per asset: a live transfer moving more than this waits for `arb transfers approve`.
    An asset without a cap always waits."""
    auto_approve: bool = False
    """Live transfers within every cap are approved without a person; off by default."""
    paper_auto_approve: bool = True
    """Paper transfers skip approval; set false to rehearse the live approval flow."""
    refresh_interval_s: NonNegFloat = 0.0
    """Re-read withdrawal fees, minimums and wallet status from the exchanges; 0 = never."""
    amount_steps: dict[str, Decimal] = msgspec.field(default_factory=lambda: {"KRW": Decimal(1)})
    """Smallest unit per asset for transfer amounts (default 1e-8)."""
    max_cost_fraction: Decimal = Decimal("0.05")
    """A plan costing more than this fraction of the value it delivers is not made (alerted instead)."""
    max_book_age_s: PosFloat = 30.0
    """Older books are not used for conversions or prices."""
    max_fx_age_s: PosFloat = 600.0

    def whitelisted_address(self, exchange: str, asset: str, network: str) -> WithdrawalAddress | None:
        """The whitelisted deposit address of ``exchange`` for ``asset`` on ``network``, if any."""
        for entry in self.addresses:
            if (entry.exchange, entry.asset, entry.network) == (exchange, asset, network):
                return entry
        return None


class AlerterSettings(_Section, frozen=True):
    sinks: tuple[Name, ...] = ("log", "telegram")
    """Where alerts go; a sink whose settings are missing (e.g. no bot token) reports itself disabled."""
    min_severity: Literal["info", "warning", "critical"] = "info"
    telegram_chat_id: str = ""
    telegram_api_url: str = "https://api.telegram.org"
    """Bot API base URL (the bot token comes from $TELEGRAM_BOT_TOKEN, never from config)."""
    telegram_timeout_s: PosFloat = 10.0
    dedupe_window_s: PosFloat = 300.0
    """An alert with the same kind, source, severity and labels is sent once per window."""
    rate_per_minute: PosInt = 20
    """Messages per minute per sink (Telegram allows about 20 per minute in a group chat)."""
    rate_burst: PosInt = 5


class OpsSettings(_Section, frozen=True):
    redis_ping_warn_ms: PosFloat = 30.0
    consumer_lag_warn: NonNegInt = 1_000
    consumer_lag_max: NonNegInt = 10_000
    """`arb health` fails when a consumer group is this many entries behind."""
    check_timeout_s: PosFloat = 2.0
    log_to_postgres: bool = True
    """Ship WARNING+ log records to PostgreSQL ``system_logs`` (read by `arb monitor --errors`)."""
    log_to_postgres_level: Literal["WARNING", "ERROR"] = "WARNING"


class Config(_Section, frozen=True):
    env: Env = "development"
    session: Name = "default"
    var_dir: str = "./var"
    redis: RedisSettings = RedisSettings()
    postgres: PostgresSettings = PostgresSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    services: ServicesSettings = ServicesSettings()
    exchanges: ExchangesSettings = ExchangesSettings()
    trading: TradingSettings = TradingSettings()
    collector: CollectorSettings = CollectorSettings()
    detector: DetectorSettings = DetectorSettings()
    risk: RiskSettings = RiskSettings()
    executor: ExecutorSettings = ExecutorSettings()
    rebalancer: RebalancerSettings = RebalancerSettings()
    alerter: AlerterSettings = AlerterSettings()
    ops: OpsSettings = OpsSettings()


SERVICE_PORT_OFFSETS = {name: i + 1 for i, name in enumerate(SERVICES)}


def service_port(cfg: Config, service: str) -> int:
    if cfg.http.base_port == 0:
        return 0
    return cfg.http.base_port + SERVICE_PORT_OFFSETS.get(service, 9)


# --------------------------------------------------------------------------- secrets


class Secret:
    """A value that must never be printed: ``repr``/``str`` show ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


SECRET_NAME = re.compile(r"^[A-Z][A-Z0-9_]*(API_KEY|API_SECRET|API_PASSPHRASE|TOKEN|PASSWORD|SECRET)$")


class Secrets:
    """Secrets from the environment and ``$ARB_SECRETS_FILE`` (``NAME=value`` lines)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = {k: Secret(v) for k, v in values.items() if v}

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> Secrets:
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        path = environ.get("ARB_SECRETS_FILE")
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError("ARB_SECRETS_FILE", f"cannot be read ({exc.strerror})", path) from None
            for lineno, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, value = line.partition("=")
                if not sep:
                    raise ConfigError(f"ARB_SECRETS_FILE line {lineno}", "must be NAME=value", show_value=False)
                values[name.strip()] = value.strip().strip('"').strip("'")
        values.update({k: v for k, v in environ.items() if SECRET_NAME.match(k)})
        return cls(values)

    def get(self, name: str) -> Secret | None:
        return self._values.get(name)

    def exchange(self, exchange: str, what: Literal["api_key", "api_secret", "api_passphrase"]) -> Secret | None:
        return self._values.get(f"{exchange.upper()}_{what.upper()}")

    def redaction_values(self) -> list[str]:
        return [s.reveal() for s in self._values.values() if len(s.reveal()) >= 4]

    def __repr__(self) -> str:
        return f"Secrets({sorted(self._values)})"


# --------------------------------------------------------------------------- loading

_ENV_ALIASES = {
    "ARB_ENV": ("env",),
    "ARB_SESSION": ("session",),
    "ARB_VAR_DIR": ("var_dir",),
    "REDIS_URL": ("redis", "url"),
    "DATABASE_URL": ("postgres", "url"),
    "CLICKHOUSE_URL": ("clickhouse", "url"),
}
_SECRET_FIELDS = {"api_key", "api_secret", "api_passphrase", "secret", "password", "token", "bot_token"}


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(path), "conflicts with a non-table value", value)
        node = nxt
    node[path[-1]] = value


def _get_path(tree: Any, path: list[str]) -> Any:
    node = tree
    for part in path:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return raw
    return raw


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], tp: Any = None) -> dict[str, Any]:
    """Merge ``over`` into ``base``: settings tables merge field by field; a value whose type
    is a mapping (start balances, per-asset caps) is replaced whole, as written."""
    hints = typing.get_type_hints(tp) if isinstance(tp, type) and issubclass(tp, Struct) else {}
    for key, value in over.items():
        field = hints.get(key)
        while typing.get_origin(field) is Annotated:
            field = typing.get_args(field)[0]
        nested = isinstance(field, type) and issubclass(field, Struct)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and (nested or tp is None):
            _deep_merge(base[key], value, field if nested else None)
        else:
            base[key] = value
    return base


def _reject_secrets(tree: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key in _SECRET_FIELDS:
            hint = path.replace(".", "_").upper().removeprefix("EXCHANGES_")
            raise ConfigError(path, f"must not be in a config file: set {hint} in the environment", show_value=False)
        if isinstance(value, dict):
            _reject_secrets(value, path + ".")


def _translate(err: msgspec.ValidationError, raw: dict[str, Any]) -> ConfigError:
    text = str(err)
    message, _, at = text.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".")
    parts = [p for p in re.split(r"\.|\[|\]", path) if p]
    field = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", ".".join(parts)) or "(root)"
    value = _get_path(raw, parts)
    m = re.match(r"Object contains unknown field `(.+)`", message)
    if m:
        name = f"{field}.{m.group(1)}" if parts else m.group(1)
        return ConfigError(name, "is not a known setting", show_value=False)
    m = re.match(r"Expected `(\w+)`(?:, got `(\w+)`)?(.*)", message)
    if m:
        kind, _, constraint = m.groups()
        constraint = constraint.strip()
        words = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                 "array": "a list", "object": "a table"}
        if constraint.startswith("matching regex"):
            pattern = constraint.removeprefix("matching regex ").strip().strip("'")
            return ConfigError(field, _PATTERN_WORDS.get(pattern, f"must match {pattern}"), value)
        if constraint:
            return ConfigError(field, f"must be {constraint}", value)
        return ConfigError(field, f"must be {words.get(kind, kind)}", value)
    if message.startswith("Invalid enum value"):
        choices = _literal_choices(parts)
        rule = f"must be one of {', '.join(choices)}" if choices else "is not an allowed value"
        return ConfigError(field, rule, value)
    return ConfigError(field, message[0].lower() + message[1:], value)


def _literal_choices(parts: list[str]) -> list[str]:
    tp: Any = Config
    for part in parts:
        if part.isdigit():
            args = typing.get_args(tp)
            tp = args[0] if args else Any
            continue
        hints = typing.get_type_hints(tp, include_extras=True) if isinstance(tp, type) else {}
        tp = hints.get(part, Any)
        while typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return []


def _url_rule(field: str, url: str, schemes: tuple[str, ...]) -> None:
    if not url.startswith(schemes):
        raise ConfigError(field, f"must start with {' or '.join(schemes)}", url)


def validate(cfg: Config, secrets: Secrets | None = None) -> None:
    """Rules that span fields; raises ``ConfigError`` on the first broken one."""
    _url_rule("redis.url", cfg.redis.url, ("redis://", "rediss://", "unix://"))
    _url_rule("postgres.url", cfg.postgres.url, ("postgresql://", "postgres://"))
    _url_rule("clickhouse.url", cfg.clickhouse.url, ("chdb://", "http://", "https://"))
    if cfg.redis.claim_idle_ms <= cfg.redis.block_ms:
        raise ConfigError(
            "redis.claim_idle_ms", f"must exceed redis.block_ms ({cfg.redis.block_ms})", cfg.redis.claim_idle_ms
        )
    if cfg.postgres.pool_max < cfg.postgres.pool_min:
        raise ConfigError(
            "postgres.pool_max", f"must be >= postgres.pool_min ({cfg.postgres.pool_min})", cfg.postgres.pool_max
        )
    for i, name in enumerate(cfg.services.enabled):
        if name not in SERVICES:
            raise ConfigError(f"services.enabled[{i}]", f"must be one of {', '.join(SERVICES)}", name)
    for name, ex in cfg.exchanges.items():
        for fee_name in ("taker_fee", "maker_fee"):
            fee = getattr(ex, fee_name)
            if fee > 0.01:
                rule = "must be a fraction (0.001 = 0.1%), at most 0.01"
                raise ConfigError(f"exchanges.{name}.{fee_name}", rule, fee)
        if ex.enabled and not ex.symbols:
            raise ConfigError(f"exchanges.{name}.symbols", "must list at least one symbol when enabled", [])
    for name in cfg.collector.replay:
        if name not in EXCHANGES:
            raise ConfigError(f"collector.replay.{name}", f"must be one of {', '.join(EXCHANGES)}", show_value=False)
        if not cfg.exchanges.get(name).enabled:
            raise ConfigError(f"collector.replay.{name}", f"needs exchanges.{name}.enabled = true", show_value=False)
    if not cfg.exchanges.enabled() and "collector" in cfg.services.enabled:
        raise ConfigError("exchanges", "must enable at least one exchange when the collector runs", show_value=False)
    if cfg.trading.max_notional > cfg.risk.max_notional_per_trade:
        raise ConfigError(
            "trading.max_notional",
            f"must not exceed risk.max_notional_per_trade ({cfg.risk.max_notional_per_trade}): "
            "larger signals would all be rejected",
            cfg.trading.max_notional,
        )
    _validate_risk(cfg)
    _validate_executor(cfg)
    if cfg.trading.mode == "live":
        if cfg.env == "development":
            raise ConfigError("trading.mode", "requires env staging or production", "live")
        for name in cfg.exchanges.enabled():
            for what in ("api_key", "api_secret"):
                if secrets is None or secrets.exchange(name, what) is None:
                    raise ConfigError(
                        f"exchanges.{name}.{what}",
                        f"is required for live trading: set {name.upper()}_{what.upper()} in the environment",
                        show_value=False,
                    )
    seen_pairs: set[str] = set()
    for i, pair in enumerate(cfg.detector.stat_pairs):
        if pair.exit_z >= pair.entry_z:
            rule = f"must be below entry_z ({pair.entry_z})"
            raise ConfigError(f"detector.stat_pairs[{i}].exit_z", rule, pair.exit_z)
        if pair.name in seen_pairs:
            raise ConfigError(f"detector.stat_pairs[{i}].name", "must be unique", pair.name)
        seen_pairs.add(pair.name)
    _validate_rebalancer(cfg.rebalancer)
    if cfg.ops.consumer_lag_warn > cfg.ops.consumer_lag_max:
        raise ConfigError(
            "ops.consumer_lag_warn", f"must be <= ops.consumer_lag_max ({cfg.ops.consumer_lag_max})",
            cfg.ops.consumer_lag_warn,
        )
    _url_rule("alerter.telegram_api_url", cfg.alerter.telegram_api_url, ("http://", "https://"))
    if cfg.env == "production" and cfg.clickhouse.url.startswith("chdb://"):
        raise ConfigError("clickhouse.url", "must be a ClickHouse server (http://) in production", cfg.clickhouse.url)


def _validate_rebalancer(rb: RebalancerSettings) -> None:
    def exchange_rule(field: str, name: str) -> None:
        if name not in EXCHANGES:
            raise ConfigError(field, f"must be one of {', '.join(EXCHANGES)}", name)

    def not_negative(field: str, value: Decimal) -> None:
        if not value.is_finite() or value < 0:
            raise ConfigError(field, "must not be negative", str(value))

    seen_targets: set[tuple[str, str]] = set()
    for i, t in enumerate(rb.targets):
        at = f"rebalancer.targets[{i}]"
        exchange_rule(f"{at}.exchange", t.exchange)
        if (t.exchange, t.asset) in seen_targets:
            raise ConfigError(at, f"repeats the target of {t.exchange} {t.asset}", show_value=False)
        seen_targets.add((t.exchange, t.asset))
        for name in ("target", "low"):
            not_negative(f"{at}.{name}", getattr(t, name))
        if t.high is not None:
            not_negative(f"{at}.high", t.high)
        if t.low > t.target:
            raise ConfigError(f"{at}.low", f"must not exceed target ({t.target})", str(t.low))
        if t.high is not None and t.high < t.target:
            raise ConfigError(f"{at}.high", f"must not be below target ({t.target})", str(t.high))
        if t.kind == "share" and max(t.target, t.high or 0) > 1:
            raise ConfigError(f"{at}.target", "must be a fraction of the asset's total (at most 1) when kind is share",
                              str(t.target))
    known: dict[tuple[str, str], list[str]] = {}
    for i, n in enumerate(rb.networks):
        at = f"rebalancer.networks[{i}]"
        exchange_rule(f"{at}.exchange", n.exchange)
        not_negative(f"{at}.withdraw_fee", n.withdraw_fee)
        not_negative(f"{at}.withdraw_min", n.withdraw_min)
        not_negative(f"{at}.withdraw_fee_rate", n.withdraw_fee_rate)
        if n.withdraw_fee_rate >= 1:
            raise ConfigError(f"{at}.withdraw_fee_rate", "must be a fraction below 1", str(n.withdraw_fee_rate))
        networks = known.setdefault((n.exchange, n.asset), [])
        if n.network in networks:
            raise ConfigError(at, f"repeats network {n.network} of {n.exchange} {n.asset}", show_value=False)
        networks.append(n.network)
    seen_addresses: set[tuple[str, str, str]] = set()
    for i, a in enumerate(rb.addresses):
        at = f"rebalancer.addresses[{i}]"
        exchange_rule(f"{at}.exchange", a.exchange)
        networks = known.get((a.exchange, a.asset), [])
        if a.network not in networks:
            listed = ", ".join(sorted(networks)) or "none configured"
            raise ConfigError(f"{at}.network", f"is not a known network of {a.exchange} {a.asset} ({listed})",
                              a.network)
        if (a.exchange, a.asset, a.network) in seen_addresses:
            raise ConfigError(at, f"repeats the address of {a.exchange} {a.asset} {a.network}", show_value=False)
        seen_addresses.add((a.exchange, a.asset, a.network))
    for asset, cap in rb.approval_caps.items():
        not_negative(f"rebalancer.approval_caps.{asset}", cap)
    for asset, step in rb.amount_steps.items():
        if not step.is_finite() or step <= 0:
            raise ConfigError(f"rebalancer.amount_steps.{asset}", "must be positive", str(step))
    if not rb.max_cost_fraction.is_finite() or not 0 < rb.max_cost_fraction <= 1:
        raise ConfigError("rebalancer.max_cost_fraction", "must be a fraction in (0, 1]", str(rb.max_cost_fraction))
    rate = rb.capital_cost_per_hour
    if not rate.is_finite() or rate < 0 or rate >= Decimal("0.01"):
        raise ConfigError("rebalancer.capital_cost_per_hour", "must be a fraction per hour in [0, 0.01)", str(rate))


def _validate_risk(cfg: Config) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    r, p = cfg.risk, cfg.risk.portfolio
    try:
        ZoneInfo(r.daily_reset_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError("risk.daily_reset_timezone", "must be an IANA time zone like Asia/Seoul",
                          r.daily_reset_timezone) from None
    for name, value in (("max_exposure_per_coin", p.max_exposure_per_coin),
                        ("max_exposure_per_exchange", p.max_exposure_per_exchange)):
        if value > p.max_total_exposure:
            raise ConfigError(f"risk.portfolio.{name}",
                              f"must not exceed risk.portfolio.max_total_exposure ({p.max_total_exposure})", value)
    for name, value in p.exchanges.items():
        if name not in EXCHANGES:
            raise ConfigError(f"risk.portfolio.exchanges.{name}", f"must be one of {', '.join(EXCHANGES)}",
                              show_value=False)
        if value > p.max_total_exposure:
            raise ConfigError(f"risk.portfolio.exchanges.{name}",
                              f"must not exceed risk.portfolio.max_total_exposure ({p.max_total_exposure})", value)
    if r.max_notional_per_trade > min(p.max_exposure_per_coin, p.max_total_exposure):
        raise ConfigError("risk.max_notional_per_trade",
                          f"must not exceed risk.portfolio.max_exposure_per_coin ({p.max_exposure_per_coin})",
                          r.max_notional_per_trade)
    for asset, sym in r.symbols.items():
        if not re.fullmatch(r"[A-Z0-9]{1,20}", asset):
            raise ConfigError(f"risk.symbols.{asset}", "must be an asset in capitals, like BTC", show_value=False)
        notional = sym.max_notional_per_trade or r.max_notional_per_trade
        exposure = sym.max_exposure or p.max_exposure_per_coin
        if exposure > p.max_total_exposure:
            raise ConfigError(f"risk.symbols.{asset}.max_exposure",
                              f"must not exceed risk.portfolio.max_total_exposure ({p.max_total_exposure})", exposure)
        if notional > exposure:
            raise ConfigError(f"risk.symbols.{asset}.max_notional_per_trade",
                              f"must not exceed the asset's max_exposure ({exposure})", notional)
    if r.daily_loss_limit >= r.starting_equity:
        raise ConfigError("risk.daily_loss_limit", f"must be below risk.starting_equity ({r.starting_equity})",
                          r.daily_loss_limit)
    if r.verdict_retention_s * 1000 < 2 * (r.max_signal_age_ms + r.max_clock_skew_ms):
        raise ConfigError("risk.verdict_retention_s",
                          "must cover twice risk.max_signal_age_ms + risk.max_clock_skew_ms, so a redelivered "
                          "signal is either remembered or stale", r.verdict_retention_s)


_ASSET = re.compile(r"^[A-Z0-9]{1,20}$")


def _validate_executor(cfg: Config) -> None:
    ex = cfg.executor
    for exchange, assets in ex.start_balances.items():
        if exchange not in EXCHANGES:
            raise ConfigError(f"executor.start_balances.{exchange}", f"must be one of {', '.join(EXCHANGES)}",
                              show_value=False)
        for asset, amount in assets.items():
            field = f"executor.start_balances.{exchange}.{asset}"
            if not _ASSET.match(asset):
                raise ConfigError(field, "must name an asset in capitals, like USDT", show_value=False)
            if not amount >= 0:
                raise ConfigError(field, "must be a number >= 0", amount)
    if ex.fill_poll_interval_ms >= ex.fill_poll_timeout_ms:
        raise ConfigError("executor.fill_poll_interval_ms",
                          f"must be below executor.fill_poll_timeout_ms ({ex.fill_poll_timeout_ms})",
                          ex.fill_poll_interval_ms)
    if ex.request_timeout_ms >= ex.unknown_order_grace_ms:
        raise ConfigError("executor.request_timeout_ms",
                          f"must be below executor.unknown_order_grace_ms ({ex.unknown_order_grace_ms})",
                          ex.request_timeout_ms)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build, freeze and validate the configuration. Raises ``ConfigError``."""
    environ = os.environ if environ is None else environ
    # Start from the full default tree so a partial override (one field of one exchange)
    # keeps that table's other defaults instead of the field type's bare defaults.
    raw: dict[str, Any] = typing.cast(dict[str, Any], msgspec.to_builtins(Config()))
    file = path or environ.get("ARB_CONFIG") or ("arb.toml" if Path("arb.toml").exists() else None)
    if file:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("ARB_CONFIG", "names a file that does not exist", str(file)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(file), f"is not valid TOML ({exc})", show_value=False) from None
        _reject_secrets(data)
        _deep_merge(raw, data, Config)
    for name, dest in _ENV_ALIASES.items():
        if environ.get(name):
            _set_path(raw, dest, environ[name])
    for name, value in environ.items():
        if name.startswith("ARB_") and "__" in name:
            dest = tuple(p.lower() for p in name[4:].split("__"))
            if dest[-1] in _SECRET_FIELDS:
                raise ConfigError(".".join(dest), "is a secret: name it like BINANCE_API_KEY instead", show_value=False)
            _set_path(raw, dest, _env_value(value))
    if overrides:
        _deep_merge(raw, dict(overrides), Config)

    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        raise _translate(err, raw) from None
    validate(cfg, Secrets.load(environ) if cfg.trading.mode == "live" else None)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data (secrets are never part of it)."""
    return typing.cast(dict[str, Any], msgspec.to_builtins(cfg))
