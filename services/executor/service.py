"""The executor service shell: reads approved intents from ``orders``, executes them (paper
fills on the live book by default; signed REST orders only in live mode with API keys), and
publishes ``fills``, ``order_updates``, ``executions``, ``balances`` and ``alerts``.

It also reads ``transfers`` and, in live mode, carries out approved live transfers
(``services.executor.transfers``); a background loop follows the ones under way
(withdrawals in flight) every ``executor.transfer_poll_interval_ms``. Transfers have their
own PostgreSQL connection: a transfer's first step is sent inside a transaction, which
must not take in an intent's statements.

Replicas share the ``executor`` group. Each replica handles up to ``executor.concurrency``
intents at once, each on its own PostgreSQL connection. An intent is acknowledged only after
its rows are in PostgreSQL and its outputs are in Redis; while PostgreSQL or an exchange is
unreachable the intent is retried in place (``Retryable``) and /health reports ``degraded``.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import AsyncConnection

from services.executor import metrics as m
from services.executor.execution import IntentHandler, decode_intent
from services.executor.fills import FillSimulator
from services.executor.ledger import Database
from services.executor.markets import MarketData
from services.executor.ratelimit import SharedBudget
from services.executor.transfers import LiveTransferRunner
from services.executor.venues.base import HttpVenue
from services.executor.venues.binance import BinanceVenue
from services.executor.venues.paper import PaperVenue
from services.executor.venues.upbit import UpbitVenue
from shared.config import Config, Secrets
from shared.ledger import seed_balances
from shared.models import OrderIntent, Transfer, decoder_for
from shared.runtime import Bus, Delivery, Retryable, is_redis_down
from shared.service import Service
from shared.streams import ALERTS, BALANCES, EXECUTIONS, FILLS, ORDER_UPDATES, ORDERS, TRANSFERS, Domain, Group

log = logging.getLogger(__name__)

DEFAULT_REST_URLS = {"binance": "https://api.binance.com", "upbit": "https://api.upbit.com"}


def build_live_venues(cfg: Config, secrets: Secrets, bus: Bus | None = None) -> dict[str, HttpVenue]:
    """Signed REST venues for the exchanges whose API key and secret are configured; with a
    bus, their rate budgets and back-offs are shared with the other replicas."""
    ex = cfg.executor
    budget = None
    if bus is not None:
        budget = SharedBudget(bus.redis, lambda name, field: bus.keys.tagged(Domain.COOLDOWN, name, field))
    common: dict[str, Any] = dict(
        request_timeout_s=ex.request_timeout_ms / 1000,
        clock_margin_ns=ex.clock_margin_ms * 1_000_000,
        poll_interval_s=ex.fill_poll_interval_ms / 1000,
        poll_timeout_s=ex.fill_poll_timeout_ms / 1000,
        budget=budget,
    )
    venues: dict[str, HttpVenue] = {}
    for name in ("binance", "upbit"):
        key, secret = secrets.exchange(name, "api_key"), secrets.exchange(name, "api_secret")
        if key is None or secret is None:
            continue
        url = cfg.exchanges.get(name).rest_url or DEFAULT_REST_URLS[name]
        if name == "binance":
            venues[name] = BinanceVenue(base_url=url, api_key=key, api_secret=secret,
                                        weight_per_minute=ex.binance_weight_per_minute, **common)
        else:
            venues[name] = UpbitVenue(base_url=url, api_key=key, api_secret=secret,
                                      orders_per_second=ex.upbit_orders_per_second,
                                      requests_per_second=ex.upbit_requests_per_second, **common)
    return venues


def _arbitrage(intent: OrderIntent) -> str:
    return intent.arb_id


class ExecutorService(Service):
    name = "executor"

    async def setup(self) -> None:
        cfg = self.cfg
        self.market = MarketData(self.bus, cfg)
        self.db = Database(cfg.postgres.url, on_connect=self._on_connect, size=cfg.executor.concurrency)
        self.live: dict[str, HttpVenue] = {}
        paper: PaperVenue | None = None
        if cfg.trading.mode == "live":
            self.live = build_live_venues(cfg, self.secrets, self.bus)
            log.info("live trading", extra={"venues": sorted(self.live)})
        else:
            simulator = FillSimulator(latency_ns=int(cfg.executor.order_latency_ms * 1_000_000),
                                      max_book_age_ns=cfg.executor.max_book_age_ms * 1_000_000)
            paper = PaperVenue(self.market, simulator)
        self.handler = IntentHandler(cfg, db=self.db, market=self.market, paper=paper, live=self.live)
        # Independent arbitrages are handled side by side, each acknowledged once stored; the
        # intents of one arbitrage (a redelivery) one after another.
        self.consumer(Group.EXECUTOR, [ORDERS], self._on_intent, decoder=decode_intent,
                      batch_size=min(cfg.redis.batch_size, 16), concurrency=cfg.executor.concurrency,
                      key=_arbitrage)
        self.transfer_db = Database(cfg.postgres.url)
        self.transfers = LiveTransferRunner(cfg, db=self.transfer_db, market=self.market, live=self.live,
                                            bus=self.bus)
        self.consumer(Group.EXECUTOR, [TRANSFERS], self._on_transfer, decoder=decoder_for(Transfer).decode,
                      batch_size=8)
        self.background(self._pnl_gauge)
        if cfg.trading.mode == "live":
            self.background(self._watch_transfers)

    async def _pnl_gauge(self) -> None:
        """The session's realised PnL as the ledger has it (its own connection: the intents'
        connection may be inside a transaction)."""
        while await self.sleep(10.0):
            try:
                async with await psycopg.AsyncConnection.connect(self.cfg.postgres.url, connect_timeout=2) as conn:
                    cur = await conn.execute(
                        "SELECT coalesce(sum(realised_pnl), 0) FROM trades WHERE session = %s AND mode = %s",
                        (self.cfg.session, self.cfg.trading.mode))
                    row = await cur.fetchone()
                m.REALISED_PNL.set(float(row[0]) if row else 0.0)
            except psycopg.Error:
                continue  # the intents' path reports the database being down

    async def _on_transfer(self, delivery: Delivery) -> None:
        try:
            published = await self.transfers.handle(delivery.message)
        except Retryable as exc:
            m.RETRIES.labels(type(exc).__name__).inc()
            raise
        for t in published:
            m.TRANSFERS.labels(t.state).inc()

    async def _watch_transfers(self) -> None:
        """Follow live transfers under way; the first pass resumes what a restart left."""
        interval = self.cfg.executor.transfer_poll_interval_ms / 1000
        while True:
            try:
                for t in await self.transfers.watch():
                    m.TRANSFERS.labels(t.state).inc()
            except Exception as exc:
                if not (isinstance(exc, Retryable) or is_redis_down(exc)):
                    raise
                m.RETRIES.labels(type(exc).__name__).inc()
                log.warning("live transfers not followed this round", extra={"error": str(exc)[:300]})
            if not await self.sleep(interval):
                return

    async def _on_connect(self, conn: AsyncConnection) -> None:
        if self.cfg.trading.mode == "paper" and self.cfg.executor.start_balances:
            start = {ex: {asset: Decimal(repr(v)) for asset, v in assets.items()}
                     for ex, assets in self.cfg.executor.start_balances.items()}
            await seed_balances(conn, self.cfg.session, "paper", start)

    async def _on_intent(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        try:
            out = await self.handler.handle(delivery.message)
        except Retryable as exc:
            m.RETRIES.labels(type(exc).__name__).inc()
            self.degrade(f"{type(exc).__name__}: {exc}"[:300])
            raise
        self.degrade("")
        p = self.producer
        p.publish_many(ORDER_UPDATES, out.updates)
        p.publish_many(FILLS, out.fills)
        p.publish_many(BALANCES, out.balances)
        if out.execution is not None:
            p.publish(EXECUTIONS, out.execution)
            m.EXECUTIONS.labels(out.execution.strategy, out.execution.status).inc()
            if out.execution.residuals:
                m.RESIDUALS.inc()
        p.publish_many(ALERTS, out.alerts)
        for f in out.fills:
            m.FILLS.labels(f.exchange, f.symbol, f.side, f.mode).inc()
        for b in out.balances:
            m.BALANCE.labels(b.exchange, b.asset, b.mode).set(float(b.free + b.locked))
        m.INTENT_SECONDS.observe(time.perf_counter() - started)

    async def extra_health(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mode": self.cfg.trading.mode}
        if self.live:
            doc["venues"] = {name: {"throttled": sum(lim.throttled for lim in v.limiters()),
                                    "banned": sum(lim.banned for lim in v.limiters())}
                             for name, v in self.live.items()}
        return doc

    async def teardown(self) -> None:
        for venue in self.live.values():
            await venue.close()
        await self.db.close()
        await self.transfer_db.close()
