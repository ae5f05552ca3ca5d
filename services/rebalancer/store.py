"""Transfers in PostgreSQL: every plan, its steps, and every state change.

The ``transfers`` row holds the current state; each change is checked against the state
machine under a row lock and appended to ``transfer_events``, which doubles as the outbox
of the ``transfers`` stream: an event is published after its transaction committed and
marked published only once Redis has it (at least once; consumers key on transfer_id and
state). Paper step execution changes steps, balances and state in one transaction
(``services.rebalancer.paper``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, cast

import msgspec
from psycopg import AsyncConnection

from services.rebalancer import metrics
from services.rebalancer.planner import Node, TransferPlan
from services.rebalancer.transfers import (
    FINAL_STATES,
    OPEN_STATES,
    Mode,
    StepState,
    check_transition,
    remaining_effects,
)
from shared.models import Transfer, TransferState, TransferStep, encode
from shared.runtime import FIELD, Bus
from shared.streams import TRANSFERS, policy


class TransferNotFound(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class StepRecord:
    index: int
    step: TransferStep
    state: StepState
    debited: Decimal | None = None
    credited: Decimal | None = None
    fee_charged: Decimal | None = None
    sent_ns: int | None = None
    due_ns: int | None = None
    done_ns: int | None = None


@dataclass(frozen=True, slots=True)
class TransferRecord:
    transfer_id: str
    mode: Mode
    state: TransferState
    asset: str
    to_exchange: str
    amount: Decimal
    from_exchange: str
    from_asset: str
    from_amount: Decimal
    expected_cost: Decimal
    cost_currency: str
    expected_seconds: float
    reason: str
    approved_by: str
    created_ns: int
    updated_ns: int
    steps: tuple[StepRecord, ...]

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def to_transfer(self, ts_ns: int | None = None) -> Transfer:
        return Transfer(
            transfer_id=self.transfer_id,
            asset=self.asset,
            steps=[s.step for s in self.steps],
            state=self.state,
            expected_cost=float(self.expected_cost),
            expected_seconds=self.expected_seconds,
            ts_ns=self.updated_ns if ts_ns is None else ts_ns,
            reason=self.reason,
            mode=self.mode,
        )

    def remaining_effects(self) -> dict[Node, Decimal]:
        """Balance changes this transfer will still make (nothing once final)."""
        if not self.is_open:
            return {}
        states: list[StepState] = [s.state for s in self.steps]
        if self.mode == "live" and self.state == "sent":
            # Live progress is reported per transfer: the source was debited, nothing credited.
            states = ["sent"] * len(states)
        return remaining_effects([s.step for s in self.steps], states)


_TRANSFER_COLUMNS = """transfer_id, mode, state, asset, to_exchange, amount, from_exchange, from_asset, from_amount,
    expected_cost, cost_currency, expected_seconds, reason, approved_by, created_ns, updated_ns"""
_STEP_COLUMNS = """transfer_id, step_index, kind, from_exchange, to_exchange, from_asset, to_asset, network,
    network_label, address, memo, amount, fee, amount_out, expected_seconds, state, debited, credited,
    fee_charged, sent_ns, due_ns, done_ns"""


class TransferStore:
    """Transfers of one session and mode. Every method takes the connection to run on, so
    callers can put several of them (and ledger moves) in one transaction."""

    def __init__(self, session: str, mode: Mode, cost_currency: str) -> None:
        self.session = session
        self.mode = mode
        self.cost_currency = cost_currency

    # ------------------------------------------------------------------ writes

    async def record_plan(
        self,
        conn: AsyncConnection,
        plan: TransferPlan,
        state: TransferState,
        reason: str,
        now_ns: int,
        actor: str = "rebalancer",
    ) -> TransferRecord | None:
        """Store a new plan as ``planned`` and move it to ``state``; None if it already exists."""
        steps = plan.steps()
        source = plan.route.source
        async with conn.transaction():
            cur = await conn.execute(
                f"""INSERT INTO transfers ({_TRANSFER_COLUMNS}, session)
                    VALUES (%s, %s, 'planned', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, '', %s, %s, %s)
                    ON CONFLICT (transfer_id) DO NOTHING""",
                (plan.transfer_id, self.mode, plan.asset, plan.destination.exchange, plan.amount,
                 source.exchange, source.asset, plan.route.need, plan.expected_cost, self.cost_currency,
                 plan.expected_seconds, plan.reason, now_ns, now_ns, self.session),
            )
            if cur.rowcount != 1:
                return None
            async with conn.cursor() as c:
                await c.executemany(
                    """INSERT INTO transfer_steps (transfer_id, step_index, kind, from_exchange, to_exchange,
                           from_asset, to_asset, network, network_label, address, memo, amount, fee, amount_out,
                           expected_seconds)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                    [(plan.transfer_id, i, s.kind, s.from_exchange, s.to_exchange, s.from_asset, s.to_asset,
                      s.network, s.network_label, s.address, s.memo, s.amount, s.fee, s.amount_out,
                      s.expected_seconds) for i, s in enumerate(steps)],
                )
            record = await self.get(conn, plan.transfer_id)
            assert record is not None
            await self._event(conn, record, plan.reason, actor, now_ns)
            if state != "planned":
                record = await self.transition(conn, plan.transfer_id, state, reason=reason, actor=actor,
                                               now_ns=now_ns)
        return record

    async def transition(
        self,
        conn: AsyncConnection,
        transfer_id: str,
        new_state: TransferState,
        *,
        reason: str,
        actor: str,
        now_ns: int,
    ) -> TransferRecord:
        """Move a transfer to ``new_state`` if the state machine allows it (row-locked)."""
        async with conn.transaction():
            record = await self.get(conn, transfer_id, lock=True)
            if record is None:
                raise TransferNotFound(f"no transfer {transfer_id} in session {self.session} ({self.mode})")
            check_transition(transfer_id, record.state, new_state)
            approved_by = actor if new_state == "approved" else record.approved_by
            await conn.execute(
                """UPDATE transfers SET state = %s, reason = %s, approved_by = %s, updated_ns = %s
                   WHERE transfer_id = %s""",
                (new_state, reason, approved_by, now_ns, transfer_id),
            )
            record = replace(record, state=new_state, reason=reason, approved_by=approved_by, updated_ns=now_ns)
            await self._event(conn, record, reason, actor, now_ns)
        return record

    async def update_step(
        self,
        conn: AsyncConnection,
        transfer_id: str,
        index: int,
        *,
        from_state: StepState,
        to_state: StepState,
        **values: Any,
    ) -> bool:
        """Move one step from ``from_state`` to ``to_state`` with its actual amounts and times;
        False if it was not in ``from_state`` (already applied: do nothing)."""
        allowed = {"amount", "fee", "debited", "credited", "fee_charged", "sent_ns", "due_ns", "done_ns"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown step columns: {sorted(unknown)}")
        sets = "".join(f", {name} = %s" for name in values)
        cur = await conn.execute(
            f"""UPDATE transfer_steps SET state = %s{sets}
                WHERE transfer_id = %s AND step_index = %s AND state = %s""",
            (to_state, *values.values(), transfer_id, index, from_state),
        )
        return cur.rowcount == 1

    async def _event(self, conn: AsyncConnection, record: TransferRecord, reason: str, actor: str,
                     now_ns: int) -> None:
        payload = encode(record.to_transfer(now_ns)).decode()
        await conn.execute(
            """INSERT INTO transfer_events (transfer_id, state, reason, actor, ts_ns, payload)
               VALUES (%s, %s, %s, %s, %s, %s::jsonb)""",
            (record.transfer_id, record.state, reason, actor, now_ns, payload),
        )

    # ------------------------------------------------------------------ reads

    async def get(self, conn: AsyncConnection, transfer_id: str, *, lock: bool = False) -> TransferRecord | None:
        found = await self._select(
            conn, "transfer_id = %s AND session = %s AND mode = %s" + (" FOR UPDATE" if lock else ""),
            (transfer_id, self.session, self.mode),
        )
        return found[0] if found else None

    async def list_transfers(self, conn: AsyncConnection, states: Iterable[TransferState] | None = None,
                   limit: int = 100) -> list[TransferRecord]:
        wanted = list(states) if states else [*OPEN_STATES, *FINAL_STATES]
        return await self._select(
            conn, "session = %s AND mode = %s AND state = ANY(%s) ORDER BY created_ns DESC, transfer_id LIMIT %s",
            (self.session, self.mode, wanted, limit),
        )

    async def open_transfers(self, conn: AsyncConnection) -> list[TransferRecord]:
        return await self._select(
            conn, "session = %s AND mode = %s AND state = ANY(%s) ORDER BY created_ns, transfer_id",
            (self.session, self.mode, list(OPEN_STATES)),
        )

    async def completed_since(self, conn: AsyncConnection, since_ns: int) -> list[TransferRecord]:
        return await self._select(
            conn, "session = %s AND mode = %s AND state = 'completed' AND updated_ns >= %s ORDER BY updated_ns",
            (self.session, self.mode, since_ns),
        )

    async def _select(self, conn: AsyncConnection, where: str, params: Sequence[Any]) -> list[TransferRecord]:
        async with conn.cursor() as cur:
            await cur.execute(f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE {where}", params)
            rows = await cur.fetchall()
            if not rows:
                return []
            ids = [r[0] for r in rows]
            await cur.execute(
                f"SELECT {_STEP_COLUMNS} FROM transfer_steps WHERE transfer_id = ANY(%s) "
                "ORDER BY transfer_id, step_index",
                (ids,),
            )
            steps: dict[str, list[StepRecord]] = {}
            for s in await cur.fetchall():
                steps.setdefault(s[0], []).append(
                    StepRecord(
                        index=s[1],
                        step=TransferStep(
                            kind=s[2], from_exchange=s[3], to_exchange=s[4], from_asset=s[5], to_asset=s[6],
                            network=s[7], network_label=s[8], address=s[9], memo=s[10], amount=s[11], fee=s[12],
                            amount_out=s[13], expected_seconds=s[14],
                        ),
                        state=s[15], debited=s[16], credited=s[17], fee_charged=s[18], sent_ns=s[19],
                        due_ns=s[20], done_ns=s[21],
                    )
                )
        return [
            TransferRecord(
                transfer_id=r[0], mode=r[1], state=r[2], asset=r[3], to_exchange=r[4], amount=r[5],
                from_exchange=r[6], from_asset=r[7], from_amount=r[8], expected_cost=r[9], cost_currency=r[10],
                expected_seconds=r[11], reason=r[12], approved_by=r[13], created_ns=r[14], updated_ns=r[15],
                steps=tuple(steps.get(r[0], [])),
            )
            for r in rows
        ]

    async def events(self, conn: AsyncConnection, transfer_id: str) -> list[tuple[str, str, str, int]]:
        """(state, reason, actor, ts_ns) of every change of one transfer, oldest first."""
        cur = await conn.execute(
            "SELECT state, reason, actor, ts_ns FROM transfer_events WHERE transfer_id = %s ORDER BY id",
            (transfer_id,),
        )
        return cast(list[tuple[str, str, str, int]], await cur.fetchall())

    # ------------------------------------------------------------------ outbox

    async def publish_pending(self, conn: AsyncConnection, bus: Bus, limit: int = 500) -> int:
        """Publish unpublished state changes in order; they are marked only once Redis has them.

        XADDs go straight to Redis (not through a buffering producer), so a failed attempt
        leaves nothing queued behind and the next attempt sends each event once more."""
        async with conn.transaction():
            cur = await conn.execute(
                """SELECT e.id, e.payload::text FROM transfer_events e JOIN transfers t USING (transfer_id)
                   WHERE e.published_at IS NULL AND t.session = %s AND t.mode = %s
                   ORDER BY e.id LIMIT %s FOR UPDATE OF e SKIP LOCKED""",
                (self.session, self.mode, limit),
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
            maxlen = policy(TRANSFERS).maxlen
            pipe = bus.redis.pipeline(transaction=False)
            for _, payload in rows:
                pipe.xadd(bus.stream(TRANSFERS), {FIELD: payload.encode()}, maxlen=maxlen,
                          approximate=maxlen is not None)
            await pipe.execute()
            await conn.execute("UPDATE transfer_events SET published_at = now() WHERE id = ANY(%s)",
                               ([r[0] for r in rows],))
        for _, payload in rows:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                event = msgspec.json.decode(payload, type=Transfer)
                metrics.TRANSFERS.labels(event.asset, event.state).inc()
        return len(rows)
