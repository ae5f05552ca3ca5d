"""The executor's reads and writes of the transfer ledger (migrations 0003 and 0005).

The rebalancer records plans and approvals; the executor records how each live step goes
(``transfer_steps.exec_state`` and the exchange's ids) and moves the transfer on: approved
-> sent -> completed, or -> failed. A transition is made under the transfer's row lock, only
from the state the state machine allows, with its ``transfer_events`` row in the same
transaction; that row is the outbox of the ``transfers`` stream, published by
``publish_events`` (or by the rebalancer's outbox round if this process died first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection

from shared.models import Transfer, TransferState, TransferStep, decoder_for, encode
from shared.runtime import FIELD, Bus
from shared.streams import TRANSFERS, policy

# What the executor may do to a transfer's state (the rest of the machine is the rebalancer's).
EXECUTOR_TRANSITIONS: dict[TransferState, frozenset[TransferState]] = {
    "approved": frozenset({"sent", "failed"}),
    "sent": frozenset({"completed", "failed"}),
}
IN_PROGRESS = ("sending", "unknown", "sent", "withdrawn")
_transfer_decoder = decoder_for(Transfer)


@dataclass(frozen=True, slots=True)
class StepRow:
    index: int
    step: TransferStep
    state: str
    """The rebalancer's coarse view: pending, sent, done, failed."""
    exec_state: str
    client_id: str
    exchange_ref: str
    txid: str
    requested: Decimal | None
    claimed_ns: int | None
    not_after_ns: int | None
    debited: Decimal | None
    credited: Decimal | None
    fee_charged: Decimal | None
    detail: str


@dataclass(frozen=True, slots=True)
class LiveTransfer:
    transfer_id: str
    state: TransferState
    asset: str
    expected_cost: Decimal
    expected_seconds: float
    reason: str
    updated_ns: int
    steps: tuple[StepRow, ...]

    def to_transfer(self, state: TransferState | None = None, reason: str | None = None,
                    ts_ns: int | None = None) -> Transfer:
        return Transfer(transfer_id=self.transfer_id, asset=self.asset, steps=[s.step for s in self.steps],
                        state=state or self.state, expected_cost=float(self.expected_cost),
                        expected_seconds=self.expected_seconds,
                        ts_ns=self.updated_ns if ts_ns is None else ts_ns,
                        reason=self.reason if reason is None else reason, mode="live")


def lock_key(session: str, transfer_id: str) -> int:
    digest = hashlib.blake2b(f"executor-transfer:{session}:{transfer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def try_lock(conn: AsyncConnection, key: int) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def unlock(conn: AsyncConnection, key: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


_STEP_COLUMNS = """step_index, kind, from_exchange, to_exchange, from_asset, to_asset, network, network_label,
    address, memo, amount, fee, amount_out, expected_seconds, state, exec_state, client_id, exchange_ref, txid,
    requested, claimed_ns, not_after_ns, debited, credited, fee_charged, detail"""


def _step(r: tuple[Any, ...]) -> StepRow:
    step = TransferStep(kind=r[1], from_exchange=r[2], to_exchange=r[3], from_asset=r[4], to_asset=r[5],
                        network=r[6], network_label=r[7], address=r[8], memo=r[9], amount=r[10], fee=r[11],
                        amount_out=r[12], expected_seconds=r[13])
    return StepRow(index=r[0], step=step, state=r[14], exec_state=r[15], client_id=r[16], exchange_ref=r[17],
                   txid=r[18], requested=r[19], claimed_ns=r[20], not_after_ns=r[21], debited=r[22],
                   credited=r[23], fee_charged=r[24], detail=r[25])


async def load(conn: AsyncConnection, session: str, transfer_id: str) -> LiveTransfer | None:
    """A live transfer of this session with its steps; None when the ledger has no such transfer."""
    cur = await conn.execute(
        """SELECT transfer_id, state, asset, expected_cost, expected_seconds, reason, updated_ns FROM transfers
           WHERE transfer_id = %s AND session = %s AND mode = 'live'""", (transfer_id, session))
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(f"SELECT {_STEP_COLUMNS} FROM transfer_steps WHERE transfer_id = %s "
                             "ORDER BY step_index", (transfer_id,))
    steps = tuple(_step(r) for r in await cur.fetchall())
    return LiveTransfer(transfer_id=row[0], state=row[1], asset=row[2], expected_cost=row[3],
                        expected_seconds=row[4], reason=row[5], updated_ns=row[6], steps=steps)


async def lock_state(conn: AsyncConnection, transfer_id: str) -> TransferState | None:
    """The transfer's state, its row locked until the transaction ends (call inside one)."""
    cur = await conn.execute("SELECT state FROM transfers WHERE transfer_id = %s FOR UPDATE", (transfer_id,))
    row = await cur.fetchone()
    return None if row is None else row[0]


async def transition(conn: AsyncConnection, record: LiveTransfer, new_state: TransferState, *, reason: str,
                     now_ns: int) -> bool:
    """Move the transfer to ``new_state`` if it is still in a state that allows it; the event
    row goes in the same transaction. False when the state had moved on (nothing written)."""
    async with conn.transaction():
        current = await lock_state(conn, record.transfer_id)
        if current is None or new_state not in EXECUTOR_TRANSITIONS.get(current, frozenset()):
            return False
        await conn.execute("UPDATE transfers SET state = %s, reason = %s, updated_ns = %s WHERE transfer_id = %s",
                           (new_state, reason, now_ns, record.transfer_id))
        payload = encode(record.to_transfer(new_state, reason, now_ns)).decode()
        await conn.execute(
            """INSERT INTO transfer_events (transfer_id, state, reason, actor, ts_ns, payload)
               VALUES (%s, %s, %s, 'executor', %s, %s::jsonb)""",
            (record.transfer_id, new_state, reason, now_ns, payload))
    return True


async def claim_step(conn: AsyncConnection, transfer_id: str, index: int, *, client_id: str, requested: Decimal,
                     claimed_ns: int, not_after_ns: int) -> bool:
    """Record that a step is about to be sent (before it is); False if it was already claimed."""
    cur = await conn.execute(
        """UPDATE transfer_steps SET exec_state = 'sending', client_id = %s, requested = %s, claimed_ns = %s,
                  not_after_ns = %s
           WHERE transfer_id = %s AND step_index = %s AND exec_state = ''""",
        (client_id, requested, claimed_ns, not_after_ns, transfer_id, index))
    return cur.rowcount == 1


_SETTABLE = {"state", "exchange_ref", "txid", "debited", "credited", "fee_charged", "sent_ns", "done_ns", "detail"}


async def set_step(conn: AsyncConnection, transfer_id: str, index: int, *, from_states: Iterable[str],
                   exec_state: str, **values: Any) -> bool:
    """Move a step's ``exec_state`` on (with the given columns); False if it was not in ``from_states``."""
    unknown = set(values) - _SETTABLE
    if unknown:
        raise ValueError(f"unknown step columns: {sorted(unknown)}")
    sets = "".join(f", {name} = %s" for name in values)
    cur = await conn.execute(
        f"""UPDATE transfer_steps SET exec_state = %s{sets}
            WHERE transfer_id = %s AND step_index = %s AND exec_state = ANY(%s)""",
        (exec_state, *values.values(), transfer_id, index, list(from_states)))
    return cur.rowcount == 1


async def withdrawal_refs(conn: AsyncConnection, exchange: str) -> frozenset[str]:
    """Ids of the exchange's withdrawals already owned by some step."""
    cur = await conn.execute(
        "SELECT exchange_ref FROM transfer_steps WHERE from_exchange = %s AND kind = 'withdrawal' "
        "AND exchange_ref <> ''", (exchange,))
    return frozenset(r[0] for r in await cur.fetchall())


async def in_progress(conn: AsyncConnection, session: str) -> list[str]:
    """Live transfers of the session the executor has started and not finished."""
    cur = await conn.execute(
        """SELECT t.transfer_id FROM transfers t
           WHERE t.session = %s AND t.mode = 'live' AND (t.state = 'sent' OR (t.state = 'approved' AND EXISTS (
                 SELECT 1 FROM transfer_steps s WHERE s.transfer_id = t.transfer_id AND s.exec_state <> '')))
           ORDER BY t.created_ns, t.transfer_id""", (session,))
    return [r[0] for r in await cur.fetchall()]


async def publish_events(conn: AsyncConnection, bus: Bus, transfer_id: str) -> list[Transfer]:
    """Publish the executor's unpublished changes of the transfer in order, marked only once Redis
    has them (the rebalancer's outbox publishes its own, and any the executor left behind)."""
    async with conn.transaction():
        cur = await conn.execute(
            """SELECT id, payload::text FROM transfer_events
               WHERE transfer_id = %s AND actor = 'executor' AND published_at IS NULL
               ORDER BY id FOR UPDATE SKIP LOCKED""", (transfer_id,))
        rows = await cur.fetchall()
        if not rows:
            return []
        maxlen = policy(TRANSFERS).maxlen
        pipe = bus.redis.pipeline(transaction=False)
        for _, payload in rows:
            pipe.xadd(bus.stream(TRANSFERS), {FIELD: payload.encode()}, maxlen=maxlen,
                      approximate=maxlen is not None)
        await pipe.execute()
        await conn.execute("UPDATE transfer_events SET published_at = now() WHERE id = ANY(%s)",
                           ([r[0] for r in rows],))
    return [_transfer_decoder.decode(payload) for _, payload in rows]
