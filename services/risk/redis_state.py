"""``RedisRiskState``: the shared risk state in Redis, each step one atomic Lua script.

The async twin of ``state.MemoryRiskState`` (same steps, same outcomes), shared by every
risk replica. All keys carry one hash tag (``KeySpace.tagged(Domain.GUARD, ...)``, the
kill switch's), so every script may touch all of them, on Redis Cluster too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from services.risk import lua
from services.risk.reasons import APPROVED
from services.risk.state import (
    SEP,
    DecideOutcome,
    DecideRequest,
    SettleOutcome,
    SettleRequest,
    StateDump,
    StateNotReady,
    make_record,
)
from services.risk.summary import Overview
from shared.config import EXCHANGES
from shared.models import RiskReservation
from shared.runtime import Bus, is_redis_down
from shared.streams import ANY, Domain, KeySpace


@dataclass(frozen=True, slots=True)
class RiskKeys:
    """Every risk key, all under the kill switch's hash tag."""

    halt: str
    state: str
    reservations: str
    expiry: str
    verdicts: str
    verdict_times: str
    settled: str
    cooldowns: str
    balances: str
    restore_lock: str
    reload: str
    alert_prefix: str
    _space: KeySpace

    @classmethod
    def of(cls, space: KeySpace) -> RiskKeys:
        def k(name: str) -> str:
            return space.tagged(Domain.GUARD, ANY, name)

        return cls(
            halt=space.kill_switch(), state=k("state"), reservations=k("reservations"), expiry=k("expiry"),
            verdicts=k("verdicts"), verdict_times=k("verdict_times"), settled=k("settled"),
            cooldowns=k("cooldowns"), balances=k("balances"), restore_lock=k("restore"), reload=k("reload"),
            alert_prefix=k("alert"), _space=space,
        )

    def orders(self, exchange: str) -> str:
        return self._space.tagged(Domain.GUARD, exchange, "orders")

    def all(self) -> list[str]:
        """The keys of the state proper (what ``dump``/``restore`` cover), in script order."""
        return [self.halt, self.state, self.reservations, self.expiry, self.verdicts, self.verdict_times,
                self.settled, self.cooldowns, self.balances, *(self.orders(ex) for ex in EXCHANGES)]


@dataclass(frozen=True, slots=True)
class PublishTargets:
    """Where the deciding step publishes an approval and acknowledges its signal (Redis keys)."""

    signals: str
    group: str
    orders: str
    decisions: str
    decisions_maxlen: int | None
    """``MAXLEN ~`` of the decisions stream (its ``StreamPolicy``)."""


class Publication(NamedTuple):
    """One signal's approval, encoded before the state decides: published by the state if it approves."""

    entry_id: bytes
    intent: bytes
    decision: bytes


_FIXED_KEYS = 9
"""KEYS of DECIDE before the order-rate keys."""
_MAX_LAYOUTS = 4096


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Line:
    """A connection of its own for deciding: never queued behind another task's command, no pool
    bookkeeping per call; commands are sent as prepared RESP frames and their replies read in order.

    A reply that is an error is returned in its place; a lost connection raises (and the next call
    connects again)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def call(self, frames: bytes, replies: int) -> list[Any]:
        async with self._lock:
            conn = self._conn
            if conn is None:  # held until ``close``; the pool still closes it with the bus
                conn = self._conn = await self._bus.redis.connection_pool.get_connection()
            await conn.send_packed_command(frames, check_health=False)  # connects first if needed
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return out

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._bus.redis.connection_pool.release(self._conn)
                self._conn = None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


def _scores(flat: Sequence[Any]) -> dict[str, int]:
    return {_s(flat[i]): int(float(_s(flat[i + 1]))) for i in range(0, len(flat), 2)}


class RedisRiskState:
    def __init__(self, bus: Bus, *, publish: PublishTargets | None = None) -> None:
        """With ``publish``, ``decide_many`` publishes the approvals it is given in the deciding step."""
        self.bus = bus
        self.keys = RiskKeys.of(bus.keys)
        self._line = _Line(bus)
        self._orders_keys: dict[str, bytes] = {}
        self._layouts: dict[object, tuple[str, bytes, int]] = {}
        k = self.keys
        self._fixed_keys = b"".join(_bulk(key.encode()) for key in (
            k.halt, k.state, k.reservations, k.expiry, k.verdicts, k.verdict_times, k.cooldowns, k.balances,
            k.settled))
        self._publish_bulks: tuple[bytes, tuple[bytes, bytes]] | None = None
        self.publish = publish
        r = bus.redis
        self._decide: AsyncScript = r.register_script(lua.DECIDE)
        self._settle: AsyncScript = r.register_script(lua.SETTLE)
        self._expire: AsyncScript = r.register_script(lua.EXPIRE)
        self._balance: AsyncScript = r.register_script(lua.BALANCE)
        self._apply: AsyncScript = r.register_script(lua.APPLY_DECISION)
        self._halt: AsyncScript = r.register_script(lua.HALT)
        self._dump: AsyncScript = r.register_script(lua.DUMP)
        self._restore: AsyncScript = r.register_script(lua.RESTORE)
        self._evalsha = _bulk(b"EVALSHA") + _bulk(self._decide.sha.encode())

    @property
    def publish(self) -> PublishTargets | None:
        return self._publish

    @publish.setter
    def publish(self, targets: PublishTargets | None) -> None:
        self._publish = targets
        self._publish_bulks = None if targets is None else (
            b"".join(_bulk(key.encode()) for key in (targets.signals, targets.orders, targets.decisions)),
            (_bulk(targets.group.encode()),
             _bulk(b"" if targets.decisions_maxlen is None else b"%d" % targets.decisions_maxlen)))

    async def close(self) -> None:
        """Give the deciding connection back to the bus's pool."""
        await self._line.close()

    # ------------------------------------------------------------------ decisions

    async def load_scripts(self) -> None:
        for script in (self._decide, self._settle, self._expire, self._balance, self._apply, self._halt, self._dump,
                       self._restore):
            await self.bus.redis.script_load(script.script)

    async def decide(self, req: DecideRequest) -> DecideOutcome:
        outcome = (await self.decide_many([req]))[0]
        if isinstance(outcome, ResponseError):
            raise outcome
        return outcome

    async def decide_many(self, requests: Sequence[DecideRequest],
                          publications: Sequence[Publication | None] | None = None,
                          ) -> list[DecideOutcome | ResponseError]:
        """Decide several signals in one round trip: each decision is still one atomic script, run in order.

        With ``publications`` (and ``publish`` targets), an approval is published and its signal
        acknowledged by the same script that reserves it (``DecideOutcome.published``); any other
        verdict is for the caller to publish. A script error is returned in place of that signal's
        outcome (the others stand); a lost state raises ``StateNotReady``, a lost connection raises.
        """
        if not requests:
            return []
        if publications is None or self.publish is None:
            publications = [None] * len(requests)
        replies: list[Any] = []
        for attempt in range(2):
            frames = b"".join(self._decide_frame(req, pub) for req, pub in zip(requests, publications, strict=True))
            replies = await self._line.call(frames, len(requests))
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                await self.load_scripts()  # Redis restarted and lost its script cache; deciding again is idempotent
                continue
            break
        return [self._decide_outcome(req, reply) for req, reply in zip(requests, replies, strict=True)]

    @staticmethod
    def _decide_outcome(req: DecideRequest, reply: Any) -> DecideOutcome | ResponseError:
        if isinstance(reply, ResponseError) and not is_redis_down(reply):
            return reply
        if isinstance(reply, Exception):
            raise reply
        status = _s(reply[0])
        if status == "noinit":
            raise StateNotReady("risk state not initialised in Redis")
        if status in ("held", "done"):
            return DecideOutcome(APPROVED, req.ts_ns, req.notional, req.intent_expires_ns, duplicate=True,
                                 finished=status == "done")
        return DecideOutcome.from_stored(_s(reply[1]), duplicate=status == "dup", published=status == "published")

    def _decide_frame(self, req: DecideRequest, pub: Publication | None) -> bytes:
        """One ``EVALSHA`` of DECIDE in the Redis protocol (RESP), built directly: the generic
        client's packing costs more than the script's own run."""
        layout = self._layouts.get(req.template) if req.template is not None else None
        if layout is None:
            layout = self._layout(req)
        fmt, rate_keys, nkeys = layout
        packed = fmt % (req.now_ms, req.signal_id, req.arb_id, req.ts_ns, req.notional, req.intent_expires_ns,
                        req.expires_ms, req.day, req.record, *[c.until_ms for c in req.cooldowns],
                        *[c.units for c in req.claims], *[b.units for b in req.balances])
        packed_bulk = _bulk(packed.encode())
        if pub is None or self._publish_bulks is None:
            return b"".join((b"*%d\r\n" % (3 + nkeys + 1), self._evalsha, _bulk(b"%d" % nkeys), self._fixed_keys,
                             rate_keys, packed_bulk))
        streams, (group, maxlen) = self._publish_bulks
        nkeys += 3
        return b"".join((b"*%d\r\n" % (3 + nkeys + 6), self._evalsha, _bulk(b"%d" % nkeys), self._fixed_keys,
                         rate_keys, streams, packed_bulk, _bulk(pub.entry_id), group, _bulk(pub.intent),
                         _bulk(pub.decision), maxlen))

    def _layout(self, req: DecideRequest) -> tuple[str, bytes, int]:
        """The DECIDE argument of ``req`` as a %-format of its per-signal values (in the order
        ``_decide_frame`` passes them), with everything its template fixes written in; the
        order-rate keys; the key count."""
        sep = SEP

        def lit(value: object) -> str:
            return str(value).replace("%", "%%")

        s = "%s"
        parts = [sep.join([s, s, s, s, s, s, s, lit(req.verdict_retention_ms), s, lit(req.daily_loss_limit),
                           lit(req.starting_equity), lit(repr(req.max_drawdown)),
                           "1" if req.require_balances else "0", s, lit(req.rate_window_ms),
                           str(len(req.cooldowns))])]
        parts += [f"{lit(c.field)}{sep}{s}{sep}{lit(c.reason)}" for c in req.cooldowns]
        parts.append(str(len(req.rates)))
        parts += [f"{lit(r.exchange)}{sep}{lit(r.orders)}{sep}{lit(r.limit)}" for r in req.rates]
        parts.append(str(len(req.claims)))
        parts += [f"{lit(c.field)}{sep}{s}{sep}{lit(c.cap)}{sep}{lit(c.reason)}" for c in req.claims]
        parts.append(str(len(req.balances)))
        parts += [f"{lit(b.exchange)}:{lit(b.asset)}{sep}{s}" for b in req.balances]
        layout = (sep.join(parts), b"".join([self._orders_bulk(r.exchange) for r in req.rates]),
                  _FIXED_KEYS + len(req.rates))
        if req.template is not None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[req.template] = layout
        return layout

    def _orders_bulk(self, exchange: str) -> bytes:
        cached = self._orders_keys.get(exchange)
        if cached is None:
            cached = self._orders_keys[exchange] = _bulk(self.keys.orders(exchange).encode())
        return cached

    async def settle(self, req: SettleRequest, *, force: bool = False) -> SettleOutcome:
        k = self.keys
        args: list[Any] = [
            req.arb_id, req.ts_ms, req.pnl, req.day, req.daily_loss_limit, req.starting_equity,
            repr(req.max_drawdown), req.breaker_losses, req.breaker_until_ms, req.halt_payload,
            req.settled_retention_ms, "1" if force else "0", len(req.cooldowns),
        ]
        for name, until in req.cooldowns:
            args += (name, until)
        reply: Any = await self._settle(
            keys=[k.halt, k.state, k.reservations, k.expiry, k.settled, k.cooldowns], args=args)
        status = _s(reply[0])
        if status == "noinit":
            raise StateNotReady("risk state not initialised in Redis")
        if status == "dup":
            return SettleOutcome(duplicate=True)
        return SettleOutcome(
            duplicate=False, released=int(reply[1]) == 1, daily_pnl=int(_s(reply[2])), total_pnl=int(_s(reply[3])),
            peak_pnl=int(_s(reply[4])), streak=int(_s(reply[5])), triggers=tuple(_s(t) for t in reply[6:]),
        )

    async def expire(self, now_ms: int, limit: int = 64) -> list[str]:
        k = self.keys
        reply: Any = await self._expire(keys=[k.halt, k.state, k.reservations, k.expiry], args=[now_ms, limit])
        return [_s(a) for a in reply]

    async def set_balance(self, exchange: str, asset: str, units: int, ts_ns: int) -> bool:
        k = self.keys
        reply: Any = await self._balance(keys=[k.halt, k.state, k.balances],
                                         args=[f"{exchange}:{asset}", units, max(0, ts_ns)])
        return int(reply) == 1

    async def apply_decision(self, signal_id: str, stored: str, now_ms: int,
                             reservation: RiskReservation | None) -> bool:
        k = self.keys
        keys = [k.halt, k.state, k.reservations, k.expiry, k.verdicts, k.verdict_times, k.cooldowns, k.settled]
        args: list[Any] = [signal_id, stored, now_ms]
        if reservation is None:
            args += ("", 0, "", 0)
        else:
            args += (reservation.arb_id, reservation.expires_ms, make_record(reservation.counters.items()),
                     len(reservation.cooldowns))
            for name, until in reservation.cooldowns.items():
                args += (name, until)
            for exchange, count in reservation.orders.items():
                keys.append(k.orders(exchange))
                args.append(count)
        reply: Any = await self._apply(keys=keys, args=args)
        return int(reply) == 1

    # ------------------------------------------------------------------ operator actions

    async def set_halt(self, payload: str) -> bool:
        """Set the kill switch; True if it was already set."""
        reply: Any = await self._halt(keys=[self.keys.halt, self.keys.state], args=[payload, "0"])
        return int(reply) == 1

    async def clear_halt(self, *, guards: bool = False) -> bool:
        reply: Any = await self._halt(keys=[self.keys.halt, self.keys.state], args=["", "1" if guards else "0"])
        return int(reply) == 1

    # ------------------------------------------------------------------ whole state

    async def initialised(self) -> bool:
        return bool(await self.bus.redis.hexists(self.keys.state, "init"))

    async def mark_initialised(self, marker: str) -> None:
        await self.bus.redis.hset(self.keys.state, "init", marker)

    async def version(self) -> int:
        value: Any = await self.bus.redis.hget(self.keys.state, "ver")
        return int(value or 0)

    async def overview(self) -> Overview:
        """The small parts of the state, in one round trip (for status and gauges)."""
        pipe = self.bus.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.state)
        pipe.get(self.keys.halt)
        pipe.hgetall(self.keys.cooldowns)
        pipe.hlen(self.keys.reservations)
        state, halt, cooldowns, reservations = await pipe.execute()
        return Overview({_s(k): _s(v) for k, v in state.items()}, _s(halt) if halt else None,
                        {_s(k): _s(v) for k, v in cooldowns.items()}, int(reservations))

    async def dump(self, *, verdicts: bool = True) -> StateDump:
        reply: Any = await self._dump(keys=self.keys.all(), args=["1" if verdicts else "0"])
        sec, usec, halt = int(reply[0]), int(reply[1]), _s(reply[2])
        state, reservations, stored, cooldowns, balances = (_pairs(x) for x in reply[3:8])
        expiry, verdict_times, settled = (_scores(x) for x in reply[8:11])
        orders = {ex: _scores(x) for ex, x in zip(EXCHANGES, reply[11:], strict=True) if x}
        return StateDump(
            ts_ms=sec * 1000 + usec // 1000, halt=halt or None, state=state, reservations=reservations,
            expiry=expiry, verdicts=stored, verdict_times=verdict_times, settled=settled,
            cooldowns=cooldowns, balances=balances, orders=orders,
        )

    async def restore(self, dump: StateDump) -> None:
        """Replace the state with ``dump`` (all but ``init``); a kill switch already set stays set."""
        payload = msgspec.json.encode({
            "halt": dump.halt or "",
            "state": dump.state,
            "reservations": dump.reservations,
            "expiry": {m: str(s) for m, s in dump.expiry.items()},
            "verdicts": dump.verdicts,
            "verdict_times": {m: str(s) for m, s in dump.verdict_times.items()},
            "settled": {m: str(s) for m, s in dump.settled.items()},
            "cooldowns": dump.cooldowns,
            "balances": dump.balances,
            "orders": {ex: {m: str(s) for m, s in z.items()} for ex, z in dump.orders.items()},
        })
        await self._restore(keys=self.keys.all(), args=[payload, *EXCHANGES])
