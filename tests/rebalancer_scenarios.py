"""Shared scenarios for the rebalancer tests: the kimchi setup (Binance BTC/USDT, Upbit
BTC/KRW and USDT/KRW), books, FX, and a config builder."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import redis

from services.rebalancer.market import ConversionMarket, Marks
from shared.config import Config, load_config
from shared.ledger import seed_balances
from shared.models import BookSnapshot, FxRate, encode
from shared.streams import KeySpace

D = Decimal
FX = 1385.0
START = {"binance": {"BTC": "1.8", "USDT": "12000"}, "upbit": {"BTC": "0.2", "KRW": "118000000"}}
"""Paper start balances after a drain: coin piled up on Binance, KRW on Upbit."""

KIMCHI_TARGETS: list[dict[str, Any]] = [
    {"exchange": "binance", "asset": "BTC", "target": 1, "low": 0.5},
    {"exchange": "upbit", "asset": "BTC", "target": 1, "low": 0.5},
    {"exchange": "binance", "asset": "USDT", "target": 60000, "low": 30000},
    {"exchange": "upbit", "asset": "KRW", "target": 50_000_000, "low": 10_000_000, "high": 100_000_000},
]
KIMCHI_NETWORKS: list[dict[str, Any]] = [
    {"exchange": "binance", "asset": "BTC", "network": "BTC", "withdraw_fee": "0.0002", "confirm_seconds": 1800},
    {"exchange": "upbit", "asset": "BTC", "network": "BTC", "withdraw_fee": "0.0005", "confirm_seconds": 1800},
    {"exchange": "binance", "asset": "USDT", "network": "TRON", "label": "TRX", "withdraw_fee": "1",
     "confirm_seconds": 120},
    {"exchange": "binance", "asset": "USDT", "network": "ETH", "withdraw_fee": "4", "confirm_seconds": 300},
    {"exchange": "upbit", "asset": "USDT", "network": "TRON", "label": "TRX", "withdraw_fee": "1",
     "confirm_seconds": 120},
    {"exchange": "upbit", "asset": "USDT", "network": "ETH", "withdraw_fee": "5", "confirm_seconds": 300},
]
KIMCHI_ADDRESSES: list[dict[str, Any]] = [
    {"exchange": "upbit", "asset": "BTC", "network": "BTC", "address": "bc1qupbitdeposit0000000000000000000000"},
    {"exchange": "binance", "asset": "BTC", "network": "BTC", "address": "bc1qbinancedeposit00000000000000000000"},
    {"exchange": "binance", "asset": "USDT", "network": "TRON", "address": "TBinanceDepositAddress000000000000"},
    {"exchange": "upbit", "asset": "USDT", "network": "TRON", "address": "TUpbitDepositAddress00000000000000"},
]


def config(rebalancer: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
           **sections: Any) -> Config:
    base: dict[str, Any] = {
        "targets": KIMCHI_TARGETS,
        "networks": KIMCHI_NETWORKS,
        "capital_cost_per_hour": "0.0001",
    }
    base.update(rebalancer or {})
    return load_config(environ=environ or {}, overrides={"rebalancer": base, **sections})


def book(exchange: str, symbol: str, bid: float, ask: float, size: float, now_ns: int | None = None,
         levels: int = 3) -> BookSnapshot:
    now_ns = time.time_ns() if now_ns is None else now_ns
    bids = [(round(bid * (1 - 0.001 * i), 8), size * (i + 1)) for i in range(levels)]
    asks = [(round(ask * (1 + 0.001 * i), 8), size * (i + 1)) for i in range(levels)]
    return BookSnapshot(exchange=exchange, symbol=symbol, seq=1, bids=bids, asks=asks,
                        ts_exchange_ns=now_ns, ts_recv_ns=now_ns)


def kimchi_books(now_ns: int | None = None) -> list[BookSnapshot]:
    return [
        book("binance", "BTC/USDT", 60000, 60010, 5, now_ns),
        book("upbit", "BTC/KRW", 85_000_000, 85_010_000, 5, now_ns),
        book("upbit", "USDT/KRW", 1389, 1390, 100_000, now_ns),
    ]


def fx(now_ns: int | None = None, rate: float = FX) -> FxRate:
    return FxRate(pair="USDT/KRW", rate=rate, source="test", ts_source_ns=time.time_ns() if now_ns is None else now_ns)


def markets(cfg: Config, books: list[BookSnapshot]) -> list[ConversionMarket]:
    steps = cfg.rebalancer.amount_steps
    return [ConversionMarket.from_book(b, Decimal(repr(cfg.exchanges.get(b.exchange).taker_fee)), steps) for b in books]


def market_view(cfg: Config, now_ns: int | None = None) -> tuple[list[ConversionMarket], Marks]:
    ms = markets(cfg, kimchi_books(now_ns))
    return ms, Marks.from_market("USDT", ms, [fx(now_ns)])


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def write_config(path: Path, **rebalancer: Any) -> Path:
    lines = [
        "[exchanges.binance]", 'symbols = ["BTC/USDT"]', "enabled = true",
        "[exchanges.upbit]", 'symbols = ["BTC/KRW", "USDT/KRW"]', "enabled = true", "taker_fee = 0.0005",
        "[exchanges.okx]", "enabled = false", "[exchanges.bybit]", "enabled = false",
        "[rebalancer]",
    ]
    settings = {"targets": KIMCHI_TARGETS, "networks": KIMCHI_NETWORKS, **rebalancer}
    lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(pg_url: str, redis_url: str, namespace: str) -> None:
    """Paper start balances in the ledger, books and the FX rate in Redis."""

    async def fill_ledger() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c, c.transaction():
            await seed_balances(c, namespace, "paper", START)

    asyncio.run(fill_ledger())
    keys = KeySpace("development", namespace)
    client = redis.Redis.from_url(redis_url)
    now = time.time_ns()
    for b in kimchi_books(now):
        client.set(keys.latest_book(b.exchange, b.symbol), encode(b))
    client.set(keys.fx_latest("USDT/KRW"), encode(fx(now)))
    client.close()
