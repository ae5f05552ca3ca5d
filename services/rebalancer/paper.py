"""Paper execution of approved transfers, through the PostgreSQL ledger.

Each step moves paper balances only inside the transaction that records the step's new
state, and only if the step was still in the state the action expects, so a crash or a
second replica never applies a step twice:

- conversion: at the latest book, walking depth with the taker fee; debit the input,
  credit the output, at once;
- withdrawal: debit ``amount + fee`` at the source when sent; credit ``amount`` at the
  destination once the network's time has passed;
- the transfer is ``sent`` after its first step and ``completed`` after its last.

A step after the first uses what the previous one actually delivered when that is less
than planned (the book moved): a withdrawal then sends what is there, net of its fee.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from psycopg import AsyncConnection

from services.rebalancer.market import ConversionMarket, step_of
from services.rebalancer.networks import NetworkTableError, TransferNetworkTable
from services.rebalancer.planner import Node
from services.rebalancer.store import StepRecord, TransferRecord, TransferStore
from shared.config import RebalancerSettings
from shared.ledger import InsufficientBalance, adjust_balance
from shared.models import Balance
from shared.money import round_to_step

log = logging.getLogger(__name__)

ZERO = Decimal(0)
NS = 1_000_000_000
BOOK_WAIT_NS = 300 * NS
"""A conversion waits this long for a usable book before its transfer fails."""


@dataclass(frozen=True, slots=True)
class PaperAction:
    kind: Literal["execute", "credit", "complete"]
    index: int = -1


def next_action(record: TransferRecord, now_ns: int) -> PaperAction | None:
    """What to do next for an approved or sent transfer at ``now_ns``; None: wait."""
    if record.state not in ("approved", "sent"):
        return None
    for s in record.steps:
        if s.state == "done":
            continue
        if s.state == "sent":
            return PaperAction("credit", s.index) if s.due_ns is not None and s.due_ns <= now_ns else None
        if s.state == "pending":
            return PaperAction("execute", s.index)
        return None  # a failed step: the transfer is being failed
    return PaperAction("complete") if record.state == "sent" else None


def fit_withdrawal(available: Decimal, fee_fixed: Decimal, fee_rate: Decimal, step: Decimal) -> tuple[
    Decimal, Decimal
]:
    """The largest (amount, fee) on ``step`` with ``amount + fee <= available``."""
    amount = round_to_step((available - fee_fixed) / (1 + fee_rate), step, up=False)
    while amount > 0:
        fee = round_to_step(fee_fixed + fee_rate * amount, step, up=True)
        if amount + fee <= available:
            return amount, fee
        amount -= step
    return ZERO, ZERO


class _Wait(Exception):
    pass


class _Fail(Exception):
    pass


class PaperTransferRunner:
    def __init__(
        self,
        store: TransferStore,
        settings: RebalancerSettings,
        networks: Callable[[], TransferNetworkTable],
        session: str,
    ) -> None:
        self.store = store
        self.settings = settings
        self.networks = networks
        self.session = session

    async def advance(
        self,
        conn: AsyncConnection,
        now_ns: int,
        markets: Mapping[tuple[str, str], ConversionMarket],
    ) -> list[Balance]:
        """Run every step that is due; returns the balances it changed (to publish)."""
        changed: dict[Node, tuple[Decimal, Decimal]] = {}
        candidates = [r.transfer_id for r in await self.store.open_transfers(conn) if r.state in ("approved", "sent")]
        for transfer_id in candidates:
            async with conn.transaction():
                locked = await conn.execute(
                    "SELECT 1 FROM transfers WHERE transfer_id = %s FOR UPDATE SKIP LOCKED", (transfer_id,)
                )
                if await locked.fetchone() is None:  # another replica is on it
                    continue
                moved: dict[Node, tuple[Decimal, Decimal]] = {}
                await self._advance_one(conn, transfer_id, now_ns, markets, moved)
            changed.update(moved)  # only once committed
        return [
            Balance(exchange=n.exchange, asset=n.asset, free=free, locked=locked_amount, mode="paper", ts_ns=now_ns)
            for n, (free, locked_amount) in sorted(changed.items())
        ]

    async def _advance_one(
        self,
        conn: AsyncConnection,
        transfer_id: str,
        now_ns: int,
        markets: Mapping[tuple[str, str], ConversionMarket],
        moved: dict[Node, tuple[Decimal, Decimal]],
    ) -> None:
        while True:
            record = await self.store.get(conn, transfer_id)
            if record is None:
                return
            action = next_action(record, now_ns)
            if action is None:
                return
            if action.kind == "complete":
                await self.store.transition(conn, transfer_id, "completed", reason="all steps done",
                                            actor="paper", now_ns=now_ns)
                return
            step = record.steps[action.index]
            try:
                async with conn.transaction():  # a failing step leaves no partial move behind
                    if action.kind == "credit":
                        await self._credit(conn, record, step, now_ns, moved)
                    else:
                        await self._execute(conn, record, step, now_ns, markets, moved)
            except _Wait as wait:
                waited_since = record.steps[action.index - 1].done_ns if action.index else record.updated_ns
                if now_ns - (waited_since or now_ns) < BOOK_WAIT_NS:
                    log.info("transfer step waiting", extra={"transfer_id": transfer_id, "why": str(wait)})
                    return
                await self._fail(conn, record, f"step {action.index}: {wait}", now_ns)
                return
            except _Fail as fail:
                await self._fail(conn, record, f"step {action.index}: {fail}", now_ns)
                return

    async def _fail(self, conn: AsyncConnection, record: TransferRecord, reason: str, now_ns: int) -> None:
        log.warning("paper transfer failed", extra={"transfer_id": record.transfer_id, "reason": reason})
        await self.store.transition(conn, record.transfer_id, "failed", reason=reason, actor="paper", now_ns=now_ns)

    async def _adjust(self, conn: AsyncConnection, node: Node, delta: Decimal,
                      moved: dict[Node, tuple[Decimal, Decimal]]) -> None:
        try:
            moved[node] = await adjust_balance(conn, session=self.session, mode="paper", exchange=node.exchange,
                                               asset=node.asset, delta_free=delta)
        except InsufficientBalance as exc:
            raise _Fail(str(exc)) from None

    async def _execute(
        self,
        conn: AsyncConnection,
        record: TransferRecord,
        s: StepRecord,
        now_ns: int,
        markets: Mapping[tuple[str, str], ConversionMarket],
        moved: dict[Node, tuple[Decimal, Decimal]],
    ) -> None:
        step = s.step
        delivered = record.steps[s.index - 1].credited if s.index else None
        source, target = Node(step.from_exchange, step.from_asset), Node(step.to_exchange, step.to_asset)
        if step.kind == "conversion":
            amount_in = step.amount if delivered is None else min(step.amount, delivered)
            market = markets.get((step.from_exchange, step.network))
            done = market.convert(step.from_asset, amount_in) if market is not None else None
            if done is None:
                raise _Wait(f"no usable {step.network} book on {step.from_exchange} for {amount_in} {step.from_asset}")
            await self._adjust(conn, source, -amount_in, moved)
            await self._adjust(conn, target, done.amount_out, moved)
            applied = await self.store.update_step(
                conn, record.transfer_id, s.index, from_state="pending", to_state="done", debited=amount_in,
                credited=done.amount_out, fee_charged=done.fee, sent_ns=now_ns, done_ns=now_ns,
            )
        else:
            amount, fee = step.amount, step.fee
            if delivered is not None and amount + fee > delivered:
                amount, fee = self._refit(step.from_exchange, step.from_asset, step.network, delivered)
            due_ns = now_ns + int(step.expected_seconds * NS)
            await self._adjust(conn, source, -(amount + fee), moved)
            applied = await self.store.update_step(
                conn, record.transfer_id, s.index, from_state="pending", to_state="sent", amount=amount, fee=fee,
                debited=amount + fee, fee_charged=fee, sent_ns=now_ns, due_ns=due_ns,
            )
        if not applied:
            raise RuntimeError(f"transfer {record.transfer_id} step {s.index} changed under its row lock")
        if record.state == "approved":
            await self.store.transition(conn, record.transfer_id, "sent", reason=f"step 0 {step.kind} sent",
                                        actor="paper", now_ns=now_ns)

    def _refit(self, exchange: str, asset: str, network: str, available: Decimal) -> tuple[Decimal, Decimal]:
        try:
            row = self.networks().get(exchange, asset, network)
        except NetworkTableError as exc:
            raise _Fail(str(exc)) from None
        amount, fee = fit_withdrawal(available, row.withdraw_fee, row.withdraw_fee_rate,
                                     step_of(self.settings.amount_steps, asset))
        if amount <= 0 or amount < row.withdraw_min:
            raise _Fail(f"only {available} {asset} arrived: below the {network} minimum after its fee")
        return amount, fee

    async def _credit(self, conn: AsyncConnection, record: TransferRecord, s: StepRecord, now_ns: int,
                      moved: dict[Node, tuple[Decimal, Decimal]]) -> None:
        step = s.step  # amount as actually sent (update_step stored it)
        await self._adjust(conn, Node(step.to_exchange, step.to_asset), step.amount, moved)
        if not await self.store.update_step(conn, record.transfer_id, s.index, from_state="sent", to_state="done",
                                            credited=step.amount, done_ns=now_ns):
            raise RuntimeError(f"transfer {record.transfer_id} step {s.index} changed under its row lock")
