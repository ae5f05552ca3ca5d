"""Crash safety across replicas: SIGKILL live executors between sending an order and
acknowledging its intent, 100 times at random points, while other replicas take over.

The exchange simulator sees every order request; its hook finds which replica sent it (by the
client socket) and kills that replica at a random stage: before the order reaches the
matching engine (the request is dropped), after the engine accepted it but before the answer,
or a few milliseconds after the answer (while the replica records fills or acknowledges).
A new replica replaces each one killed. In the end the simulator must never have seen two
orders under one client order id, and PostgreSQL must hold every exchange fill exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets as pysecrets
import signal
import sys
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from executor_support import (
    BINANCE_BOOKS,
    UPBIT_BOOKS,
    executor_env,
    publish_intents,
    put_market,
    recorded_books,
    service_bus,
    spatial_intent,
)

from shared.simulator.orders import OrderRequest, OrderSimulatorServer, Stage, order_app
from shared.simulator.orders_binance import binance_exchange
from shared.simulator.orders_upbit import upbit_exchange
from shared.streams import ORDERS, Group

BINANCE = recorded_books(BINANCE_BOOKS, "binance", "BTC/USDT")[0]
UPBIT = recorded_books(UPBIT_BOOKS, "upbit", "BTC/KRW")[0]
KILLS = 100
REPLICAS = 3
# The account's order budget is shared by all replicas: large enough here that the run is about
# crashes, not about waiting for the budget.
UPBIT_ORDERS_PER_SECOND = 200
ZYGOTE = Path(__file__).resolve().parent / "executor_zygote.py"


class Replicas:
    """Executor processes forked by the zygote; only ever kills the pids it started."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.alive: set[int] = set()
        self.started = 0
        self.zygote: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.zygote = await asyncio.create_subprocess_exec(
            sys.executable, str(ZYGOTE), env=self.env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)

    async def spawn(self) -> int:
        assert self.zygote is not None and self.zygote.stdin and self.zygote.stdout
        self.started += 1
        name = f"executor-r{self.started}"
        self.zygote.stdin.write(f"{name} {self.log_dir / (name + '.log')}\n".encode())
        await self.zygote.stdin.drain()
        pid = int((await asyncio.wait_for(self.zygote.stdout.readline(), 10)).decode())
        self.alive.add(pid)
        return pid

    def owner(self, peer: tuple[str, int] | None, server_port: int) -> int | None:
        """The replica whose TCP socket is ``peer``."""
        if peer is None:
            return None
        for pid in list(self.alive):
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.laddr and c.laddr.port == peer[1] and c.raddr and c.raddr.port == server_port for c in conns):
                return pid
        return None

    def kill(self, pid: int) -> bool:
        if pid not in self.alive:
            return False
        self.alive.discard(pid)
        os.kill(pid, signal.SIGKILL)
        return True

    async def stop(self) -> None:
        for pid in list(self.alive):
            self.alive.discard(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.zygote is not None:
            assert self.zygote.stdin is not None
            self.zygote.stdin.close()
            try:
                await asyncio.wait_for(self.zygote.wait(), 10)
            except TimeoutError:
                self.zygote.kill()


def live_env(service_env: dict[str, str], url: str, keys: dict[str, str]) -> dict[str, str]:
    env = executor_env(service_env, request_timeout_ms=300, unknown_order_grace_ms=500, clock_margin_ms=50,
                       fill_poll_interval_ms=20, fill_poll_timeout_ms=3000, max_slippage_bps=30,
                       upbit_orders_per_second=UPBIT_ORDERS_PER_SECOND, upbit_requests_per_second=300)
    env.update(keys)
    env.update({
        "ARB_ENV": "staging", "ARB_TRADING__MODE": "live",
        "ARB_EXCHANGES__BINANCE__ENABLED": "true", "ARB_EXCHANGES__BINANCE__SYMBOLS": '["BTC/USDT"]',
        "ARB_EXCHANGES__BINANCE__TAKER_FEE": "0.001", "ARB_EXCHANGES__BINANCE__REST_URL": url,
        "ARB_EXCHANGES__UPBIT__ENABLED": "true", "ARB_EXCHANGES__UPBIT__SYMBOLS": '["BTC/KRW"]',
        "ARB_EXCHANGES__UPBIT__TAKER_FEE": "0.0005", "ARB_EXCHANGES__UPBIT__REST_URL": url,
        "ARB_EXCHANGES__OKX__ENABLED": "false", "ARB_EXCHANGES__BYBIT__ENABLED": "false",
        # Take over a dead replica's intents quickly; never dead-letter an intent for being retried.
        "ARB_REDIS__BLOCK_MS": "100", "ARB_REDIS__CLAIM_IDLE_MS": "400", "ARB_REDIS__CLAIM_INTERVAL_MS": "100",
        "ARB_REDIS__MAX_DELIVERIES": "1000", "ARB_REDIS__BATCH_SIZE": "4", "ARB_LOG__LEVEL": "WARNING",
    })
    return env


@pytest.mark.slow
async def test_sigkill_between_send_and_ack_never_duplicates_an_order_or_a_fill(
        service_env: dict[str, str], pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CRASH_RANDOM_STATE", str(time.time_ns()))))
    binance, upbit = binance_exchange(), upbit_exchange()
    binance.set_book("BTCUSDT", "BTC", "USDT", BINANCE.bids, BINANCE.asks)
    upbit.set_book("KRW-BTC", "BTC", "KRW", UPBIT.bids, UPBIT.asks)
    keys = {"BINANCE_API_KEY": pysecrets.token_hex(32), "BINANCE_API_SECRET": pysecrets.token_hex(32),
            "UPBIT_API_KEY": pysecrets.token_hex(20), "UPBIT_API_SECRET": pysecrets.token_hex(20)}
    binance.add_key(keys["BINANCE_API_KEY"], keys["BINANCE_API_SECRET"])
    upbit.add_key(keys["UPBIT_API_KEY"], keys["UPBIT_API_SECRET"])
    server = OrderSimulatorServer(order_app(binance=binance, upbit=upbit,
                                            upbit_orders_per_second=UPBIT_ORDERS_PER_SECOND,
                                            upbit_requests_per_second=300))
    url = await server.start()
    bus = service_bus(redis_url, namespace, env="staging")
    await put_market(bus, binance=BINANCE, upbit=UPBIT)
    replicas = Replicas(live_env(service_env, url, keys), tmp_path)
    kills: dict[str, int] = {"received": 0, "accepted": 0, "answered": 0}
    pending_kills: set[asyncio.Task[None]] = set()

    def total_kills() -> int:
        return sum(kills.values())

    async def replace(pid: int, stage: str) -> None:
        if replicas.kill(pid):
            kills[stage] += 1
            await replicas.spawn()

    async def later(pid: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await replace(pid, "answered")

    async def hook(stage: Stage, info: OrderRequest) -> bool | None:
        if total_kills() + len(pending_kills) >= KILLS:
            return None
        roll = rng.random()
        if stage == "received":
            action = "received" if roll < 0.12 else ""
        else:
            action = "accepted" if roll < 0.14 else "answered" if roll < 0.28 else ""
        pid = replicas.owner(info.peer, server.port) if action else None  # /proc scans are slow: only when needed
        if pid is None:
            return None
        if action == "answered":
            task = asyncio.create_task(later(pid, rng.uniform(0.0, 0.03)))
            pending_kills.add(task)
            task.add_done_callback(pending_kills.discard)
            return None
        await replace(pid, action)
        return action == "received"  # a request killed on arrival never reaches the matching engine

    binance.hook = upbit.hook = hook
    published: list[str] = []

    def finished() -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM trades").fetchone()
            return int(row[0]) if row else 0

    try:
        await replicas.start()
        for _ in range(REPLICAS):
            await replicas.spawn()
        deadline = time.monotonic() + 150
        last_book = time.monotonic()
        while total_kills() < KILLS:
            assert time.monotonic() < deadline, f"only {kills} kills after 150 s"
            assert binance.submissions or len(published) < 30, "no order reaches the exchange"
            if len(published) - finished() < 12:
                batch = [spatial_intent() for _ in range(12)]
                await publish_intents(bus, batch)
                published += [i.arb_id for i in batch]
            if time.monotonic() - last_book > 20:  # the latest book expires after 60 s
                await put_market(bus, binance=BINANCE, upbit=UPBIT, instruments=False)
                last_book = time.monotonic()
            await asyncio.sleep(0.05)
        await asyncio.gather(*pending_kills)
        deadline = time.monotonic() + 60
        while finished() < len(published):
            assert time.monotonic() < deadline, f"{finished()} of {len(published)} intents finished"
            await asyncio.sleep(0.2)

        async def acked() -> bool:
            pending = await bus.redis.xpending(bus.stream(ORDERS), Group.EXECUTOR)
            return int(pending["pending"]) == 0

        deadline = time.monotonic() + 30
        while not await acked():
            assert time.monotonic() < deadline, "intents left unacknowledged"
            await asyncio.sleep(0.2)
    finally:
        binance.hook = upbit.hook = None
        await replicas.stop()
        await server.stop()
        await bus.close()

    assert total_kills() == KILLS, kills
    assert min(kills.values()) > 0, kills
    # Never two orders under one client order id.
    assert binance.duplicates == {} and upbit.duplicates == {}
    # Every exchange fill exactly once in PostgreSQL, nothing else.
    exchange_fills = {("binance", str(t.trade_id), t.price, t.quantity, t.fee) for o in binance.orders.values()
                      for t in o.trades}
    exchange_fills |= {("upbit", t.uuid, t.price, t.quantity, t.fee) for o in upbit.orders.values() for t in o.trades}
    with psycopg.connect(pg_url) as conn:
        stored = conn.execute("SELECT exchange, fill_id, price, quantity, fee FROM fills").fetchall()
        arbs = {r[0] for r in conn.execute("SELECT arb_id FROM trades").fetchall()}
        unsettled = conn.execute("SELECT count(*) FROM orders WHERE status IN ('NEW', 'UNKNOWN', "
                                 "'PARTIALLY_FILLED')").fetchone()
        filled = dict(conn.execute("SELECT client_order_id, filled_quantity FROM orders").fetchall())
    assert len(stored) == len(exchange_fills) and set(stored) == exchange_fills
    assert arbs == set(published)
    assert unsettled == (0,)
    for ex in (binance, upbit):
        for cid, order in ex.orders.items():
            assert filled[cid] == order.executed, cid
    print(f"kills {kills}, intents {len(published)}, replicas started {replicas.started}, "
          f"orders {len(binance.orders) + len(upbit.orders)}, fills {len(stored)}")
