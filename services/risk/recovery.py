"""Restoring the shared risk state after Redis lost it: snapshot, then roll forward.

The ``decisions``, ``executions`` and ``balances`` streams are the log of everything that
changed the state (each approving ``Decision`` carries its exact ``RiskReservation``). So a
restore loads the newest PostgreSQL snapshot and replays those streams from a little
before it: every replay step is idempotent (verdicts by signal id, settlements by arb id,
balances by time), so the overlap is harmless and the result is the state as it was when
Redis lost it, not as it was at the last snapshot.

One replica restores, under a lease; the others find the state not initialised, refuse to
decide (``StateNotReady``) and wait. The ``init`` marker is set only when the replay is
done, so nobody decides on a half-restored state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from services.risk import reasons
from services.risk.core import RiskBook
from services.risk.redis_state import RedisRiskState
from services.risk.snapshots import SnapshotStore
from services.risk.state import DecideOutcome, StateDump
from services.risk.units import units_of_float
from shared.models import Balance, Decision, Execution, decoder_for
from shared.runtime import FIELD, Bus, Lease
from shared.streams import BALANCES, DECISIONS, EXECUTIONS

log = logging.getLogger(__name__)

LOCK_TTL_MS = 30_000
PAGE = 1_000
_decisions = decoder_for(Decision)
_executions = decoder_for(Execution)
_balances = decoder_for(Balance)


class LeaseLost(Exception):
    """Another replica took over the restore (this one stalled past the lease): start again."""


async def _keep(lease: Lease) -> None:
    if not await lease.renew():
        raise LeaseLost(lease.key)


@dataclass(frozen=True, slots=True)
class RestoreReport:
    snapshot_id: int | None
    snapshot_ts_ms: int
    decisions: int
    executions: int
    balances: int

    @property
    def fresh(self) -> bool:
        """Nothing to restore: a new session's first start."""
        return self.snapshot_id is None and not (self.decisions or self.executions or self.balances)


class Recovery:
    def __init__(self, bus: Bus, state: RedisRiskState, store: SnapshotStore, book: RiskBook, *,
                 owner: str, margin_ms: int) -> None:
        self.bus = bus
        self.state = state
        self.store = store
        self.book = book
        self.owner = owner
        self.margin_ms = margin_ms

    async def ensure(self) -> RestoreReport | None:
        """Return once the state is initialised; restore it first if this replica gets the lease."""
        lease = Lease(self.bus, self.state.keys.restore_lock, self.owner, LOCK_TTL_MS)
        while not await self.state.initialised():
            if not await lease.acquire():
                await asyncio.sleep(0.05)  # another replica is restoring
                continue
            try:
                if await self.state.initialised():
                    return None
                return await self._restore(lease)
            except LeaseLost:
                log.warning("restore lease lost, starting again")
            finally:
                await lease.release()
        return None

    async def _restore(self, lease: Lease) -> RestoreReport:
        started = time.monotonic()
        found = await self.store.latest()
        snapshot_id, dump = found if found is not None else (None, StateDump(ts_ms=0))
        await _keep(lease)
        await self.state.restore(dump)
        await _keep(lease)
        since = max(0, dump.ts_ms - self.margin_ms) if found is not None else 0
        report = RestoreReport(
            snapshot_id=snapshot_id, snapshot_ts_ms=dump.ts_ms,
            decisions=await self._replay_decisions(since, lease),
            executions=await self._replay_executions(since, lease),
            balances=await self._replay_balances(since, lease),
        )
        await _keep(lease)
        await self.state.mark_initialised(json.dumps({
            "by": self.owner, "ts_ms": int(time.time() * 1000), "snapshot_id": snapshot_id,
        }))
        log.log(logging.INFO if report.fresh else logging.WARNING,
                "risk state initialised" if report.fresh else "risk state restored", extra={
            "snapshot_id": snapshot_id, "snapshot_ts_ms": dump.ts_ms, "replayed_decisions": report.decisions,
            "replayed_executions": report.executions, "replayed_balances": report.balances,
            "seconds": round(time.monotonic() - started, 3),
        })
        return report

    async def _entries(self, stream: str, since_ms: int, lease: Lease) -> AsyncIterator[bytes]:
        key = self.bus.stream(stream)
        start = f"{since_ms}-0"
        while True:
            page: Any = await self.bus.redis.xrange(key, min=start, max="+", count=PAGE)
            if not page:
                return
            for _, fields in page:
                yield fields.get(FIELD, b"")
            if len(page) < PAGE:
                return
            start = "(" + page[-1][0].decode()
            await _keep(lease)

    async def _replay_decisions(self, since_ms: int, lease: Lease) -> int:
        applied = 0
        async for raw in self._entries(DECISIONS, since_ms, lease):
            try:
                d: Decision = _decisions.decode(raw)
            except msgspec.DecodeError:
                continue
            if d.reason not in reasons.STATEFUL and d.reason != reasons.APPROVED:
                continue  # stateless verdicts never reached the state
            res = d.reservation
            notional = res.counters.get("x:total", 0) if res else units_of_float(d.notional)
            # As the state stored it, but for the values behind a rejection's detail (not on the Decision).
            expires_ns = d.ts_ns + self.book.limits.intent_ttl_ns
            stored = DecideOutcome(d.reason, d.ts_ns, notional, expires_ns).stored()
            if await self.state.apply_decision(d.signal_id, stored, d.ts_ns // 1_000_000,
                                               res if d.approved else None):
                applied += 1
        return applied

    async def _replay_executions(self, since_ms: int, lease: Lease) -> int:
        applied = 0
        async for raw in self._entries(EXECUTIONS, since_ms, lease):
            try:
                ex: Execution = _executions.decode(raw)
                request = self.book.settlement(ex)
            except (msgspec.DecodeError, ValueError):
                continue
            outcome = await self.state.settle(request, force=True)
            applied += 0 if outcome.duplicate else 1
        return applied

    async def _replay_balances(self, since_ms: int, lease: Lease) -> int:
        applied = 0
        async for raw in self._entries(BALANCES, since_ms, lease):
            try:
                b: Balance = _balances.decode(raw)
            except msgspec.DecodeError:
                continue
            units = self.book.balance_units(b)
            if units is not None and await self.state.set_balance(b.exchange, b.asset, units, b.ts_ns):
                applied += 1
        return applied
