"""The risk service shell: streams in, the core and the shared state in between, verdicts out.

Inputs (group ``risk``): ``signals`` (in two stages per consumer batch: the handler decodes and
runs the stateless checks; then, before the batch is acknowledged, every remaining signal is
checked-and-reserved in Redis, one atomic script each, all in one round trip and in order; a
script that approves also publishes the approval and acknowledges its signal, the other
verdicts are published after), ``executions`` (release, realised PnL, loss streak,
drawdown), ``balances`` (what each venue holds). ``fx`` is followed by every replica with a
plain XREAD (each replica needs every rate; a group would split them). ``fills`` are not
read: a reservation is held until its arbitrage's execution (or its expiry), which counts
every fill at once and conservatively.

Outputs are in Redis before the inputs are acknowledged: approvals (``orders`` and ``decisions``)
with their signal's acknowledgement in the deciding script, everything else (other verdicts on
``decisions``, ``alerts``) through the service's producer with the batch's acknowledgements.

Background: the expiry sweeper, PostgreSQL snapshots (one replica, under a lease), the
config reload watcher (``arb risk reload`` / SIGHUP), instrument refresh and gauges.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
from redis.exceptions import ResponseError

from services.risk import metrics as m
from services.risk import reasons
from services.risk.core import Assessment, Rejection, RiskBook, Verdict
from services.risk.limits import RiskLimits
from services.risk.recovery import Recovery
from services.risk.redis_state import Publication, PublishTargets, RedisRiskState
from services.risk.snapshots import SnapshotStore
from services.risk.state import DecideOutcome, DecideRequest, SettleOutcome, SettleRequest, StateNotReady
from services.risk.summary import summarize
from shared import metrics
from shared.config import Config, ConfigError, Secrets, load_config
from shared.models import Alert, Balance, Execution, FxRate, Instrument, Signal, decoder_for, encode, split_symbol
from shared.runtime import FIELD, Delivery, Lease, Retryable, backoff_delay, is_redis_down
from shared.runtime.trim import trim_acknowledged
from shared.service import TRIM_INTERVAL_S, Service
from shared.streams import ALERTS, BALANCES, DECISIONS, EXECUTIONS, FX, ORDERS, SIGNALS, Group, policy

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
SNAPSHOT_POLL_S = 0.1
RELOAD_POLL_S = 1.0
INSTRUMENTS_REFRESH_S = 60.0
GAUGES_INTERVAL_S = 2.0
SNAPSHOT_LEASE_MS = 5_000
_RESTART_SECTIONS = ("env", "session", "redis", "postgres", "http")

_signals = decoder_for(Signal)
_fx = decoder_for(FxRate)
_instrument = msgspec.json.Decoder(Instrument)
_instruments = msgspec.json.Decoder(list[Instrument])


@dataclass(frozen=True, slots=True)
class UndecodableSignal:
    raw: bytes
    error: str


@dataclass(slots=True)
class _Pending:
    """A signal of the batch in hand, between its stateless checks and its verdict."""

    signal: Signal | None
    assessed: Assessment | None
    verdict: Verdict | None
    now_ns: int
    started: float
    entry_id: bytes = b""


def decode_signal(raw: bytes) -> Signal | UndecodableSignal:
    """Never raises: a signal that does not decode is still answered (``invalid``), not dead-lettered."""
    try:
        return _signals.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError, TypeError) as exc:
        return UndecodableSignal(bytes(raw), str(exc))


def _config_path_from_argv() -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.config


class RiskService(Service):
    name = "risk"

    def __init__(self, cfg: Config, secrets: Secrets | None = None, *, instance: str | None = None,
                 config_path: str | None = None) -> None:
        """``config_path`` is the file a reload re-reads; None: this process's ``--config``, if any
        (``run_service`` does not pass it on), else ``$ARB_CONFIG`` / ``./arb.toml`` as at start."""
        super().__init__(cfg, secrets, instance=instance)
        self.config_path = config_path if config_path is not None else _config_path_from_argv()
        self.limits = RiskLimits.from_config(cfg)
        self.book = RiskBook(self.limits, env=cfg.env, session=cfg.session)
        self.state = RedisRiskState(self.bus, publish=PublishTargets(
            signals=self.bus.stream(SIGNALS), group=Group.RISK, orders=self.bus.stream(ORDERS),
            decisions=self.bus.stream(DECISIONS), decisions_maxlen=policy(DECISIONS).maxlen))
        self._published_orders = metrics.MESSAGES_OUT.labels(ORDERS)
        self._published_decisions = metrics.MESSAGES_OUT.labels(DECISIONS)
        self.snapshots = SnapshotStore(cfg.postgres.url, session=cfg.session, env=cfg.env)
        self.recovery = Recovery(self.bus, self.state, self.snapshots, self.book, owner=self.instance,
                                 margin_ms=cfg.risk.restore_margin_ms)
        self.ready = asyncio.Event()
        self._pending: list[_Pending] = []
        self._reload_seen: bytes | None = None
        self._last_snapshot_ns = 0
        self._snapshot_error = ""
        self._balances: dict[tuple[str, str], Balance] = {}
        self._outgoing: dict[tuple[str, str], Decimal] = {}

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        await self._load_fx()
        with contextlib.suppress(Exception):
            await self._load_instruments()
        await self._ensure_state()
        reload_seen: Any = await self.bus.redis.get(self.state.keys.reload)
        self._reload_seen = reload_seen
        await self.state.load_scripts()
        if await self._clustered():
            # the deciding script would touch streams outside the risk state's hash slot
            self.state.publish = None
        self.consumer(Group.RISK, [SIGNALS], self.on_signal, decoder=decode_signal, before_ack=self.decide_batch)
        self.consumer(Group.RISK, [EXECUTIONS], self.on_execution, decoder=decoder_for(Execution).decode)
        self.consumer(Group.RISK, [BALANCES], self.on_balance, decoder=decoder_for(Balance).decode)
        for task in (self._follow_fx, self._sweep_expired, self._snapshot_loop, self._watch_reload,
                     self._refresh_instruments, self._gauges, self._follow_transfers_in_flight,
                     self._trim_published):
            self.background(task)
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on the main thread (tests)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_config)
        self.ready.set()

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if await self.state.initialised():
                await asyncio.wait_for(self._snapshot("shutdown"), timeout=3)
        await self.snapshots.close()
        await self.state.close()

    async def _clustered(self) -> bool:
        info: Any = await self.bus.redis.info("cluster")
        return bool(int(info.get("cluster_enabled", 0)))

    async def _trim_published(self) -> None:
        """``orders`` once every group has it, as the producer's streams are: the deciding script writes
        there without the producer (``decisions`` is capped by the script's own ``MAXLEN ~``)."""
        while await self.sleep(TRIM_INTERVAL_S):
            with contextlib.suppress(Exception):
                await trim_acknowledged(self.bus, ORDERS)

    async def _ensure_state(self) -> None:
        """Block until the shared state exists (restoring it if Redis lost it): never decide without it."""
        attempt = 0
        while not self.stopping:
            try:
                report = await self.recovery.ensure()
                if report is not None and not report.fresh:
                    m.RESTORES.inc()
                    self._publish_alerts([Alert(
                        alert_id=f"risk:restored:{time.time_ns()}", severity="warning", source="risk",
                        kind="state_restored", ts_ns=time.time_ns(),
                        message=(f"risk state was missing in Redis and was restored from snapshot "
                                 f"{report.snapshot_id} plus {report.decisions} decisions, "
                                 f"{report.executions} executions, {report.balances} balances replayed"),
                    )])
                self.degrade("")
                return
            except (psycopg.Error, OSError) as exc:
                if not isinstance(exc, psycopg.Error) and not is_redis_down(exc):
                    raise
                attempt += 1
                self.degrade(f"risk state missing and cannot be restored yet: {type(exc).__name__}")
                if attempt == 1:
                    log.error("cannot restore risk state, retrying", extra={"error": str(exc)})
                await self.sleep(backoff_delay(attempt))
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                attempt += 1
                await self.sleep(backoff_delay(attempt))

    # ------------------------------------------------------------------ handlers

    async def on_signal(self, d: Delivery) -> None:
        """Stage one: decode and the stateless checks; the verdict waits for ``decide_batch``."""
        started = time.perf_counter()
        now_ns = time.time_ns()
        msg = d.message
        if isinstance(msg, UndecodableSignal):
            verdict = self.book.reject_undecodable(msg.raw, msg.error, d.entry_id.decode(), now_ns)
            self._pending.append(_Pending(None, None, verdict, now_ns, started))
            return
        try:
            assessed = self.book.assess(msg, now_ns)
        except Exception as exc:  # a bug must reject, never approve and never stop the service
            m.INTERNAL_ERRORS.inc()
            log.exception("checking a signal failed", extra={"signal_id": msg.signal_id})
            assessed = Rejection(reasons.ERROR, f"could not be checked: {type(exc).__name__}: {exc}")
        if isinstance(assessed, Rejection):
            self._pending.append(_Pending(msg, None, self.book.rejected(msg, assessed, now_ns), now_ns, started))
        else:
            self._pending.append(_Pending(msg, assessed, None, now_ns, started, d.entry_id))

    async def decide_batch(self) -> set[tuple[str, bytes]]:
        """Stage two, before the batch is acknowledged: check-and-reserve what passed, publish every verdict.

        An approval is published by the deciding script itself, which also acknowledges its signal
        (returned, so the consumer does not acknowledge it again): a batch of approvals costs one
        round trip. Other verdicts go out through the producer with the batch's acknowledgements.
        Safe to retry: the state answers a signal it already decided with the same verdict.
        """
        pending = self._pending
        acked: set[tuple[str, bytes]] = set()
        if not pending:
            return acked
        publish = self.state.publish is not None
        requests: list[DecideRequest] = []
        publications: list[Publication | None] = []
        approvals: list[Verdict | None] = []
        for p in pending:
            if p.assessed is not None:
                assert p.signal is not None
                requests.append(p.assessed.request)
                if publish:  # what an approval publishes, ready before the state decides
                    verdict = self.book.approval(p.signal, p.assessed, p.now_ns)
                    assert verdict.intent is not None
                    publications.append(Publication(p.entry_id, encode(verdict.intent), encode(verdict.decision)))
                    approvals.append(verdict)
        outcomes = iter(await self._decide(requests, publications if publish else None))
        approved = iter(approvals)
        published = 0
        for p in pending:  # no await from here on: a retry never publishes twice
            if p.verdict is None:
                assert p.signal is not None and p.assessed is not None
                outcome = next(outcomes)
                approval = next(approved) if publish else None
                if isinstance(outcome, ResponseError):  # this signal's script failed: reject it, go on
                    m.INTERNAL_ERRORS.inc()
                    log.error("check-and-reserve failed", extra={"signal_id": p.signal.signal_id,
                                                                 "error": str(outcome)})
                    p.verdict = self.book.rejected(
                        p.signal, Rejection(reasons.ERROR, f"risk state error: {outcome}"), p.now_ns)
                elif outcome.published:
                    assert approval is not None
                    p.verdict = approval
                    published += 1
                    acked.add((SIGNALS, p.entry_id))
                    m.DECISIONS.labels(reasons.APPROVED).inc()
                    m.DECISION_SECONDS.observe(time.perf_counter() - p.started)
                    continue
                else:
                    p.verdict = self.book.decided(p.signal, p.assessed, outcome, p.now_ns)
            self._publish(p.verdict)
            m.DECISIONS.labels(p.verdict.decision.reason).inc()
            m.DECISION_SECONDS.observe(time.perf_counter() - p.started)
        if published:
            self._published_orders.inc(published)
            self._published_decisions.inc(published)
        self._pending = []
        return acked

    async def _decide(self, requests: list[DecideRequest],
                      publications: list[Publication | None] | None) -> list[DecideOutcome | ResponseError]:
        for _ in range(2):
            try:
                t0 = time.perf_counter()
                outcomes = await self.state.decide_many(requests, publications)
                if requests:
                    m.RESERVE_SECONDS.observe(time.perf_counter() - t0)
                return outcomes
            except StateNotReady:
                log.error("risk state missing in Redis: restoring before deciding again")
                await self._ensure_state()
        raise Retryable("risk state not restored yet")

    async def _settle(self, request: SettleRequest) -> SettleOutcome:
        for _ in range(2):
            try:
                return await self.state.settle(request)
            except StateNotReady:
                await self._ensure_state()
        raise Retryable("risk state not restored yet")

    def _publish(self, verdict: Verdict) -> None:
        if verdict.intent is not None:
            self.producer.publish(ORDERS, verdict.intent)
        self.producer.publish(DECISIONS, verdict.decision)
        self._publish_alerts(verdict.alerts)

    def _publish_alerts(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self.producer.publish(ALERTS, alert)

    async def on_execution(self, d: Delivery) -> None:
        execution: Execution = d.message
        request = self.book.settlement(execution)  # ValueError (PnL not a number): retried, then dead-lettered
        outcome = await self._settle(request)
        m.SETTLEMENTS.labels("duplicate" if outcome.duplicate else execution.status).inc()
        if outcome.duplicate:
            return
        alerts = self.book.settled_alerts(execution, outcome)
        for trigger in outcome.triggers:
            m.GUARD_TRIGGERS.labels(trigger).inc()
            log.warning("risk guard triggered", extra={"guard": trigger, "arb_id": execution.arb_id})
        self._publish_alerts(alerts)

    async def on_balance(self, d: Delivery) -> None:
        balance: Balance = d.message
        if not balance.free.is_finite():
            m.BALANCE_UPDATES.labels("invalid").inc()
            log.warning("balance is not a number", extra={"exchange": balance.exchange, "asset": balance.asset})
            return
        self._balances[(balance.exchange, balance.asset)] = balance
        await self._apply_balance(balance)

    async def _apply_balance(self, balance: Balance) -> None:
        """What can be traded: the free balance minus what planned transfers will take out of it."""
        outgoing = self._outgoing.get((balance.exchange, balance.asset), Decimal(0))
        free = max(Decimal(0), balance.free - outgoing)
        units = self.book.balance_units(msgspec.structs.replace(balance, free=free) if outgoing else balance)
        assert units is not None
        applied = await self.state.set_balance(balance.exchange, balance.asset, units, balance.ts_ns)
        m.BALANCE_UPDATES.labels("applied" if applied else "older").inc()

    async def _follow_transfers_in_flight(self) -> None:
        """Amounts the rebalancer has planned to withdraw are not available to trade.

        The rebalancer rewrites ``transfers_in_flight`` hashes (``outgoing:<ASSET>``) every round;
        each replica re-applies the balances it knows when they change. The Lua state keeps the
        newest balance by its exchange timestamp, so a replica with an older view changes nothing.
        """
        exchanges = [name for name, _ in self.cfg.exchanges.items()]
        while not self.stopping:
            with contextlib.suppress(Exception):
                pipe = self.bus.redis.pipeline(transaction=False)
                for exchange in exchanges:
                    pipe.hgetall(self.bus.keys.transfers_in_flight(exchange))
                replies: Any = await pipe.execute()
                outgoing: dict[tuple[str, str], Decimal] = {}
                for exchange, fields in zip(exchanges, replies, strict=True):
                    for field, value in (fields or {}).items():
                        name = field.decode() if isinstance(field, bytes) else str(field)
                        if name.startswith("outgoing:"):
                            with contextlib.suppress(ArithmeticError, ValueError):
                                outgoing[(exchange, name.removeprefix("outgoing:"))] = Decimal(value.decode())
                changed = {k for k in set(outgoing) | set(self._outgoing) if outgoing.get(k) != self._outgoing.get(k)}
                self._outgoing = outgoing
                for key in changed:
                    if key in self._balances:
                        await self._apply_balance(self._balances[key])
            await self.sleep(1.0)

    # ------------------------------------------------------------------ market inputs

    def _fx_pairs(self) -> list[str]:
        ref = self.cfg.trading.reference_currency
        quotes = {split_symbol(s)[1] for _, ex in self.cfg.exchanges.items() if ex.enabled for s in ex.symbols}
        return sorted(f"{ref}/{q}" for q in quotes if q != ref)

    async def _load_fx(self) -> None:
        for pair in self._fx_pairs():
            raw: Any = await self.bus.redis.get(self.bus.keys.fx_latest(pair))
            if raw:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    self.book.on_fx(_fx.decode(raw))
        last: Any = await self.bus.redis.xrevrange(self.bus.stream(FX), count=50)
        for _, fields in reversed(last or []):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError, ValueError):
                self.book.on_fx(_fx.decode(fields.get(FIELD, b"")))
        self._fx_from = last[0][0].decode() if last else "0-0"

    async def _follow_fx(self) -> None:
        """Every replica reads every FX rate (XREAD, no group)."""
        key = self.bus.stream(FX)
        attempt = 0
        while not self.stopping:
            try:
                reply: Any = await self.bus.redis.xread({key: self._fx_from}, count=500, block=500)
                attempt = 0
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                attempt += 1
                await self.sleep(backoff_delay(attempt))
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self._fx_from = entry_id.decode()
                    try:
                        self.book.on_fx(_fx.decode(fields.get(FIELD, b"")))
                    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                        log.warning("bad fx message", extra={"entry": self._fx_from, "error": str(exc)})

    async def _load_instruments(self) -> None:
        """Instrument metadata from ``KeySpace.instruments(exchange)`` when the collector published it:
        a hash of symbol -> Instrument JSON, or one JSON list of instruments."""
        for exchange in self.limits.exchanges:
            key = self.bus.keys.instruments(exchange)
            kind: Any = await self.bus.redis.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            found: list[Instrument] = []
            try:
                if kind == "hash":
                    found = [_instrument.decode(v) for v in (await self.bus.redis.hgetall(key)).values()]
                elif kind == "string":
                    raw: Any = await self.bus.redis.get(key)
                    found = _instruments.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("unreadable instruments, ignored", extra={"exchange": exchange, "error": str(exc)})
                continue
            if found:
                self.book.set_instruments(exchange, found)

    async def _refresh_instruments(self) -> None:
        while await self.sleep(INSTRUMENTS_REFRESH_S):
            with contextlib.suppress(Exception):
                await self._load_instruments()

    # ------------------------------------------------------------------ background

    async def _sweep_expired(self) -> None:
        while await self.sleep(SWEEP_INTERVAL_S):
            try:
                expired = await self.state.expire(time.time_ns() // 1_000_000, 256)
            except StateNotReady:
                continue
            except Exception as exc:
                if is_redis_down(exc):
                    continue
                raise
            if expired:
                m.EXPIRED.inc(len(expired))
                log.info("reservations expired without an execution", extra={"count": len(expired)})

    async def _snapshot(self, reason: str) -> None:
        await self.snapshots.connect()  # no dump while PostgreSQL is down
        dump = await self.state.dump(verdicts=False)
        await self.snapshots.save(dump, reason)
        self._last_snapshot_ns = time.time_ns()

    async def _snapshot_loop(self) -> None:
        """One replica (the lease holder) snapshots on change (coalesced) and every interval."""
        lease = Lease(self.bus, self.bus.keys.lease(Group.RISK, "snapshots"), self.instance, SNAPSHOT_LEASE_MS)
        held = False
        last_version = -1
        last_write = 0.0
        written = 0
        failures = 0
        while await self.sleep(SNAPSHOT_POLL_S):
            r = self.cfg.risk
            try:
                # renew first: a restarted replica with the same name takes its own lease back at once
                held = await lease.renew() or await lease.acquire()
                if not held:
                    continue
                version = await self.state.version()
                now = time.monotonic()
                changed = version != last_version and now - last_write >= r.snapshot_min_interval_ms / 1000
                if not (changed or now - last_write >= r.snapshot_interval_s):
                    continue
                if failures and now - last_write < backoff_delay(failures):
                    continue
                if not await self.state.initialised():
                    continue
                await self._snapshot("change" if changed else "periodic")
                last_version, last_write, failures = version, now, 0
                written += 1
                m.SNAPSHOTS.labels("ok").inc()
                if self._snapshot_error:
                    log.info("snapshots to PostgreSQL work again")
                    self._snapshot_error = ""
                    self.degrade("")
                if written % 100 == 0:
                    await self.snapshots.prune(r.snapshot_keep)
            except (psycopg.Error, OSError) as exc:
                if isinstance(exc, OSError) and is_redis_down(exc) and not isinstance(exc, psycopg.Error):
                    continue
                failures += 1
                last_write = time.monotonic()
                m.SNAPSHOTS.labels("failed").inc()
                if not self._snapshot_error:
                    log.error("risk snapshot to PostgreSQL failed; deciding goes on, retrying",
                              extra={"error": f"{type(exc).__name__}: {exc}"})
                self._snapshot_error = type(exc).__name__
                self.degrade(f"risk snapshots failing: {self._snapshot_error}")
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
        if held:
            with contextlib.suppress(Exception):
                await lease.release()

    async def _watch_reload(self) -> None:
        while await self.sleep(RELOAD_POLL_S):
            try:
                seen: Any = await self.bus.redis.get(self.state.keys.reload)
            except Exception as exc:
                if is_redis_down(exc):
                    continue
                raise
            if seen != self._reload_seen:
                self._reload_seen = seen
                self.reload_config()

    def reload_config(self) -> bool:
        """Re-read the config; apply the new limits if valid, else refuse and keep the old ones."""
        try:
            cfg = load_config(self.config_path)
            limits = RiskLimits.from_config(cfg)
            for section in _RESTART_SECTIONS:
                if getattr(cfg, section) != getattr(self.cfg, section):
                    raise ConfigError(section, "changed: that needs a restart, not a reload", show_value=False)
        except ConfigError as err:
            m.RELOADS.labels("refused").inc()
            log.error("config reload refused, the current limits stay", extra={"error": str(err)})
            self._publish_alerts([Alert(alert_id=f"risk:reload:{time.time_ns()}", severity="warning",
                                        source="risk", kind="config_reload_refused", ts_ns=time.time_ns(),
                                        message=f"risk config reload refused: {err}")])
            return False
        self.cfg = cfg
        self.limits = limits
        self.book.set_limits(limits)
        m.RELOADS.labels("applied").inc()
        log.warning("risk limits reloaded", extra={"config": self.config_path or "(environment)"})
        self._publish_alerts([Alert(alert_id=f"risk:reload:{time.time_ns()}", severity="info", source="risk",
                                    kind="config_reloaded", ts_ns=time.time_ns(),
                                    message="risk limits reloaded")])
        return True

    async def _gauges(self) -> None:
        while await self.sleep(GAUGES_INTERVAL_S):
            try:
                summary = summarize(await self.state.overview(), self.limits, time.time_ns() // 1_000_000)
            except Exception as exc:
                if is_redis_down(exc):
                    continue
                raise
            m.HALTED.set(1 if summary["halted"] else 0)
            m.BREAKER_OPEN.set(1 if summary["circuit_breaker_until_ms"] else 0)
            m.OPEN_ARBITRAGES.set(summary["open_arbitrages"])
            m.EXPOSURE.labels("total", "all").set(summary["exposure"]["total"])
            for scope in ("coins", "exchanges"):
                for name, value in summary["exposure"][scope].items():
                    m.EXPOSURE.labels(scope[:-1], name).set(value)
            m.DAILY_PNL.set(summary["pnl"]["daily_realised"])
            m.DAILY_LOSS_LIMIT.set(self.cfg.risk.daily_loss_limit)  # follows reloads
            m.EQUITY.set(summary["equity"])
            m.DRAWDOWN.set(summary["drawdown"])
            m.LOSS_STREAK.set(summary["loss_streak"])

    async def extra_health(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"snapshots": {
            "last_age_s": round((time.time_ns() - self._last_snapshot_ns) / 1e9, 1) if self._last_snapshot_ns
            else None, "error": self._snapshot_error or None}}
        with contextlib.suppress(Exception):
            state: Any = await asyncio.wait_for(self.bus.redis.get(self.state.keys.halt), timeout=1)
            doc["halted"] = json.loads(state) if state else None
        return doc
