"""Builders shared by the risk tests: configs, signals, executions."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal as _signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis as _redis

from shared.config import Config, load_config
from shared.models import (
    Alert,
    Decision,
    Execution,
    ExecutionLeg,
    FxRate,
    Heartbeat,
    Message,
    OrderIntent,
    Residual,
    Signal,
    SignalLeg,
    decode,
    encode,
)
from shared.runtime import FIELD, Bus
from shared.streams import ALERTS, DECISIONS, ORDERS, SIGNALS, KeySpace

_ids = itertools.count()

# Generous defaults so each test only tightens the guard it is about.
OPEN_LIMITS: dict[str, Any] = {
    "max_notional_per_trade": 1_000.0,
    "max_open_arbitrages": 1_000,
    "daily_loss_limit": 1_000.0,
    "max_drawdown": 0.5,
    "circuit_breaker_losses": 100,
    "max_signal_age_ms": 60_000,
    "max_book_age_ms": 60_000,
    "max_fx_age_ms": 600_000,
    "order_rate_limit": 100_000,
    "verdict_retention_s": 600,
    "require_balances": False,
    "intent_ttl_ms": 600_000,
    "alert_interval_s": 0.0,
    "portfolio": {"max_total_exposure": 1_000_000.0, "max_exposure_per_coin": 1_000_000.0,
                  "max_exposure_per_exchange": 1_000_000.0},
}


def risk_config(env: dict[str, str] | None = None, **risk: Any) -> Config:
    """A config with open limits, ``risk`` overrides on top (nested dicts merge)."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in OPEN_LIMITS.items()}
    for key, value in risk.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    environ = env if env is not None else {"ARB_ENV": "development", "ARB_SESSION": "risktest"}
    # The detector's sizing limit may not exceed risk's (a config rule); these tests feed signals by hand.
    trading = {"max_notional": min(950.0, merged["max_notional_per_trade"])}
    return load_config(environ=environ, overrides={"risk": merged, "trading": trading})


def risk_env(service_env: dict[str, str], **risk: Any) -> dict[str, str]:
    """``service_env`` plus ``ARB_RISK__*`` variables for a subprocess with open limits and ``risk`` on top."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in OPEN_LIMITS.items()}
    for key, value in risk.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    env = dict(service_env)
    env["ARB_TRADING__MAX_NOTIONAL"] = str(min(950.0, merged["max_notional_per_trade"]))
    for key, value in merged.items():
        name = f"ARB_RISK__{key.upper()}"
        env[name] = json.dumps(value) if isinstance(value, dict | bool) or value is None else str(value)
    return env


def leg(exchange: str, symbol: str, side: str, price: str | float, qty: str | float, book_age_ns: int = 0) -> SignalLeg:
    return SignalLeg(exchange=exchange, symbol=symbol, side=side,  # type: ignore[arg-type]
                     price=Decimal(str(price)), quantity=Decimal(str(qty)), book_age_ns=book_age_ns)


def spatial(
    *,
    asset: str = "BTC",
    buy: tuple[str, str | float] = ("binance", 60_000),
    sell: tuple[str, str | float] = ("okx", 60_060),
    qty: str | float = "0.01",
    quote: str = "USDT",
    sell_quote: str | None = None,
    ts_ns: int | None = None,
    signal_id: str | None = None,
    book_age_ns: int = 0,
    notional: float | None = None,
    fx_rate: float | None = None,
) -> Signal:
    """A two-leg spatial signal: buy on one venue, sell on another."""
    sell_quote = sell_quote or quote
    legs = [leg(buy[0], f"{asset}/{quote}", "buy", buy[1], qty, book_age_ns),
            leg(sell[0], f"{asset}/{sell_quote}", "sell", sell[1], qty, book_age_ns)]
    usdt_leg = legs[0] if quote == "USDT" else legs[1]  # the detector's notional is in the reference currency
    value = float(usdt_leg.price * usdt_leg.quantity)
    now = time.time_ns() if ts_ns is None else ts_ns
    return Signal(
        signal_id=signal_id or f"sig-{next(_ids)}-{now}", strategy="spatial", asset=asset, legs=legs,
        gross_edge_bps=10.0, net_edge_bps=5.0, expected_profit=0.3, profit_currency="USDT",
        notional=value if notional is None else notional, ts_ns=now, ts_origin_ns=now - 1000,
        fx_rate=fx_rate, fx_age_ns=0 if fx_rate else None,
    )


def execution(arb_id: str, pnl: str | float, *, ts_ns: int | None = None, status: str = "completed",
              residuals: list[Residual] | None = None, asset: str = "BTC",
              venues: tuple[str, str] = ("binance", "okx")) -> Execution:
    legs = [ExecutionLeg(client_order_id=f"{arb_id}{i}", exchange=ex, symbol=f"{asset}/USDT",
                         side="buy" if i == 0 else "sell", status="FILLED", quantity=Decimal("0.01"),
                         filled_quantity=Decimal("0.01"))
            for i, ex in enumerate(venues)]
    return Execution(arb_id=arb_id, signal_id="", strategy="spatial", status=status,  # type: ignore[arg-type]
                     legs=legs, realised_pnl=Decimal(str(pnl)), pnl_currency="USDT",
                     residuals=residuals or [], ts_ns=time.time_ns() if ts_ns is None else ts_ns)


def fx(rate: float, ts_ns: int | None = None) -> FxRate:
    return FxRate(pair="USDT/KRW", rate=rate, source="test", ts_source_ns=time.time_ns() if ts_ns is None else ts_ns)


# --------------------------------------------------------------------------- a running service





class RiskHarness:
    """One in-process risk service on the test's namespace, and a client bus to talk to it."""

    def __init__(self, service: Any, task: asyncio.Task[None], bus: Bus) -> None:
        self.service = service
        self.task = task
        self.bus = bus

    async def publish(self, stream: str, *messages: Message | bytes) -> None:
        for msg in messages:
            payload = msg if isinstance(msg, bytes) else encode(msg)
            await self.bus.redis.xadd(self.bus.stream(stream), {FIELD: payload})

    async def send(self, *signals: Message | bytes) -> None:
        await self.publish(SIGNALS, *signals)

    async def read(self, stream: str) -> list[Any]:
        entries = await self.bus.redis.xrange(self.bus.stream(stream))
        return [decode(fields[FIELD]) for _, fields in entries]

    async def decision(self, signal_id: str, timeout: float = 5.0) -> Decision:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for d in await self.read(DECISIONS):
                if d.signal_id == signal_id:
                    return d  # type: ignore[no-any-return]
            if self.task.done():
                self.task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no decision for {signal_id}")
            await asyncio.sleep(0.01)

    async def decide(self, signal: Signal) -> Decision:
        await self.send(signal)
        return await self.decision(signal.signal_id)

    async def orders(self) -> list[OrderIntent]:
        return await self.read(ORDERS)

    async def ordered(self, signal_id: str) -> bool:
        return any(o.signal_id == signal_id for o in await self.orders())

    async def alerts(self) -> list[Alert]:
        return await self.read(ALERTS)

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            if self.task.done():
                self.task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, timeout=10)
        await self.bus.close()


StartRisk = Callable[..., Awaitable[RiskHarness]]


@pytest.fixture(name="start_risk")
async def start_risk_fixture(service_env: dict[str, str], pg_url: str, redis_url: str,
                             namespace: str) -> AsyncIterator[StartRisk]:
    """Start risk services in this process: ``await start_risk(max_open_arbitrages=2, ...)``."""
    from services.risk.service import RiskService

    started: list[RiskHarness] = []

    async def start(*, instance: str | None = None, env: dict[str, str] | None = None, **risk: Any) -> RiskHarness:
        env = {**service_env, "ARB_REDIS__BLOCK_MS": "100", **(env or {})}
        cfg = risk_config(env, **risk)
        service = RiskService(cfg, instance=instance or f"risk-{len(started)}", config_path=None)
        task = asyncio.create_task(service.main())
        while not service.ready.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        client = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace("development", namespace))
        harness = RiskHarness(service, task, client)
        started.append(harness)
        return harness

    yield start
    for h in started:
        if not h.task.done():
            await h.stop()


# --------------------------------------------------------------------------- risk as OS processes





class RiskProcess:
    """``python -m services.risk`` in its own process (its log in ``log_path``)."""

    def __init__(self, env: dict[str, str], instance: str, log_path: Path) -> None:
        self.env = env
        self.instance = instance
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RiskProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.risk", "--instance", self.instance],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def heartbeat(self, client: _redis.Redis, heartbeats_key: str) -> Heartbeat | None:
        raw = client.hget(heartbeats_key, self.instance)
        return msgspec.json.decode(raw, type=Heartbeat) if raw else None  # type: ignore[arg-type]

    def wait_ready(self, client: _redis.Redis, heartbeats_key: str, timeout: float = 30.0) -> Heartbeat:
        """Ready once it heartbeats: setup (including any restore) is done before the first beat."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"risk exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            hb = self.heartbeat(client, heartbeats_key)
            if hb is not None and hb.pid == self.proc.pid:
                return hb
            time.sleep(0.05)
        raise TimeoutError(f"risk {self.instance} not ready: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, _signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
