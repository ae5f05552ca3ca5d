"""The rebalancer service shell: reads balances, executions and transfer reports, runs
planning rounds, executes paper transfers, and publishes every transfer state change.

One round (every ``rebalancer.interval_s``, and soon after each execution):
1. paper: run the transfer steps that are due (``PaperTransferRunner``), publish the
   balances they moved;
2. the replica holding the planner lease plans from balances (paper: the PostgreSQL
   ledger; live: the latest ``balances`` messages), open transfers and the latest books
   and FX rate, records each plan with its first state, and alerts on venues it cannot
   restore;
3. publishes unpublished state changes on ``transfers`` (outbox) and rewrites the
   ``transfers_in_flight`` hashes that risk reads.

Live transfers are executed by the executor from the ``approved`` messages; its reports
(``sent``/``completed``/``failed`` on ``transfers``) are recorded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from decimal import Decimal
from typing import Any, Literal

import aiohttp
import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.rebalancer import metrics
from services.rebalancer.market import ConversionMarket, Marks
from services.rebalancer.networks import NetworkTableError, NetworkUpdate, TransferNetworkTable
from services.rebalancer.paper import PaperTransferRunner
from services.rebalancer.planner import Node, PlanningInputError, RebalancePlanner, TransferPlan
from services.rebalancer.store import TransferNotFound, TransferRecord, TransferStore
from services.rebalancer.transfers import (
    IllegalTransition,
    Mode,
    NotWhitelisted,
    check_whitelist,
    in_flight_by_exchange,
    initial_state,
)
from services.rebalancer.wallets import WalletError, fetch_network_updates
from shared.config import EXCHANGES, Config, RebalancerSettings, Secrets
from shared.ledger import load_balances
from shared.models import Alert, Balance, BookSnapshot, Execution, FxRate, Transfer, TransferState, split_symbol
from shared.runtime import FIELD, Bus, Delivery, Lease, Retryable, is_redis_down
from shared.service import Service
from shared.streams import ALERTS, BALANCES, EXECUTIONS, TRANSFERS, Group

log = logging.getLogger(__name__)

ZERO = Decimal(0)
NS = 1_000_000_000
ALERT_REPEAT_NS = 15 * 60 * NS
RECENT_NS = 3600 * NS
Severity = Literal["info", "warning", "critical"]
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class MarketReader:
    """Latest books and FX rates from Redis, as conversion markets and marks."""

    def __init__(self, cfg: Config, bus: Bus, assets: set[str]) -> None:
        self.cfg = cfg
        self.bus = bus
        self.reference = cfg.trading.reference_currency
        self.books = [(ex, sym) for ex, s in cfg.exchanges.items() if s.enabled for sym in s.symbols]
        self.fx_pairs = sorted(f"{self.reference}/{a}" for a in assets if a != self.reference)

    async def read(self, now_ns: int) -> tuple[list[ConversionMarket], Marks]:
        rb = self.cfg.rebalancer
        pipe = self.bus.redis.pipeline(transaction=False)
        for ex, sym in self.books:
            pipe.get(self.bus.keys.latest_book(ex, sym))
        for pair in self.fx_pairs:
            pipe.get(self.bus.keys.fx_latest(pair))
        raw: list[Any] = await pipe.execute()
        markets: list[ConversionMarket] = []
        for (ex, _), value in zip(self.books, raw[: len(self.books)], strict=True):
            if value is None:
                continue
            try:
                book = msgspec.json.decode(value, type=BookSnapshot)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("unreadable book in redis", extra={"exchange": ex, "error": str(exc)})
                continue
            if book.status != "synced" or now_ns - book.ts_recv_ns > rb.max_book_age_s * NS:
                continue
            fee = Decimal(repr(self.cfg.exchanges.get(ex).taker_fee))
            markets.append(ConversionMarket.from_book(book, fee, rb.amount_steps))
        rates: list[FxRate] = []
        for value in raw[len(self.books):]:
            if value is None:
                continue
            try:
                rate = msgspec.json.decode(value, type=FxRate)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if now_ns - rate.ts_source_ns <= rb.max_fx_age_s * NS:
                rates.append(rate)
        return markets, Marks.from_market(self.reference, markets, rates)


class RebalancerService(Service):
    name = "rebalancer"

    def __init__(self, cfg: Config, secrets: Secrets | None = None, *, instance: str | None = None) -> None:
        super().__init__(cfg, secrets, instance=instance)
        self.settings = cfg.rebalancer
        self.mode = cfg.trading.mode
        self.base_networks = TransferNetworkTable.from_settings(self.settings)
        self.networks = self.base_networks
        self.wallet_reports: dict[str, list[NetworkUpdate]] = {}
        self.store = TransferStore(cfg.session, self.mode, cfg.trading.reference_currency)
        self.runner = PaperTransferRunner(self.store, self.settings, lambda: self.networks, cfg.session)
        self.market = MarketReader(cfg, self.bus, market_assets(cfg))
        self.live_balances: dict[Node, Balance] = {}
        self.wake = asyncio.Event()
        self.pool: AsyncConnectionPool | None = None
        self.lease = Lease(self.bus, self.bus.keys.lease(Group.REBALANCER, "planner"), self.instance,
                           ttl_ms=max(5_000, int(self.settings.interval_s * 3_000)))
        self._alerted: dict[str, int] = {}
        self.rounds = 0
        self.last_round_ns = 0
        self.last_error = ""

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        if not self.settings.enabled:
            log.info("rebalancer disabled (rebalancer.enabled = false)")
            return
        # Two connections: one for the round in progress, one for the executor's reports.
        self.pool = AsyncConnectionPool(self.cfg.postgres.url, min_size=1, max_size=2, open=False,
                                        kwargs={"autocommit": True}, timeout=10.0)
        await self.pool.open(wait=False)
        if self.mode == "live":  # the group resumes where it stopped: start from the latest known
            self.live_balances = await latest_balances(self.bus, "live")
        self.consumer(Group.REBALANCER, [BALANCES, EXECUTIONS, TRANSFERS], self.on_message)
        self.background(self.planning_loop)
        if self.settings.refresh_interval_s > 0:
            self.background(self.refresh_loop)
        if not self.settings.targets:
            log.info("no rebalancer.targets configured: nothing to keep balanced")

    async def teardown(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        with contextlib.suppress(Exception):
            await self.lease.release()

    async def extra_health(self) -> dict[str, Any]:
        return {"rebalancer": {"mode": self.mode, "rounds": self.rounds, "last_round_ns": self.last_round_ns,
                               "networks": len(self.networks), "last_error": self.last_error}}

    # ------------------------------------------------------------------ inputs

    async def on_message(self, delivery: Delivery) -> None:
        msg = delivery.message
        if isinstance(msg, Balance):
            node = Node(msg.exchange, msg.asset)
            known = self.live_balances.get(node)
            if self.mode == "live" and msg.mode == "live" and (known is None or msg.ts_ns >= known.ts_ns):
                self.live_balances[node] = msg
                self.wake.set()
        elif isinstance(msg, Execution):
            self.wake.set()  # inventory just moved: plan soon
        elif isinstance(msg, Transfer) and self._is_live_report(msg):
            await self.record_report(msg)

    def _is_live_report(self, msg: Transfer) -> bool:
        return self.mode == "live" and msg.mode == "live" and msg.state in ("sent", "completed", "failed")

    async def record_report(self, msg: Transfer) -> None:
        """The executor's progress on a live transfer; duplicates and stale reports are ignored."""
        assert self.pool is not None
        try:
            async with self.pool.connection() as conn:
                await self.store.transition(conn, msg.transfer_id, msg.state, reason=msg.reason or "reported",
                                            actor="executor", now_ns=time.time_ns())
        except IllegalTransition as exc:
            if exc.current != exc.new:
                log.warning("transfer report ignored", extra={"transfer_id": msg.transfer_id, "error": str(exc)})
        except TransferNotFound:
            log.warning("report for an unknown transfer", extra={"transfer_id": msg.transfer_id})
        except DB_ERRORS as exc:
            raise Retryable(f"database: {type(exc).__name__}") from exc
        self.wake.set()

    # ------------------------------------------------------------------ rounds

    async def planning_loop(self) -> None:
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.settings.interval_s)
            self.wake.clear()
            if self.stopping:
                return
            try:
                await self.run_round(time.time_ns())
                self.degrade("")
                self.last_error = ""
            except DB_ERRORS as exc:
                self._round_failed(f"database unreachable: {type(exc).__name__}")
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                self._round_failed(f"redis unreachable: {type(exc).__name__}")

    def _round_failed(self, why: str) -> None:
        if why != self.last_error:
            log.warning("rebalancing round skipped", extra={"why": why})
        self.last_error = why
        self.degrade(why)

    async def run_round(self, now_ns: int) -> None:
        assert self.pool is not None
        started = time.perf_counter()
        markets, marks = await self.market.read(now_ns)
        async with self.pool.connection() as conn:
            if self.mode != "live":
                moved = await self.runner.advance(conn, now_ns, {(m.exchange, m.symbol): m for m in markets})
                for balance in moved:
                    self.producer.publish(BALANCES, balance)
            if await self._hold_lease():
                await self.plan_round(conn, now_ns, markets, marks)
            published = await self.store.publish_pending(conn, self.bus)
            open_transfers = await self.store.open_transfers(conn)
        await self._write_in_flight(open_transfers, marks)
        await self.producer.flush()
        self.rounds += 1
        self.last_round_ns = now_ns
        metrics.ROUND_SECONDS.observe(time.perf_counter() - started)
        if published:
            log.debug("transfer states published", extra={"count": published})

    async def _hold_lease(self) -> bool:
        """Only one replica plans; the others still execute and publish."""
        return await self.lease.renew() or await self.lease.acquire()

    async def balances(self, conn: psycopg.AsyncConnection) -> dict[Node, Decimal]:
        if self.mode == "live":
            return {node: b.free for node, b in self.live_balances.items()}
        rows = await load_balances(conn, self.cfg.session, "paper")
        return {Node(ex, asset): free for (ex, asset), (free, _) in rows.items()}

    async def _credited_but_not_reported(self, conn: psycopg.AsyncConnection, now_ns: int) -> list[
        tuple[Node, Decimal]
    ]:
        """Live transfers reported completed whose destination balance has not been reported
        since: their delivery still counts, or the same deficit would be planned again."""
        out = []
        for record in await self.store.completed_since(conn, now_ns - RECENT_NS):
            last = record.steps[-1].step
            node = Node(last.to_exchange, last.to_asset)
            seen = self.live_balances.get(node)
            if seen is None or seen.ts_ns < record.updated_ns:
                out.append((node, last.amount_out))
        return out

    def planner(self) -> RebalancePlanner:
        return RebalancePlanner(self.settings, self.networks, require_address=self.mode == "live")

    async def plan_round(self, conn: psycopg.AsyncConnection, now_ns: int, markets: list[ConversionMarket],
                         marks: Marks) -> list[TransferRecord]:
        open_transfers = await self.store.open_transfers(conn)
        in_flight = total_effects(open_transfers)
        if self.mode == "live":
            for node, delta in await self._credited_but_not_reported(conn, now_ns):
                in_flight[node] = in_flight.get(node, ZERO) + delta
        try:
            result = self.planner().plan(await self.balances(conn), in_flight, markets, marks, now_ns)
        except PlanningInputError as exc:
            self.alert("planning_input", "critical", f"rebalancer planned nothing: {exc}", now_ns)
            metrics.PLANNING_ERRORS.inc()
            return []
        recorded = []
        for plan in result.plans:
            record = await self.record(conn, plan, now_ns)
            if record is not None:
                recorded.append(record)
        metrics.SHORTFALLS.set(len(result.shortfalls))
        for s in result.shortfalls:
            self.alert(f"shortfall:{s.node}", "warning",
                       f"cannot restore {s.node.exchange} {s.node.asset} (short {s.amount}): {s.reason}", now_ns,
                       {"exchange": s.node.exchange, "asset": s.node.asset})
        return recorded

    async def record(self, conn: psycopg.AsyncConnection, plan: TransferPlan, now_ns: int) -> TransferRecord | None:
        try:
            record, state, why = await guard_and_record(self.store, conn, plan, self.settings, self.mode, now_ns)
        except NotWhitelisted as exc:  # the live graph only has whitelisted edges: this would be a bug
            self.alert(f"whitelist:{plan.transfer_id}", "critical", f"plan refused: {exc}", now_ns)
            return None
        if record is None:
            return None
        metrics.PLANS.labels(plan.reason, state).inc()
        log.info("transfer planned", extra={
            "transfer_id": plan.transfer_id, "state": state, "destination": str(plan.destination),
            "amount": str(plan.amount), "source": str(plan.route.source), "cost": str(plan.expected_cost),
            "seconds": plan.expected_seconds})
        if state == "awaiting_approval":
            self.alert(f"approval:{plan.transfer_id}", "info",
                       f"transfer {plan.transfer_id} awaits `arb transfers approve {plan.transfer_id}`: {why}", now_ns)
        return record

    async def _write_in_flight(self, open_transfers: list[TransferRecord], marks: Marks) -> None:
        effects = total_effects(open_transfers)
        hashes = in_flight_by_exchange(effects)
        # One MULTI: readers never see a hash half rewritten (the keys share a hash tag).
        pipe = self.bus.redis.pipeline(transaction=True)
        for exchange in sorted(set(EXCHANGES) | set(hashes)):
            key = self.bus.keys.transfers_in_flight(exchange)
            pipe.delete(key)
            if exchange in hashes:
                pipe.hset(key, mapping=dict(hashes[exchange]))  # type: ignore[arg-type]
        await pipe.execute()
        value = sum((marks.value(n.asset, d) for n, d in effects.items() if d > 0 and n.asset in marks), ZERO)
        metrics.IN_FLIGHT_VALUE.set(float(value))
        metrics.OPEN_TRANSFERS.set(len(open_transfers))

    # ------------------------------------------------------------------ network refresh

    async def refresh_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self.stopping:
                await self.refresh_networks(http)
                if not await self.sleep(self.settings.refresh_interval_s):
                    return

    async def refresh_networks(self, http: aiohttp.ClientSession) -> None:
        """Ask every exchange with configured networks for its fees and wallet status; a bad
        answer is refused whole and that exchange keeps its previous state."""
        now_ns = time.time_ns()
        for exchange in self.base_networks.exchanges():
            try:
                updates = await fetch_network_updates(http, exchange, self.base_networks, self.secrets,
                                                      self.cfg.exchanges.get(exchange).rest_url)
                _, report = self.base_networks.refreshed(updates, [exchange])  # validates the answer
            except (WalletError, NetworkTableError) as exc:
                metrics.REFRESHES.labels(exchange, "error").inc()
                self.alert(f"refresh:{exchange}", "warning", f"network refresh refused: {exc}", now_ns,
                           {"exchange": exchange})
                continue
            self.wallet_reports[exchange] = updates
            metrics.REFRESHES.labels(exchange, "ok").inc()
            if report.missing:
                self.alert(f"refresh-missing:{exchange}", "warning",
                           f"{exchange} no longer lists {', '.join(':'.join(k) for k in report.missing)}: closed",
                           now_ns, {"exchange": exchange})
        reports = [u for updates in self.wallet_reports.values() for u in updates]
        self.networks, _ = self.base_networks.refreshed(reports, list(self.wallet_reports))

    # ------------------------------------------------------------------ alerts

    def alert(self, key: str, severity: Severity, message: str, now_ns: int,
              labels: dict[str, str] | None = None) -> None:
        """Publish an alert, at most once per ``key`` every 15 minutes."""
        last = self._alerted.get(key)
        if last is not None and now_ns - last < ALERT_REPEAT_NS:
            return
        self._alerted[key] = now_ns
        log.warning(message, extra={"alert": key})
        self.producer.publish(ALERTS, Alert(alert_id=str(uuid.uuid4()), severity=severity, source=self.name,
                                            kind=key.split(":")[0], message=message, ts_ns=now_ns,
                                            labels=labels or {}))


async def guard_and_record(
    store: TransferStore,
    conn: psycopg.AsyncConnection,
    plan: TransferPlan,
    settings: RebalancerSettings,
    mode: Mode,
    now_ns: int,
    actor: str = "rebalancer",
) -> tuple[TransferRecord | None, TransferState, str]:
    """Store a plan as approved or awaiting approval; live plans must pass the whitelist
    (raises ``NotWhitelisted``). The record is None if the plan was already stored."""
    steps = plan.steps()
    if mode == "live":
        check_whitelist(steps, settings)
    state, why = initial_state(steps, mode, settings)
    return await store.record_plan(conn, plan, state, why, now_ns, actor), state, why


async def latest_balances(bus: Bus, mode: str, scan: int = 50_000) -> dict[Node, Balance]:
    """The newest ``balances`` message of ``mode`` per (exchange, asset)."""
    out: dict[Node, Balance] = {}
    entries: Any = await bus.redis.xrevrange(bus.stream(BALANCES), count=scan)
    for _, fields in entries:
        try:
            msg = msgspec.json.decode(fields.get(FIELD, b""), type=Balance)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if msg.mode == mode:
            out.setdefault(Node(msg.exchange, msg.asset), msg)
    return out


def market_assets(cfg: Config) -> set[str]:
    """Every asset the rebalancer may need a price for."""
    assets = {t.asset for t in cfg.rebalancer.targets} | {n.asset for n in cfg.rebalancer.networks}
    for _, ex in cfg.exchanges.items():
        for symbol in ex.symbols if ex.enabled else ():
            assets.update(split_symbol(symbol))
    return assets


def total_effects(records: list[TransferRecord]) -> dict[Node, Decimal]:
    out: dict[Node, Decimal] = {}
    for record in records:
        for node, delta in record.remaining_effects().items():
            out[node] = out.get(node, ZERO) + delta
    return out
