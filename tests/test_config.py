"""Configuration: layered loading, frozen result, one-line errors naming field and rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from shared.config import ConfigError, Secret, Secrets, load_config

ARB = [sys.executable, "-m", "shared.cli"]


def test_defaults_load_and_are_frozen() -> None:
    cfg = load_config(environ={})
    assert cfg.env == "development" and cfg.trading.mode == "paper"
    with pytest.raises(AttributeError):
        cfg.trading.mode = "live"  # type: ignore[misc]


def test_environment_overrides_file_which_overrides_defaults(tmp_path: Path) -> None:
    file = tmp_path / "arb.toml"
    file.write_text('[risk]\nmax_open_arbitrages = 3\n[trading]\nmax_notional = 250.0\n')
    cfg = load_config(file, environ={"ARB_RISK__MAX_OPEN_ARBITRAGES": "7", "REDIS_URL": "redis://h:1/2"})
    assert cfg.risk.max_open_arbitrages == 7
    assert cfg.trading.max_notional == 250.0
    assert cfg.redis.url == "redis://h:1/2"


def test_lists_come_from_json_in_environment_variables() -> None:
    cfg = load_config(environ={"ARB_EXCHANGES__OKX__SYMBOLS": '["ETH/USDT"]'})
    assert cfg.exchanges.okx.symbols == ("ETH/USDT",)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ARB_ENV": "prod"}, "env 'prod' must be one of development, staging, production"),
        ({"ARB_RISK__MAX_OPEN_ARBITRAGES": "many"}, "risk.max_open_arbitrages 'many' must be an integer"),
        ({"ARB_TRADING__MIN_PROFIT_THRESHOLD": "-0.01"}, "trading.min_profit_threshold -0.01 must be >= 0.0"),
        ({"ARB_TRADING__MIN_PROFIT_TRESHOLD": "0.01"}, "trading.min_profit_treshold is not a known setting"),
        ({"REDIS_URL": "http://localhost:6379"},
         "redis.url 'http://localhost:6379' must start with redis:// or rediss:// or unix://"),
        ({"ARB_EXCHANGES__BINANCE__SYMBOLS": '["btcusdt"]'},
         "exchanges.binance.symbols[0] 'btcusdt' must be a BASE/QUOTE symbol in capitals, like BTC/USDT"),
        ({"ARB_REDIS__CLAIM_IDLE_MS": "500"}, "redis.claim_idle_ms 500 must exceed redis.block_ms (1000)"),
        ({"ARB_TRADING__MODE": "live"}, "trading.mode 'live' requires env staging or production"),
        ({"ARB_TRADING__MODE": "live", "ARB_ENV": "staging"},
         "exchanges.binance.api_key is required for live trading: set BINANCE_API_KEY in the environment"),
        ({"ARB_EXCHANGES__UPBIT__TAKER_FEE": "0.05"},
         "exchanges.upbit.taker_fee 0.05 must be a fraction (0.001 = 0.1%), at most 0.01"),
        ({"ARB_SERVICES__ENABLED": '["collector", "trader"]'},
         "services.enabled[1] 'trader' must be one of collector, detector, risk, executor, rebalancer, alerter"),
    ],
)
def test_invalid_values_name_the_field_and_the_rule(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ=environ)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_secrets_in_a_config_file_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "arb.toml"
    file.write_text('[exchanges.binance]\napi_secret = "abc"\n')
    with pytest.raises(ConfigError, match="must not be in a config file: set BINANCE_API_SECRET"):
        load_config(file, environ={})


def test_secret_values_never_print() -> None:
    secrets = Secrets.load({"BINANCE_API_SECRET": "s3cr3t-value", "PATH": "/bin"})
    secret = secrets.exchange("binance", "api_secret")
    assert isinstance(secret, Secret) and secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(secret) + str(secret) + repr(secrets) + f"{secret}"
    assert secrets.get("PATH") is None  # only secret-shaped names are taken


def test_secrets_file_is_read(tmp_path: Path) -> None:
    file = tmp_path / "secrets.env"
    file.write_text("# keys\nUPBIT_API_KEY=abc123\nUPBIT_API_SECRET='xyz789'\n")
    secrets = Secrets.load({"ARB_SECRETS_FILE": str(file)})
    key, secret = secrets.exchange("upbit", "api_key"), secrets.exchange("upbit", "api_secret")
    assert key is not None and secret is not None
    assert (key.reveal(), secret.reveal()) == ("abc123", "xyz789")


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"ARB_ENV": "prod"}, "env"),
        ({"ARB_RISK__MAX_OPEN_ARBITRAGES": "many"}, "risk.max_open_arbitrages"),
        ({"ARB_TRADING__MIN_PROFIT_THRESHOLD": "-1"}, "trading.min_profit_threshold"),
        ({"ARB_NOPE__X": "1"}, "nope"),
        ({"DATABASE_URL": "mysql://x"}, "postgres.url"),
        ({"ARB_TRADING__MODE": "live"}, "trading.mode"),
    ],
)
def test_bad_config_stops_a_start_with_exit_code_2_and_one_line(env: dict[str, str], field: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    for command in (ARB + ["config"], [sys.executable, "-m", "services.risk"]):
        proc = subprocess.run(command, env={**clean, **env}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: {field}"), proc.stderr


def test_config_command_never_prints_secrets() -> None:
    env = {**os.environ, "BINANCE_API_SECRET": "do-not-print-me", "DATABASE_URL": "postgresql://u:pw123@h/db"}
    proc = subprocess.run(ARB + ["config"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "do-not-print-me" not in proc.stdout and "pw123" not in proc.stdout
    assert msgspec.json.decode(proc.stdout)["postgres"]["url"] == "postgresql://u:***@h/db"


def test_the_example_configuration_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parent.parent / "config" / "example.toml", environ={})
    assert cfg.exchanges.enabled() == ["binance", "upbit"]
    assert cfg.executor.start_balances["upbit"]["KRW"] == 14_000_000


def test_a_file_replaces_a_mapping_setting_whole_but_merges_settings_tables(tmp_path: Path) -> None:
    file = tmp_path / "arb.toml"
    file.write_text('[executor.start_balances]\nbinance = { USDT = 500 }\n[exchanges.okx]\nenabled = false\n')
    cfg = load_config(file, environ={})
    assert cfg.executor.start_balances == {"binance": {"USDT": 500.0}}  # no default venue or asset left over
    assert cfg.exchanges.okx.symbols == ("BTC/USDT", "ETH/USDT")  # the table's other settings kept


def test_signals_larger_than_risk_accepts_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"must not exceed risk\.max_notional_per_trade"):
        load_config(environ={"ARB_TRADING__MAX_NOTIONAL": "1500"})
