"""The shared risk state: what is reserved, realised and halted, checked-and-reserved atomically.

Two implementations with one behaviour:
- ``MemoryRiskState`` (here) for the backtest, and as the reference the Lua mirrors;
- ``RedisRiskState`` (``redis_state.py``) for the service: the same steps as Lua scripts,
  so any number of replicas share one state and never pass a limit between them.

The core (``core.py``) turns a signal into a ``DecideRequest``: a flat list of counters to
check against caps and add to, cooldowns, order-rate windows and balances. The state
applies it all-or-nothing. Both implementations keep the same data in the same shape
(hashes of decimal strings, sorted sets scored in ms) and compare numbers the way Lua does
(as doubles), so given the same requests they return the same outcomes and hold the same
state; ``tests/test_risk_state.py`` runs both side by side.

Time is always the caller's (``now_ms``): no Redis TTL or server clock decides anything, so
a backtest on a simulated clock decides exactly like the live service.

State layout (Redis: one hash tag, so one Lua script may touch every key):
- ``halt``: the kill switch (manual ``arb halt`` or automatic), a JSON payload;
- ``state`` hash: ``init``, ``ver`` (bumped on every change), ``open``, ``x:total``,
  ``x:coin:<ASSET>``, ``x:ex:<exchange>``, ``rb:<exchange>:<ASSET>`` (reserved balance),
  ``pnl:day``, ``pnl:daily``, ``pnl:total``, ``pnl:peak``, ``loss:streak``, ``breaker:until``,
  ``alert:daily``, ``alert:dd``;
- ``reservations`` hash arb id -> ``"field units field units ..."`` (what to give back);
- ``expiry`` zset arb id -> ms; ``verdicts`` hash signal id -> verdict; ``verdict_times``
  zset; ``settled`` zset arb id -> ms; ``cooldowns`` hash -> until ms; ``balances`` hash
  ``b:<ex>:<ASSET>`` -> units, ``t:<ex>:<ASSET>`` -> ts_ns; ``orders:<exchange>`` zsets.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from services.risk import reasons
from shared.models import RiskReservation

EXPIRE_BATCH = 64
"""Reservations released per call by lazy expiry (the sweeper catches up beyond it)."""
PRUNE_BATCH = 64
SEP = "\x1f"
"""Separates the parts of a stored verdict (never part of an id, reason or number)."""


class StateNotReady(Exception):
    """The state was lost (e.g. Redis restarted empty) and is not restored yet: never decide on it."""


# --------------------------------------------------------------------------- requests
# Frozen msgspec structs rather than named tuples or dataclasses: several are built per signal.


class Claim(msgspec.Struct, frozen=True):
    """Add ``units`` to counter ``field`` unless that takes it past ``cap``; else reject with ``reason``."""

    field: str
    units: int
    cap: int
    reason: str


class CooldownClaim(msgspec.Struct, frozen=True):
    """Reject with ``reason`` while cooldown ``field`` runs; on approval extend it to ``until_ms``."""

    field: str
    until_ms: int
    reason: str


class RateClaim(msgspec.Struct, frozen=True):
    exchange: str
    orders: int
    limit: int


class BalanceClaim(msgspec.Struct, frozen=True):
    """``units`` of ``asset`` on ``exchange`` must be free after what is already reserved."""

    exchange: str
    asset: str
    units: int

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.asset}"


class DecideRequest(msgspec.Struct, frozen=True):
    """Immutable; a msgspec struct rather than a dataclass because one is built per signal (3x cheaper)."""

    signal_id: str
    arb_id: str
    ts_ns: int
    now_ms: int
    intent_expires_ns: int
    """When the order intent is void (stored with the verdict, so a redelivery rebuilds the same intent)."""
    expires_ms: int
    """When the reservation lapses if no execution released it."""
    notional: int
    day: str
    daily_loss_limit: int
    starting_equity: int
    max_drawdown: float
    require_balances: bool
    verdict_retention_ms: int
    rate_window_ms: int
    cooldowns: tuple[CooldownClaim, ...]
    rates: tuple[RateClaim, ...]
    claims: tuple[Claim, ...]
    balances: tuple[BalanceClaim, ...]
    record: str
    """What an approval reserves, ``"field units ..."``: every claim, then every balance."""
    template: object = None
    """Set by the core: requests with the same template (compared by identity) differ only in
    ``signal_id``, ``arb_id``, ``ts_ns``, ``now_ms``, ``intent_expires_ns``, ``expires_ms``,
    ``notional``, ``day``, ``record``, cooldown ``until_ms`` and claim and balance ``units``; the
    rest (limits, names, caps, reasons, rates, counts) is the same, so a state may cache what it
    derives from that rest by the template."""


class DecideOutcome(msgspec.Struct, frozen=True):
    reason: str
    ts_ns: int
    notional: int
    expires_ns: int
    duplicate: bool = False
    subject: str = ""
    """What broke: a counter, cooldown, exchange, ``exchange:ASSET``, the day, or the halt payload."""
    current: str = ""
    amount: str = ""
    cap: str = ""
    finished: bool = False
    """A repeat of an arbitrage that is already settled: nothing to send again."""
    published: bool = False
    """The state itself published the approval (intent and decision) and acknowledged the signal."""

    @property
    def approved(self) -> bool:
        return self.reason == reasons.APPROVED

    def stored(self) -> str:
        return SEP.join((self.reason, str(self.ts_ns), str(self.notional), str(self.expires_ns),
                         self.subject, self.current, self.amount, self.cap))

    @classmethod
    def from_stored(cls, value: str, *, duplicate: bool, published: bool = False) -> DecideOutcome:
        reason, ts_ns, notional, expires_ns, subject, current, amount, cap = value.split(SEP)
        return cls(reason, int(ts_ns), int(notional), int(expires_ns), duplicate, subject, current, amount, cap,
                   published=published)


@dataclass(frozen=True, slots=True)
class SettleRequest:
    arb_id: str
    ts_ms: int
    pnl: int
    day: str
    daily_loss_limit: int
    starting_equity: int
    max_drawdown: float
    breaker_losses: int
    breaker_until_ms: int
    cooldowns: tuple[tuple[str, int], ...]
    """Loss cooldowns to extend when the arbitrage lost."""
    halt_payload: str
    """Non-empty: set the kill switch (automatic halt) unless it is already set."""
    settled_retention_ms: int


@dataclass(frozen=True, slots=True)
class SettleOutcome:
    duplicate: bool
    released: bool = False
    triggers: tuple[str, ...] = ()
    daily_pnl: int = 0
    total_pnl: int = 0
    peak_pnl: int = 0
    streak: int = 0


class StateDump(msgspec.Struct, kw_only=True):
    """Everything in the risk state. Snapshots (``risk_guard_snapshots.state``) leave the verdicts out:
    they are the bulk of it, and a restore rebuilds the recent ones from the ``decisions`` stream."""

    version: int = 1
    ts_ms: int
    halt: str | None = None
    state: dict[str, str] = {}
    reservations: dict[str, str] = {}
    expiry: dict[str, int] = {}
    verdicts: dict[str, str] = {}
    verdict_times: dict[str, int] = {}
    settled: dict[str, int] = {}
    cooldowns: dict[str, str] = {}
    balances: dict[str, str] = {}
    orders: dict[str, dict[str, int]] = {}

    def comparable(self) -> StateDump:
        """Without the dump time and the ``init`` marker (which says where the state came from)."""
        state = {k: v for k, v in self.state.items() if k != "init"}
        return msgspec.structs.replace(self, ts_ms=0, state=state)


class RiskState(Protocol):
    """The synchronous state interface the backtest engine drives (``RedisRiskState`` is its async twin)."""

    def decide(self, req: DecideRequest) -> DecideOutcome: ...
    def settle(self, req: SettleRequest, *, force: bool = False) -> SettleOutcome: ...
    def expire(self, now_ms: int, limit: int = EXPIRE_BATCH) -> list[str]: ...
    def set_balance(self, exchange: str, asset: str, units: int, ts_ns: int) -> bool: ...
    def dump(self, now_ms: int, *, verdicts: bool = True) -> StateDump: ...


def record_pairs(record: str) -> list[tuple[str, int]]:
    tokens = record.split()
    return [(tokens[i], int(tokens[i + 1])) for i in range(0, len(tokens), 2)]


def make_record(counters: Iterable[tuple[str, int]]) -> str:
    return " ".join(f"{name} {units}" for name, units in counters if units)


def rate_members(arb: str, orders: int) -> list[str]:
    return [f"{arb}:{i}" for i in range(orders)]


# --------------------------------------------------------------------------- in memory


class _ZSet:
    """A sorted set with Redis's order (score, then member bytes) and lazy heap deletion."""

    __slots__ = ("_heap", "scores")

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self._heap: list[tuple[float, bytes, str]] = []

    def add(self, member: str, score: float) -> None:
        if self.scores.get(member) == score:
            return
        self.scores[member] = score
        heapq.heappush(self._heap, (score, member.encode(), member))

    def remove(self, member: str) -> None:
        self.scores.pop(member, None)

    def _clean_top(self) -> None:
        heap = self._heap
        while heap and self.scores.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    def pop_upto(self, max_score: float, limit: int | None = None) -> list[str]:
        """Remove and return members scored <= ``max_score``, lowest first (ZRANGEBYSCORE + ZREM)."""
        out: list[str] = []
        while limit is None or len(out) < limit:
            self._clean_top()
            if not self._heap or self._heap[0][0] > max_score:
                break
            _, _, member = heapq.heappop(self._heap)
            del self.scores[member]
            out.append(member)
        return out

    def __len__(self) -> int:
        return len(self.scores)

    def __contains__(self, member: str) -> bool:
        return member in self.scores

    def dump(self) -> dict[str, int]:
        return {m: int(s) for m, s in self.scores.items()}


def _num(value: str | None) -> float:
    """``tonumber`` of a stored value, as Lua computes it (a double); missing is 0."""
    return float(value) if value else 0.0


@dataclass
class MemoryRiskState:
    """The reference implementation: plain dicts, Lua's arithmetic. One process only."""

    halt: str | None = None
    state: dict[str, str] = field(default_factory=lambda: {"init": "memory"})
    reservations: dict[str, str] = field(default_factory=dict)
    expiry: _ZSet = field(default_factory=_ZSet)
    verdicts: dict[str, str] = field(default_factory=dict)
    verdict_times: _ZSet = field(default_factory=_ZSet)
    settled: _ZSet = field(default_factory=_ZSet)
    cooldowns: dict[str, str] = field(default_factory=dict)
    balances: dict[str, str] = field(default_factory=dict)
    orders: dict[str, _ZSet] = field(default_factory=dict)

    # ------------------------------------------------------------------ steps (one per Lua function)

    def _incr(self, name: str, delta: int) -> int:
        value = int(self.state.get(name, "0")) + delta
        if value == 0:
            self.state.pop(name, None)
        else:
            self.state[name] = str(value)
        return value

    def _bump(self) -> None:
        self._incr("ver", 1)

    def _release(self, arb: str) -> bool:
        self.expiry.remove(arb)
        record = self.reservations.pop(arb, None)
        if record is None:
            return False
        for name, units in record_pairs(record):
            self._incr(name, -units)
        return True

    def _expire(self, now_ms: int, limit: int) -> list[str]:
        expired = self.expiry.pop_upto(now_ms, limit)
        for arb in expired:
            self._release(arb)
        return expired

    def _prune(self, zset: _ZSet, before_ms: int, mapping: dict[str, str] | None = None) -> None:
        for member in zset.pop_upto(before_ms, PRUNE_BATCH):
            if mapping is not None:
                mapping.pop(member, None)

    def _rate(self, exchange: str) -> _ZSet:
        zset = self.orders.get(exchange)
        if zset is None:
            zset = self.orders[exchange] = _ZSet()
        return zset

    def _apply(self, arb: str, record: str, expires_ms: int, now_ms: int,
               cooldowns: Iterable[tuple[str, int]], orders: Iterable[tuple[str, int]]) -> None:
        for name, units in record_pairs(record):
            self._incr(name, units)
        self.reservations[arb] = record
        self.expiry.add(arb, expires_ms)
        for name, until in cooldowns:
            if until > now_ms and until > _num(self.cooldowns.get(name)):
                self.cooldowns[name] = str(until)
        for exchange, count in orders:
            zset = self._rate(exchange)
            for member in rate_members(arb, count):
                zset.add(member, now_ms)
        self._bump()

    # ------------------------------------------------------------------ the interface

    def decide(self, req: DecideRequest) -> DecideOutcome:
        if "init" not in self.state:
            raise StateNotReady("risk state not initialised")
        previous = self.verdicts.get(req.signal_id)
        if previous is not None:
            return DecideOutcome.from_stored(previous, duplicate=True)
        # Its verdict forgotten (a restore), the arbitrage itself is not: never reserve it twice.
        if req.arb_id in self.reservations or req.arb_id in self.settled:
            return DecideOutcome(reasons.APPROVED, req.ts_ns, req.notional, req.intent_expires_ns, duplicate=True,
                                 finished=req.arb_id in self.settled)
        self._prune(self.verdict_times, req.now_ms - req.verdict_retention_ms, self.verdicts)
        if self._expire(req.now_ms, EXPIRE_BATCH):
            self._bump()
        outcome = self._check(req)
        if outcome.approved:
            self._apply(req.arb_id, req.record, req.expires_ms, req.now_ms,
                        ((c.field, c.until_ms) for c in req.cooldowns),
                        ((r.exchange, r.orders) for r in req.rates))
        self.verdicts[req.signal_id] = outcome.stored()
        self.verdict_times.add(req.signal_id, req.now_ms)
        return outcome

    def _check(self, req: DecideRequest) -> DecideOutcome:
        def reject(reason: str, subject: str = "", current: str = "", amount: str = "", cap: str = "") -> DecideOutcome:
            return DecideOutcome(reason, req.ts_ns, req.notional, req.intent_expires_ns, False, subject, current,
                                 amount, cap)

        now = req.now_ms
        if self.halt is not None:
            return reject(reasons.HALTED, self.halt)
        until = self.state.get("breaker:until")
        if until is not None and _num(until) > now:
            return reject(reasons.CIRCUIT_BREAKER, "", until)
        if self.state.get("pnl:day") == req.day:
            daily = self.state.get("pnl:daily", "0")
            if _num(daily) <= -float(req.daily_loss_limit):
                return reject(reasons.DAILY_LOSS, req.day, daily, "", str(req.daily_loss_limit))
        total = self.state.get("pnl:total", "0")
        peak = self.state.get("pnl:peak", "0")
        start = float(req.starting_equity)
        peak_equity = start + _num(peak)
        if peak_equity > 0 and (peak_equity - (start + _num(total))) / peak_equity >= req.max_drawdown:
            return reject(reasons.DRAWDOWN, "", total, peak, repr(req.max_drawdown))
        for c in req.cooldowns:
            running = self.cooldowns.get(c.field)
            if running is not None and _num(running) > now:
                return reject(c.reason, c.field, running)
        for r in req.rates:
            zset = self._rate(r.exchange)
            zset.pop_upto(now - req.rate_window_ms)
            if len(zset) + r.orders > r.limit:
                return reject(reasons.ORDER_RATE, r.exchange, str(len(zset)), str(r.orders), str(r.limit))
        for claim in req.claims:
            current = self.state.get(claim.field, "0")
            if _num(current) + float(claim.units) > float(claim.cap):
                return reject(claim.reason, claim.field, current, str(claim.units), str(claim.cap))
        for b in req.balances:
            available = self.balances.get("b:" + b.key)
            reserved = self.state.get("rb:" + b.key, "0")
            if available is None:
                if req.require_balances:
                    return reject(reasons.BALANCE, b.key, "", str(b.units), reserved)
            elif _num(available) - _num(reserved) < float(b.units):
                return reject(reasons.BALANCE, b.key, available, str(b.units), reserved)
        return DecideOutcome(reasons.APPROVED, req.ts_ns, req.notional, req.intent_expires_ns)

    def settle(self, req: SettleRequest, *, force: bool = False) -> SettleOutcome:
        if "init" not in self.state and not force:
            raise StateNotReady("risk state not initialised")
        if req.arb_id in self.settled:
            return SettleOutcome(duplicate=True)
        released = self._release(req.arb_id)
        triggers: list[str] = []
        # The day only rolls forward: a late execution of a past day counts in the total, not today.
        day = self.state.get("pnl:day")
        if day is None or req.day > day:
            self.state["pnl:day"] = req.day
            self.state.pop("pnl:daily", None)
        past_day = day is not None and req.day < day
        daily = int(self.state.get("pnl:daily", "0")) if past_day else self._incr("pnl:daily", req.pnl)
        total = self._incr("pnl:total", req.pnl)
        peak = self.state.get("pnl:peak", "0")
        if float(total) > float(peak):
            peak = str(total)
            self.state["pnl:peak"] = peak
        if not past_day and float(daily) <= -float(req.daily_loss_limit) and self.state.get("alert:daily") != req.day:
            self.state["alert:daily"] = req.day
            triggers.append(reasons.TRIGGER_DAILY_LOSS)
        start = float(req.starting_equity)
        peak_equity = start + float(peak)
        if peak_equity > 0 and (peak_equity - (start + float(total))) / peak_equity >= req.max_drawdown:
            if "alert:dd" not in self.state:
                self.state["alert:dd"] = "1"
                triggers.append(reasons.TRIGGER_DRAWDOWN)
        else:
            self.state.pop("alert:dd", None)
        streak = int(self.state.get("loss:streak", "0"))
        if req.pnl < 0:
            streak = self._incr("loss:streak", 1)
            if streak >= req.breaker_losses:
                if float(req.breaker_until_ms) > _num(self.state.get("breaker:until")):
                    self.state["breaker:until"] = str(req.breaker_until_ms)
                self.state.pop("loss:streak", None)
                streak = 0
                triggers.append(reasons.TRIGGER_CIRCUIT_BREAKER)
            for name, until in req.cooldowns:
                if until > _num(self.cooldowns.get(name)):
                    self.cooldowns[name] = str(until)
        elif req.pnl > 0:
            self.state.pop("loss:streak", None)
            streak = 0
        if req.halt_payload and self.halt is None:
            self.halt = req.halt_payload
            triggers.append(reasons.TRIGGER_KILL_SWITCH)
        self.settled.add(req.arb_id, req.ts_ms)
        self._prune(self.settled, req.ts_ms - req.settled_retention_ms)
        self._bump()
        return SettleOutcome(False, released, tuple(triggers), int(self.state.get("pnl:daily", "0")), total,
                             int(peak), streak)

    def expire(self, now_ms: int, limit: int = EXPIRE_BATCH) -> list[str]:
        expired = self._expire(now_ms, limit)
        if expired:
            self._bump()
        return expired

    def set_balance(self, exchange: str, asset: str, units: int, ts_ns: int) -> bool:
        key = f"{exchange}:{asset}"
        ts_ns = max(0, ts_ns)
        seen = self.balances.get("t:" + key)
        if seen is not None and int(seen) > ts_ns:
            return False
        self.balances["b:" + key] = str(units)
        self.balances["t:" + key] = str(ts_ns)
        self._bump()
        return True

    def apply_decision(self, signal_id: str, stored: str, now_ms: int,
                       reservation: RiskReservation | None) -> bool:
        """Replay one published decision (restore): record its verdict and, if approved, its reservation."""
        if signal_id in self.verdicts:
            return False
        arb = reservation.arb_id if reservation is not None else ""
        if reservation is not None and arb not in self.reservations and arb not in self.settled:
            self._apply(reservation.arb_id, make_record(reservation.counters.items()), reservation.expires_ms,
                        now_ms, reservation.cooldowns.items(), reservation.orders.items())
        self.verdicts[signal_id] = stored
        self.verdict_times.add(signal_id, now_ms)
        return True

    def set_halt(self, payload: str) -> bool:
        had = self.halt is not None
        self.halt = payload
        self._bump()
        return had

    def clear_halt(self, *, guards: bool = False) -> bool:
        """Lift the kill switch; with ``guards`` also the circuit breaker and the drawdown (peak := now)."""
        had = self.halt is not None
        self.halt = None
        if guards:
            for name in ("breaker:until", "loss:streak", "alert:dd"):
                self.state.pop(name, None)
            self.state["pnl:peak"] = self.state.get("pnl:total", "0")
        self._bump()
        return had

    def dump(self, now_ms: int, *, verdicts: bool = True) -> StateDump:
        return StateDump(
            ts_ms=now_ms,
            halt=self.halt,
            state=dict(self.state),
            reservations=dict(self.reservations),
            expiry=self.expiry.dump(),
            verdicts=dict(self.verdicts) if verdicts else {},
            verdict_times=self.verdict_times.dump() if verdicts else {},
            settled=self.settled.dump(),
            cooldowns=dict(self.cooldowns),
            balances=dict(self.balances),
            orders={ex: z.dump() for ex, z in self.orders.items() if len(z)},
        )

    @classmethod
    def load(cls, dump: StateDump) -> MemoryRiskState:
        st = cls(halt=dump.halt, state=dict(dump.state), reservations=dict(dump.reservations),
                 verdicts=dict(dump.verdicts), cooldowns=dict(dump.cooldowns), balances=dict(dump.balances))
        st.state.setdefault("init", "memory")
        for zset, src in ((st.expiry, dump.expiry), (st.verdict_times, dump.verdict_times),
                          (st.settled, dump.settled)):
            for member, score in src.items():
                zset.add(member, score)
        for ex, members in dump.orders.items():
            for member, score in members.items():
                st._rate(ex).add(member, score)
        return st
