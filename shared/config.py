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


_PATTERN_WORDS = {
    typing.get_args(UnifiedSymbol)[1].pattern: "must be a BASE/QUOTE symbol in capitals, like BTC/USDT",
    typing.get_args(Name)[1].pattern: "must be 1-64 letters, digits, '_' or '-'",
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
    max_notional: PosFloat = 1_000.0
    """Largest size of one arbitrage, in the reference currency."""


class CollectorSettings(_Section, frozen=True):
    depth: Annotated[int, Meta(ge=1, le=1000)] = 20
    stale_after_ms: PosInt = 5_000


class DetectorSettings(_Section, frozen=True):
    strategies: tuple[Literal["spatial", "triangular", "statistical"], ...] = ("spatial", "triangular")
    max_book_age_ms: PosInt = 2_000
    max_fx_age_ms: PosInt = 60_000
    lease_ttl_ms: PosInt = 5_000


class RiskSettings(_Section, frozen=True):
    max_notional_per_trade: PosFloat = 1_000.0
    max_open_arbitrages: PosInt = 5
    daily_loss_limit: PosFloat = 200.0


class ExecutorSettings(_Section, frozen=True):
    order_latency_ms: NonNegFloat = 50.0
    """Paper: an order meets the book as it is this long after it was sent."""
    start_balances: dict[str, dict[str, float]] = {}
    """Paper balances per exchange and asset, e.g. {binance = {USDT = 10000, BTC = 0.2}}."""
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


class RebalancerSettings(_Section, frozen=True):
    enabled: bool = True


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


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
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
    if not cfg.exchanges.enabled() and "collector" in cfg.services.enabled:
        raise ConfigError("exchanges", "must enable at least one exchange when the collector runs", show_value=False)
    if cfg.trading.max_notional > cfg.risk.max_notional_per_trade * 100:
        raise ConfigError(
            "trading.max_notional",
            f"must not exceed 100x risk.max_notional_per_trade ({cfg.risk.max_notional_per_trade})",
            cfg.trading.max_notional,
        )
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
    if cfg.env == "production" and cfg.clickhouse.url.startswith("chdb://"):
        raise ConfigError("clickhouse.url", "must be a ClickHouse server (http://) in production", cfg.clickhouse.url)


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
    raw: dict[str, Any] = {}
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
        _deep_merge(raw, data)
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
        _deep_merge(raw, dict(overrides))
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        raise _translate(err, raw) from None
    validate(cfg, Secrets.load(environ) if cfg.trading.mode == "live" else None)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data (secrets are never part of it)."""
    return typing.cast(dict[str, Any], msgspec.to_builtins(cfg))
