"""The transfer state machine and the guards every transfer passes. Pure.

    planned -> awaiting_approval -> approved -> sent -> completed
       |             |                 |         \\-> failed
       \\-> approved  \\-> cancelled     \\-> cancelled / failed

A transfer starts ``planned`` and immediately moves to ``approved`` or
``awaiting_approval`` (``initial_state``). Only ``approved`` transfers are ever executed;
``sent`` means its first step left the source, so it can no longer be cancelled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Literal, TypeAlias

from services.rebalancer.planner import Node, plan_effects
from shared.config import RebalancerSettings
from shared.models import TransferState, TransferStep

ZERO = Decimal(0)

TRANSITIONS: Mapping[TransferState, frozenset[TransferState]] = {
    "planned": frozenset({"awaiting_approval", "approved", "cancelled", "failed"}),
    "awaiting_approval": frozenset({"approved", "cancelled"}),
    "approved": frozenset({"sent", "cancelled", "failed"}),
    "sent": frozenset({"completed", "failed"}),
    "completed": frozenset(),
    "cancelled": frozenset(),
    "failed": frozenset(),
}
OPEN_STATES: tuple[TransferState, ...] = ("planned", "awaiting_approval", "approved", "sent")
FINAL_STATES: tuple[TransferState, ...] = ("completed", "cancelled", "failed")
ALL_STATES: tuple[TransferState, ...] = (*OPEN_STATES, *FINAL_STATES)

StepState: TypeAlias = Literal["pending", "sent", "done", "failed"]
Mode: TypeAlias = Literal["paper", "live", "backtest"]


class IllegalTransition(ValueError):
    def __init__(self, transfer_id: str, current: str, new: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(current, ()))) or "nothing (final)"  # type: ignore[call-overload]
        super().__init__(f"transfer {transfer_id} is {current}: cannot become {new} (allowed: {allowed})")
        self.current, self.new = current, new


class NotWhitelisted(ValueError):
    """A withdrawal whose destination is not exactly a whitelisted address."""


def check_transition(transfer_id: str, current: TransferState, new: TransferState) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(transfer_id, current, new)


def check_whitelist(steps: Iterable[TransferStep], settings: RebalancerSettings) -> None:
    """Every withdrawal must go to the whitelisted address (and memo) of its destination."""
    for i, step in enumerate(steps):
        if step.kind != "withdrawal":
            continue
        entry = settings.whitelisted_address(step.to_exchange, step.to_asset, step.network)
        where = f"step {i}: {step.to_asset} to {step.to_exchange} on {step.network or '(no network)'}"
        if entry is None:
            raise NotWhitelisted(f"{where}: no whitelisted address (rebalancer.addresses)")
        if (entry.address, entry.memo) != (step.address, step.memo):
            raise NotWhitelisted(f"{where}: address is not the whitelisted one")


def initial_state(steps: Sequence[TransferStep], mode: Mode, settings: RebalancerSettings) -> tuple[
    TransferState, str
]:
    """``approved`` or ``awaiting_approval``, with the reason.

    Live: any step moving more of an asset than its ``approval_caps`` entry (an asset without
    a cap always counts as over) waits for a person; within the caps it is approved only
    when ``auto_approve`` is on. Paper follows the same rules unless ``paper_auto_approve``.
    """
    if mode != "live" and settings.paper_auto_approve:
        return "approved", "paper: auto-approved"
    for step in steps:
        moved = step.amount + (step.fee if step.kind == "withdrawal" else ZERO)
        cap = settings.approval_caps.get(step.from_asset)
        if cap is None:
            return "awaiting_approval", f"no approval cap for {step.from_asset}"
        if moved > cap:
            return "awaiting_approval", f"{moved} {step.from_asset} is over the approval cap of {cap}"
    if settings.auto_approve:
        return "approved", "within approval caps: auto-approved"
    return "awaiting_approval", "auto_approve is off"


def remaining_effects(steps: Sequence[TransferStep], states: Sequence[StepState]) -> dict[Node, Decimal]:
    """What a transfer will still do to balances: pending steps in full; a sent withdrawal
    still credits its destination; conversions happen at once, so a sent one is done."""
    out: dict[Node, Decimal] = {}
    for step, state in zip(steps, states, strict=True):
        if state == "pending":
            effects = plan_effects([step])
        elif state == "sent" and step.kind == "withdrawal":
            effects = {Node(step.to_exchange, step.to_asset): step.amount}
        else:
            continue
        for node, delta in effects.items():
            out[node] = out.get(node, ZERO) + delta
    return out


def in_flight_by_exchange(effects: Mapping[Node, Decimal]) -> dict[str, dict[str, str]]:
    """The ``transfers_in_flight`` hashes: ``outgoing:<ASSET>`` (not available to trade) and
    ``incoming:<ASSET>`` (on its way), per exchange, as decimal strings."""
    out: dict[str, dict[str, str]] = {}
    for node, delta in sorted(effects.items()):
        if delta == 0:
            continue
        field = f"outgoing:{node.asset}" if delta < 0 else f"incoming:{node.asset}"
        out.setdefault(node.exchange, {})[field] = str(abs(delta))
    return out
