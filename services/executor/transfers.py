"""Carrying out live rebalancing transfers, exactly once.

The rebalancer plans, records and approves a transfer; the approved ``Transfer`` on
``transfers`` is the executor's cue. Only ``mode = "live"`` and ``state = "approved"``
messages are acted on, and only by an executor in live mode.

Before anything is sent, the transfer must be the one in the ledger (same steps), touch
only exchanges with live transfer support and API keys, and every withdrawal must go to
exactly the whitelisted address and memo of its destination (``rebalancer.addresses``),
checked again right before each withdrawal. Otherwise it fails with the reason, nothing sent.

Steps run in order, one replica at a time (a PostgreSQL advisory lock per transfer):

- a **conversion** is an IOC limit order of the step's amount of ``from_asset`` on the
  step's market, its limit ``executor.max_slippage_bps`` beyond the best price of a fresh
  book: a market order has no price bound, and the thin KRW books this mostly trades would
  let it run. It goes through the order path arbitrages use (order row first, send once,
  reconcile by client order id). What the fills delivered is what the next step gets;
  the rest of the budget stays where it was.
- a **withdrawal** sends ``amount`` (the fee on top; less when the previous step delivered
  less) to the step's address on the source's own network name. It is recorded with its
  client id and deadline before it is sent, and never sent again: an answer lost in a
  timeout is looked up on the exchange (Binance by ``withdrawOrderId``, Upbit by matching
  its withdrawal list), for ``executor.unknown_withdrawal_timeout_s`` at most. Then it is
  followed until the source reports it done and the destination reports the deposit
  credited (by txid), for ``executor.transfer_timeout_s`` at most.

The first step is sent under the transfer's row lock with the ledger still ``approved``, so
``arb transfers cancel`` either wins before it (nothing is sent) or waits and finds it
``sent``. The transfer becomes ``sent`` once the first step is done (or may have reached
the exchange), ``completed`` once the last is credited, ``failed`` with a reason saying
where the funds are. The balances of the venues a step touched are read from the
exchanges and published before each state change, so a consumer never sees a state
without the balances behind it. An approved message for a transfer already under way (a
redelivery, another replica's claim) only continues it: nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Literal, TypeAlias

import psycopg
from msgspec.structs import replace
from psycopg import AsyncConnection

from services.executor import ledger
from services.executor import metrics as m
from services.executor import transfer_ledger as tl
from services.executor.fees import quote_needed
from services.executor.fills import fill_deltas
from services.executor.markets import MarketData, PreparedOrder, best_prices, bounded_to_tick, prepare
from services.executor.venues.base import (
    ExchangeUnavailable,
    HttpVenue,
    OrderStateUnknown,
    VenueResult,
    WithdrawalRefused,
    WithdrawalRequest,
    WithdrawalState,
)
from shared.config import Config, RebalancerSettings
from shared.models import Alert, Balance, OrderLeg, Side, Transfer, TransferState, TransferStep, encode, split_symbol
from shared.money import round_to_step
from shared.runtime import FIELD, Bus, Retryable, is_redis_down
from shared.streams import ALERTS, BALANCES, TRANSFERS, policy

log = logging.getLogger(__name__)

ZERO = Decimal(0)
NS = 1_000_000_000
SUPPORTED_EXCHANGES = ("binance", "upbit")
DEFAULT_AMOUNT_STEP = Decimal("1e-8")
Severity: TypeAlias = Literal["warning", "critical"]


class TransferBusy(Retryable):
    """Another replica (or this one's watcher) is working on the transfer right now."""


def step_client_id(session: str, transfer_id: str, index: int, kind: str) -> str:
    """The step's client id: 31 letters and digits, the same on every replay."""
    digest = hashlib.blake2b(f"{session}:{transfer_id}:{index}:{kind}".encode(), digest_size=15).hexdigest()
    return ("w" if kind == "withdrawal" else "c") + digest


def whitelist_problem(index: int, step: TransferStep, settings: RebalancerSettings) -> str:
    """Why a withdrawal's destination is not exactly a whitelisted one ('' when it is)."""
    entry = settings.whitelisted_address(step.to_exchange, step.to_asset, step.network)
    where = f"step {index}: {step.to_asset} to {step.to_exchange} on {step.network or '(no network)'}"
    if entry is None:
        return f"{where}: no whitelisted address (rebalancer.addresses)"
    if entry.address != step.address:
        return f"{where}: address is not the whitelisted one"
    if entry.memo != step.memo:
        return f"{where}: memo is not the whitelisted one"
    return ""


def transfer_problem(msg: Transfer, recorded: list[TransferStep], settings: RebalancerSettings,
                     venues: Mapping[str, object]) -> str:
    """Why the transfer must not be carried out ('' when it may). Pure."""
    steps = msg.steps
    if not steps:
        return "it has no steps"
    if steps != recorded:
        return "its steps differ from the ledger's"
    for i, step in enumerate(steps):
        for exchange in (step.from_exchange, step.to_exchange):
            if exchange not in SUPPORTED_EXCHANGES:
                return f"no live transfer support for {exchange}"
            if exchange not in venues:
                return f"no API keys for {exchange}"
        if step.amount <= 0 or not step.amount.is_finite() or step.fee < 0:
            return f"step {i}: amount {step.amount} and fee {step.fee} are not a transfer"
        if i and (steps[i - 1].to_exchange, steps[i - 1].to_asset) != (step.from_exchange, step.from_asset):
            return f"step {i} does not start where step {i - 1} ends"
        if step.kind == "conversion":
            try:
                assets = set(split_symbol(step.network))
            except ValueError:
                return f"step {i}: conversion market {step.network!r} is not a BASE/QUOTE symbol"
            if step.from_exchange != step.to_exchange or assets != {step.from_asset, step.to_asset}:
                return f"step {i}: {step.from_asset} -> {step.to_asset} is not a conversion on {step.network}"
        else:
            if step.from_exchange == step.to_exchange or step.from_asset != step.to_asset:
                return f"step {i}: a withdrawal moves one asset between two exchanges"
            problem = whitelist_problem(i, step, settings)
            if problem:
                return problem
    return ""


class LiveTransferRunner:
    def __init__(self, cfg: Config, *, db: ledger.Database, market: MarketData, live: Mapping[str, HttpVenue],
                 bus: Bus, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.cfg = cfg
        self.settings = cfg.rebalancer
        self.db = db
        self.market = market
        self.live = live
        self.bus = bus
        self.clock_ns = clock_ns
        self.session = cfg.session
        self.live_mode = cfg.trading.mode == "live"
        ex = cfg.executor
        self.grace_ns = ex.unknown_order_grace_ms * 1_000_000
        self.margin_ns = ex.clock_margin_ms * 1_000_000
        self.poll_s = ex.fill_poll_interval_ms / 1000
        self.timeout_ns = ex.transfer_timeout_s * NS
        self.unknown_timeout_ns = ex.unknown_withdrawal_timeout_s * NS
        self.slippage = Decimal(repr(ex.max_slippage_bps)) / 10_000
        self.max_book_age_ns = ex.max_book_age_ms * 1_000_000
        # One transfer at a time per process: the stream's handler and the watcher share one
        # connection, and advisory locks do not exclude each other within a session.
        self._busy = asyncio.Lock()

    # ------------------------------------------------------------------ entry points

    async def handle(self, msg: Transfer) -> list[Transfer]:
        """An approved live transfer from the stream; returns the state changes published."""
        if msg.mode != "live" or msg.state != "approved":
            return []
        if not self.live_mode:
            log.warning("live transfer ignored: the executor is not in live mode",
                        extra={"transfer_id": msg.transfer_id})
            return []
        return await self._locked(msg.transfer_id, msg)

    async def watch(self) -> list[Transfer]:
        """Move on every live transfer under way (withdrawals in flight, answers to find)."""
        if not self.live_mode:
            return []
        async with self._busy, self.db.connection() as conn:
            ids = await tl.in_progress(conn, self.session)
        published = []
        for transfer_id in ids:
            try:
                published += await self._locked(transfer_id, None)
            except TransferBusy:
                continue  # someone is on it
            except Exception as exc:
                if isinstance(exc, Retryable) or is_redis_down(exc):
                    raise
                # one transfer's unexpected error must not stop the others being followed
                log.error("live transfer not advanced", exc_info=True, extra={"transfer_id": transfer_id})
        return published

    async def _locked(self, transfer_id: str, msg: Transfer | None) -> list[Transfer]:
        async with self._busy, self.db.connection() as conn:
            key = tl.lock_key(self.session, transfer_id)
            if not await tl.try_lock(conn, key):
                raise TransferBusy(f"transfer {transfer_id} is being carried out by another replica")
            try:
                await self._run(conn, transfer_id, msg)
                return await tl.publish_events(conn, self.bus, transfer_id)
            finally:
                if not conn.broken and not conn.closed:
                    with contextlib.suppress(psycopg.Error):  # a lost session releases its locks anyway
                        await tl.unlock(conn, key)

    async def _run(self, conn: AsyncConnection, transfer_id: str, msg: Transfer | None) -> None:
        record = await tl.load(conn, self.session, transfer_id)
        if record is None:
            if msg is not None:
                await self._refuse_unrecorded(msg)
            return
        if msg is not None and record.state != "approved" and not any(s.exec_state for s in record.steps):
            log.info("approved transfer not acted on", extra={"transfer_id": transfer_id, "ledger_state": record.state})
            return
        if msg is not None and record.state == "approved" and not any(s.exec_state for s in record.steps):
            problem = transfer_problem(msg, [s.step for s in record.steps], self.settings, self.live)
            if problem:
                await self._fail(conn, record, f"refused: {problem}; nothing sent", "warning")
                return
        await self._advance(conn, transfer_id)

    async def _advance(self, conn: AsyncConnection, transfer_id: str) -> None:
        while True:
            record = await tl.load(conn, self.session, transfer_id)
            if record is None or record.state not in ("approved", "sent"):
                return
            failed = next((s for s in record.steps if s.exec_state == "failed"), None)
            if failed is not None:  # a step failed before its transfer was marked (a crash in between)
                await self._fail(conn, record, f"step {failed.index} {failed.step.kind}: {failed.detail}", "warning")
                return
            row = next((s for s in record.steps if s.exec_state != "done"), None)
            if row is None:
                await self._complete(conn, record)
                return
            done = (await self._conversion(conn, record, row) if row.step.kind == "conversion"
                    else await self._withdrawal(conn, record, row))
            if not done:
                return

    # ------------------------------------------------------------------ conversions

    async def _conversion(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow) -> bool:
        step, i, exchange = row.step, row.index, row.step.from_exchange
        fresh = row.exec_state == ""
        venue = self.live.get(exchange)
        if venue is None:
            return await self._no_venue(conn, record, row, exchange)
        now = self.clock_ns()
        if fresh:
            order = await self._conversion_order(record, row)
            if isinstance(order, str):
                await self._step_failed(conn, record, row, order,
                                        f"step {i} conversion: {order}; not sent, {self._where(row)}")
                return False
            async with conn.transaction():
                if not self._may_start(await tl.lock_state(conn, record.transfer_id), i):
                    return False
                orow = await ledger.insert_order(conn, session=self.session, mode="live", arb_id=record.transfer_id,
                                                 signal_id="", order=order, not_after_ns=now + self.grace_ns,
                                                 ts_ns=now)
                if not await tl.claim_step(conn, record.transfer_id, i, client_id=order.client_order_id,
                                           requested=self._amount_in(record, row), claimed_ns=now,
                                           not_after_ns=orow.not_after_ns):
                    raise RuntimeError(f"transfer {record.transfer_id} step {i} claimed under its lock")
        else:
            orow = (await ledger.load_orders(conn, record.transfer_id))[row.client_id]
            order = PreparedOrder(OrderLeg(client_order_id=orow.client_order_id, exchange=orow.exchange,
                                           symbol=orow.symbol, side=orow.side, price=orow.price or ZERO,
                                           quantity=orow.quantity, time_in_force="IOC"),
                                  (await self.market.instrument(orow.exchange, orow.symbol))[0], "transfer")
        async with conn.transaction():  # the first step goes under the row lock: a cancel waits for it
            state = await tl.lock_state(conn, record.transfer_id)
            if fresh and not self._may_start(state, i):
                result = VenueResult("REJECTED", (), f"not sent: the transfer became {state}")
                await ledger.record_outcome(conn, session=self.session, mode="live", row=orow, result=result,
                                            ts_ns=now)
                await tl.set_step(conn, record.transfer_id, i, from_states=("sending",), exec_state="failed",
                                  detail=result.reason)
                return False
            try:
                result = await (venue.submit(order, orow.not_after_ns) if fresh
                                else venue.reconcile(order, orow.not_after_ns))
            except OrderStateUnknown as exc:
                await ledger.mark_unknown(conn, orow, str(exc), self.clock_ns())
                await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"),
                                  exec_state="unknown", detail=str(exc)[:300])
                if state == "approved":
                    await tl.transition(conn, record, "sent", now_ns=self.clock_ns(),
                                        reason=f"step 0 conversion sent to {exchange}; its fill is not known yet")
                return False
            now = self.clock_ns()
            await ledger.record_outcome(conn, session=self.session, mode="live", row=orow, result=result, ts_ns=now)
            fills = [f for f in await ledger.load_fills(conn, record.transfer_id)
                     if f.client_order_id == orow.client_order_id]
            moved: dict[str, Decimal] = {}
            for f in fills:
                for d in fill_deltas(exchange, orow.symbol, orow.side, f):
                    moved[d.asset] = moved.get(d.asset, ZERO) + d.amount
            received, spent = moved.get(step.to_asset, ZERO), -moved.get(step.from_asset, ZERO)
            if received <= 0:
                why = result.reason or result.status
                await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"),
                                  exec_state="failed", state="failed", detail=f"nothing filled ({why})"[:300])
                await self._fail(conn, record, f"step {i} conversion of {step.from_asset} on {exchange} filled "
                                               f"nothing ({why}): the funds stay on {exchange} as "
                                               f"{step.from_asset}", "warning")
                return False
            await self._publish_balances(await self._read_balances([exchange], record))
            fee = sum((f.fee for f in fills), ZERO)
            await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"), exec_state="done",
                              state="done", exchange_ref=result.exchange_order_id, debited=spent, credited=received,
                              fee_charged=fee, sent_ns=now, done_ns=now,
                              detail=f"{result.status}: {spent} {step.from_asset} -> {received} {step.to_asset}")
            if state == "approved":
                await tl.transition(conn, record, "sent", now_ns=now,
                                    reason=f"step 0 conversion done on {exchange}: {spent} {step.from_asset} -> "
                                           f"{received} {step.to_asset}")
        return True

    def _amount_in(self, record: tl.LiveTransfer, row: tl.StepRow) -> Decimal:
        """What a step may spend: its planned amount, less when the previous step delivered less."""
        if row.index == 0:
            return row.step.amount
        delivered = record.steps[row.index - 1].credited or ZERO
        return min(row.step.amount, delivered)

    async def _conversion_order(self, record: tl.LiveTransfer, row: tl.StepRow) -> PreparedOrder | str:
        step, exchange, symbol = row.step, row.step.from_exchange, row.step.network
        base, _ = split_symbol(symbol)
        amount_in = self._amount_in(record, row)
        if amount_in <= 0:
            return f"nothing arrived from step {row.index - 1}"
        instrument, known = await self.market.instrument(exchange, symbol)
        book = await self.market.book(exchange, symbol)
        if book is None or self.clock_ns() - book.ts_recv_ns > self.max_book_age_ns:
            return f"no fresh {symbol} book on {exchange} to bound the price"
        bid, ask = best_prices(book)
        side: Side = "sell" if step.from_asset == base else "buy"
        if side == "sell":
            if bid is None:
                return f"no bid on the {symbol} book of {exchange}"
            price = bounded_to_tick(instrument, bid * (1 - self.slippage), "sell")
            quantity = amount_in
        else:
            if ask is None:
                return f"no ask on the {symbol} book of {exchange}"
            price = bounded_to_tick(instrument, ask * (1 + self.slippage), "buy")
            # spend at most amount_in, fee included where the exchange charges it in the quote
            quantity = amount_in / quote_needed(exchange, price, Decimal(1), instrument.taker_fee)
        leg = OrderLeg(client_order_id=step_client_id(self.session, record.transfer_id, row.index, "conversion"),
                       exchange=exchange, symbol=symbol, side=side, price=price, quantity=quantity,
                       time_in_force="IOC")
        order = prepare(leg, instrument, known=known, role="transfer", require_rules=True)
        return order.rejection or order

    # ------------------------------------------------------------------ withdrawals

    async def _withdrawal(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow) -> bool:
        step, i = row.step, row.index
        fresh = row.exec_state == ""
        source, dest = self.live.get(step.from_exchange), self.live.get(step.to_exchange)
        if source is None or dest is None:
            return await self._no_venue(conn, record, row, step.from_exchange if source is None else step.to_exchange)
        if fresh:
            problem = whitelist_problem(i, step, self.settings)  # again: the configuration may have changed
            amount = problem or self._withdrawal_amount(record, row)
            if isinstance(amount, str):
                await self._step_failed(conn, record, row, amount,
                                        f"step {i} withdrawal refused: {amount}; not sent, {self._where(row)}")
                return False
            requested = amount + step.fee if source.fee_in_amount else amount
            now = self.clock_ns()
            async with conn.transaction():
                if not self._may_start(await tl.lock_state(conn, record.transfer_id), i):
                    return False
                if not await tl.claim_step(conn, record.transfer_id, i,
                                           client_id=step_client_id(self.session, record.transfer_id, i, step.kind),
                                           requested=requested, claimed_ns=now, not_after_ns=now + self.grace_ns):
                    raise RuntimeError(f"transfer {record.transfer_id} step {i} claimed under its lock")
            row = await self._row(conn, record.transfer_id, i)
        assert row.requested is not None and row.claimed_ns is not None and row.not_after_ns is not None
        request = WithdrawalRequest(client_id=row.client_id, asset=step.from_asset,
                                    network=step.network_label or step.network, address=step.address, memo=step.memo,
                                    amount=row.requested, claimed_ns=row.claimed_ns, not_after_ns=row.not_after_ns)
        if row.exec_state in ("sending", "unknown"):
            return await self._send_or_find(conn, record, row, source, request, fresh)
        if row.exec_state == "sent":
            try:
                found = await source.find_withdrawal(request, row.exchange_ref)
            except ExchangeUnavailable as exc:
                return await self._wait(conn, record, row, f"{exc}")
            # a withdrawal done without a txid yet cannot be found at the destination: wait for it
            if found is None or found.status == "pending" or (found.status == "done" and not found.txid):
                return await self._wait(conn, record, row, found.detail if found else "not listed")
            if found.status == "failed":
                await self._step_failed(conn, record, row, found.detail,
                                        f"step {i} withdrawal {row.exchange_ref} failed on {step.from_exchange} "
                                        f"({found.detail}): the funds stay on {step.from_exchange}")
                return False
            await tl.set_step(conn, record.transfer_id, i, from_states=("sent",), exec_state="withdrawn",
                              txid=found.txid, fee_charged=found.fee if found.fee is not None else row.fee_charged,
                              detail=found.detail)
            row = await self._row(conn, record.transfer_id, i)
        if row.exec_state == "withdrawn":
            try:
                deposit = await dest.find_deposit(step.to_asset, row.txid)
            except ExchangeUnavailable as exc:
                return await self._wait(conn, record, row, f"{exc}")
            if deposit is None or deposit.status == "pending":
                return await self._wait(conn, record, row, f"deposit {deposit.detail if deposit else 'not seen'}")
            if deposit.status == "failed":
                await self._step_failed(conn, record, row, f"deposit {deposit.detail}",
                                        f"step {i}: {step.to_exchange} did not credit the deposit of txid "
                                        f"{row.txid} ({deposit.detail}): the funds left {step.from_exchange}",
                                        "critical")
                return False
            now = self.clock_ns()
            await tl.set_step(conn, record.transfer_id, i, from_states=("withdrawn",), exec_state="done",
                              state="done", credited=deposit.amount, done_ns=now,
                              detail=f"credited {deposit.amount} {step.to_asset} on {step.to_exchange}")
            return True
        return False

    async def _send_or_find(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow,
                            source: HttpVenue, request: WithdrawalRequest, fresh: bool) -> bool:
        step, i = row.step, row.index
        async with conn.transaction():  # the first step goes under the row lock: a cancel waits for it
            state = await tl.lock_state(conn, record.transfer_id)
            if fresh and not self._may_start(state, i):
                await tl.set_step(conn, record.transfer_id, i, from_states=("sending",), exec_state="failed",
                                  detail=f"not sent: the transfer became {state}")
                return False
            found: WithdrawalState | None = None
            if fresh:
                try:
                    found = await source.withdraw(request)
                except WithdrawalRefused as exc:
                    await tl.set_step(conn, record.transfer_id, i, from_states=("sending",), exec_state="failed",
                                      state="failed", detail=str(exc)[:300])
                    await self._fail(conn, record, f"step {i} withdrawal of {request.amount} {step.from_asset} "
                                                   f"refused by {step.from_exchange} ({exc}): nothing left "
                                                   f"{step.from_exchange}", "warning")
                    return False
            if found is None:  # no answer: look for it, never send it again
                until = request.not_after_ns + self.margin_ns if fresh else 0
                found = await self._look_for(conn, source, request, until)
            now = self.clock_ns()
            if found is None:
                if now - request.claimed_ns > self.unknown_timeout_ns:
                    await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"),
                                      exec_state="failed", state="failed", detail="outcome never known")
                    await self._fail(conn, record, f"step {i} withdrawal of {request.amount} {step.from_asset} from "
                                                   f"{step.from_exchange}: no answer and not found on the exchange "
                                                   f"for {self.unknown_timeout_ns // NS} s; not sent again: check "
                                                   f"{step.from_exchange}'s withdrawals", "critical")
                    return False
                await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"),
                                  exec_state="unknown", detail="no answer; not found on the exchange yet")
                if state == "approved":
                    await tl.transition(conn, record, "sent", now_ns=now,
                                        reason=f"step 0 withdrawal sent to {step.from_exchange}; its outcome is "
                                               f"not known yet")
                return False
            await self._publish_balances(await self._read_balances([step.from_exchange], record))
            fee = found.fee if found.fee is not None else step.fee
            debited = request.amount if source.fee_in_amount else request.amount + fee
            await tl.set_step(conn, record.transfer_id, i, from_states=("sending", "unknown"), exec_state="sent",
                              state="sent", exchange_ref=found.withdrawal_id, debited=debited, fee_charged=fee,
                              sent_ns=now, detail=found.detail)
            if state == "approved":
                await tl.transition(conn, record, "sent", now_ns=now,
                                    reason=f"step 0 withdrawal of {request.amount} {step.from_asset} accepted by "
                                           f"{step.from_exchange} ({found.withdrawal_id})")
        return False

    async def _look_for(self, conn: AsyncConnection, source: HttpVenue, request: WithdrawalRequest,
                        until_ns: int) -> WithdrawalState | None:
        taken = await tl.withdrawal_refs(conn, source.name)
        while True:
            with contextlib.suppress(ExchangeUnavailable):
                found = await source.find_withdrawal(request, "", taken)
                if found is not None:
                    return found
            if self.clock_ns() >= until_ns:
                return None
            await asyncio.sleep(self.poll_s)

    def _withdrawal_amount(self, record: tl.LiveTransfer, row: tl.StepRow) -> Decimal | str:
        """What arrives at the destination: as planned, or what the previous step delivered net of the fee."""
        step = row.step
        if row.index == 0:
            return step.amount
        delivered = record.steps[row.index - 1].credited or ZERO
        unit = self.settings.amount_steps.get(step.from_asset, DEFAULT_AMOUNT_STEP)
        amount = min(step.amount, round_to_step(delivered - step.fee, unit, up=False))
        minimum = next((n.withdraw_min for n in self.settings.networks if (n.exchange, n.asset, n.network) == (
            step.from_exchange, step.from_asset, step.network)), ZERO)
        if amount <= 0 or amount < minimum:
            return (f"only {delivered} {step.from_asset} arrived from step {row.index - 1}: below the {step.network} "
                    f"minimum after its fee of {step.fee}")
        return amount

    async def _wait(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow, status: str) -> bool:
        """Not there yet; past ``transfer_timeout_s`` the transfer fails (the funds may still arrive)."""
        if row.claimed_ns is not None and self.clock_ns() - row.claimed_ns > self.timeout_ns:
            step = row.step
            await self._step_failed(conn, record, row, f"timed out ({status})",
                                    f"step {row.index} withdrawal {row.exchange_ref or row.client_id} of "
                                    f"{step.from_asset} from {step.from_exchange} to {step.to_exchange} not credited "
                                    f"within {self.timeout_ns // NS} s ({status}): the funds may still arrive",
                                    "critical")
        return False

    # ------------------------------------------------------------------ transfer states

    @staticmethod
    def _where(row: tl.StepRow) -> str:
        step = row.step
        return "nothing moved" if row.index == 0 else f"the funds are on {step.from_exchange} as {step.from_asset}"

    async def _no_venue(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow, exchange: str) -> bool:
        """No API keys for an exchange of a step (a restart without them): a step not started
        fails; one under way waits for them (and times out)."""
        if row.exec_state == "":
            await self._step_failed(conn, record, row, f"no API keys for {exchange}",
                                    f"step {row.index} {row.step.kind}: no API keys for {exchange}; not sent, "
                                    f"{self._where(row)}")
        else:
            log.warning("no live venue to follow a transfer step", extra={"transfer_id": record.transfer_id,
                                                                          "exchange": exchange})
            if row.step.kind == "withdrawal":
                await self._wait(conn, record, row, f"no API keys for {exchange}")
        return False

    @staticmethod
    def _may_start(state: TransferState | None, index: int) -> bool:
        return state == ("approved" if index == 0 else "sent")

    async def _row(self, conn: AsyncConnection, transfer_id: str, index: int) -> tl.StepRow:
        record = await tl.load(conn, self.session, transfer_id)
        assert record is not None
        return record.steps[index]

    async def _step_failed(self, conn: AsyncConnection, record: tl.LiveTransfer, row: tl.StepRow, detail: str,
                           reason: str, severity: Severity = "warning") -> None:
        async with conn.transaction():
            await tl.set_step(conn, record.transfer_id, row.index, from_states=(row.exec_state,),
                              exec_state="failed", state="failed", detail=detail[:300])
            await self._fail(conn, record, reason, severity)

    async def _fail(self, conn: AsyncConnection, record: tl.LiveTransfer, reason: str, severity: Severity) -> None:
        now = self.clock_ns()
        if await tl.transition(conn, record, "failed", reason=reason, now_ns=now):
            log.warning("live transfer failed", extra={"transfer_id": record.transfer_id, "reason": reason})
            await self._alert(record.transfer_id, severity, reason, now)

    async def _complete(self, conn: AsyncConnection, record: tl.LiveTransfer) -> None:
        exchanges = sorted({e for s in record.steps for e in (s.step.from_exchange, s.step.to_exchange)})
        balances = await self._read_balances(exchanges, record)
        now = self.clock_ns()
        balances = [replace(b, ts_ns=now) for b in balances]  # read after the credit: newer than the completion
        await self._publish_balances(balances)
        last = record.steps[-1]
        missing = sorted(set(exchanges) - {b.exchange for b in balances})
        reason = f"delivered {last.credited} {last.step.to_asset} to {last.step.to_exchange}"
        if missing:
            reason += f" (balances of {', '.join(missing)} could not be read)"
        await tl.transition(conn, record, "completed", reason=reason, now_ns=now)

    async def _refuse_unrecorded(self, msg: Transfer) -> None:
        """An approved message the ledger does not know: refused, reported, nothing sent."""
        now = self.clock_ns()
        reason = "refused: not in this session's transfer ledger; nothing sent"
        report = replace(msg, state="failed", reason=reason, ts_ns=now)
        maxlen = policy(TRANSFERS).maxlen
        await self.bus.redis.xadd(self.bus.stream(TRANSFERS), {FIELD: encode(report)}, maxlen=maxlen,
                                  approximate=maxlen is not None)
        m.TRANSFERS.labels("failed").inc()
        await self._alert(msg.transfer_id, "critical", f"transfer {msg.transfer_id} {reason}", now)

    # ------------------------------------------------------------------ balances and alerts

    async def _read_balances(self, exchanges: list[str], record: tl.LiveTransfer) -> list[Balance]:
        """The exchanges' balances: every asset they report, and zero for a step's asset they omit."""
        now = self.clock_ns()
        out: list[Balance] = []
        for exchange in exchanges:
            venue = self.live.get(exchange)
            if venue is None:
                continue
            try:
                account = await venue.balances()
            except ExchangeUnavailable as exc:
                log.warning("balances not read", extra={"exchange": exchange, "error": str(exc)})
                continue
            touched = {a for s in record.steps for e, a in ((s.step.from_exchange, s.step.from_asset),
                                                            (s.step.to_exchange, s.step.to_asset)) if e == exchange}
            for asset in sorted(set(account) | touched):
                free, locked = account.get(asset, (ZERO, ZERO))
                out.append(Balance(exchange=exchange, asset=asset, free=free, locked=locked, mode="live", ts_ns=now))
        return out

    async def _publish_balances(self, balances: list[Balance]) -> None:
        if not balances:
            return
        maxlen = policy(BALANCES).maxlen
        pipe = self.bus.redis.pipeline(transaction=False)
        for b in balances:
            pipe.xadd(self.bus.stream(BALANCES), {FIELD: encode(b)}, maxlen=maxlen, approximate=maxlen is not None)
        await pipe.execute()
        for b in balances:
            m.BALANCE.labels(b.exchange, b.asset, b.mode).set(float(b.free + b.locked))

    async def _alert(self, transfer_id: str, severity: Severity, message: str, now_ns: int) -> None:
        alert = Alert(alert_id=f"{transfer_id}:failed", severity=severity, source="executor", kind="transfer_failed",
                      message=message, ts_ns=now_ns, labels={"transfer_id": transfer_id})
        maxlen = policy(ALERTS).maxlen
        await self.bus.redis.xadd(self.bus.stream(ALERTS), {FIELD: encode(alert)}, maxlen=maxlen,
                                  approximate=maxlen is not None)
