"""The order state machine of one leg: which transitions exist, and the ones an outcome implies.

    NEW -> PARTIALLY_FILLED -> FILLED | CANCELED | EXPIRED
    NEW -> FILLED | CANCELED | REJECTED | EXPIRED
    NEW | PARTIALLY_FILLED -> UNKNOWN   (no answer from the exchange: reconcile by client id)
    UNKNOWN -> any state the exchange then reports

FILLED, CANCELED, REJECTED and EXPIRED are final. The filled quantity never goes down and
never exceeds the order's quantity. ``settle`` turns an outcome reported at once (an IOC
that filled part and cancelled the rest) into the transitions the order went through, so
every one of them is stored and published.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from shared.models import OrderStatus

TERMINAL: frozenset[OrderStatus] = frozenset({"FILLED", "CANCELED", "REJECTED", "EXPIRED"})

_NEXT: dict[OrderStatus, frozenset[OrderStatus]] = {
    "NEW": frozenset({"PARTIALLY_FILLED", "FILLED", "CANCELED", "REJECTED", "EXPIRED", "UNKNOWN"}),
    "PARTIALLY_FILLED": frozenset({"PARTIALLY_FILLED", "FILLED", "CANCELED", "EXPIRED", "UNKNOWN"}),
    "UNKNOWN": frozenset({"PARTIALLY_FILLED", "FILLED", "CANCELED", "REJECTED", "EXPIRED", "UNKNOWN"}),
}


class InvalidTransition(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Transition:
    client_order_id: str
    status: OrderStatus
    filled_quantity: Decimal
    reason: str = ""


@dataclass
class OrderStateMachine:
    client_order_id: str
    quantity: Decimal
    status: OrderStatus = "NEW"
    filled_quantity: Decimal = Decimal(0)
    history: list[Transition] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def apply(self, status: OrderStatus, filled_quantity: Decimal, reason: str = "") -> Transition | None:
        """Move to ``status``; None when nothing changes. Raises ``InvalidTransition``."""
        if status == self.status and filled_quantity == self.filled_quantity:
            return None
        if status not in _NEXT.get(self.status, frozenset()):
            raise InvalidTransition(f"{self.client_order_id}: {self.status} -> {status} is not allowed")
        if filled_quantity < self.filled_quantity:
            raise InvalidTransition(
                f"{self.client_order_id}: filled quantity cannot go down ({self.filled_quantity} -> {filled_quantity})")
        if filled_quantity > self.quantity:
            raise InvalidTransition(
                f"{self.client_order_id}: filled {filled_quantity} exceeds the order's {self.quantity}")
        if status == "FILLED" and filled_quantity != self.quantity:
            raise InvalidTransition(f"{self.client_order_id}: FILLED needs the whole {self.quantity}")
        if status == "PARTIALLY_FILLED" and not 0 < filled_quantity < self.quantity:
            raise InvalidTransition(f"{self.client_order_id}: PARTIALLY_FILLED needs 0 < filled < quantity")
        if status == "REJECTED" and filled_quantity:
            raise InvalidTransition(f"{self.client_order_id}: a rejected order cannot have fills")
        transition = Transition(self.client_order_id, status, filled_quantity, reason)
        self.status, self.filled_quantity = status, filled_quantity
        self.history.append(transition)
        return transition

    def settle(self, status: OrderStatus, filled_quantity: Decimal, reason: str = "") -> list[Transition]:
        """Apply a final (or UNKNOWN) outcome, passing through PARTIALLY_FILLED when the order
        filled part of its quantity on the way to CANCELED/EXPIRED/UNKNOWN."""
        out: list[Transition] = []
        partial = 0 < filled_quantity < self.quantity
        if status in ("CANCELED", "EXPIRED", "UNKNOWN") and partial and filled_quantity != self.filled_quantity:
            step = self.apply("PARTIALLY_FILLED", filled_quantity)
            if step:
                out.append(step)
        last = self.apply(status, filled_quantity, reason)
        if last:
            out.append(last)
        return out
