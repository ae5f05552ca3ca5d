"""What every venue returns, and the flow live venues share: send once, reconcile by client id.

A live order is sent at most once per client order id. When the answer does not settle what
happened (timeout, broken connection, 5xx, "duplicate order"), the order's state is unknown
and it is looked up by client order id, never re-sent blindly. Only an answer that proves
the request never reached the matching engine (429 or 418) allows sending it again, after
the back-off the exchange asked for. An order not found after its deadline (the last moment
the request could still be accepted, plus a clock margin) never reached the exchange and
ends EXPIRED. An order still open (IOC in flight) is polled until it is final.

Withdrawals (live transfers) follow the same rule: ``withdraw`` sends a request once and
returns None when the answer leaves its outcome unknown; only a 429/418 lets it send again
(same request, same client id where the exchange has one). What became of it is asked with
``find_withdrawal``, never by sending it again.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TypeAlias, TypeVar

import aiohttp
import msgspec

from services.executor.markets import PreparedOrder
from services.executor.orders import TERMINAL
from services.executor.ratelimit import RateLimiter, SharedBudget
from shared.models import OrderStatus

ZERO = Decimal(0)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class VenueFill:
    fill_id: str
    """The exchange's trade id."""
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_asset: str
    ts_ns: int
    liquidity: Literal["taker", "maker"] = "taker"


@dataclass(frozen=True, slots=True)
class VenueResult:
    status: OrderStatus
    fills: tuple[VenueFill, ...] = ()
    reason: str = ""
    exchange_order_id: str = ""

    @property
    def filled_quantity(self) -> Decimal:
        return sum((f.quantity for f in self.fills), ZERO)

    @property
    def final(self) -> bool:
        return self.status in TERMINAL


class OrderStateUnknown(Exception):
    """The exchange has not said what became of the order; look it up again later."""


class Throttled(Exception):
    """429 or 418: the request was refused before the matching engine saw it."""


class ServerError(Exception):
    """5xx: the request may or may not have been executed."""


class WithdrawalRefused(Exception):
    """The exchange refused the withdrawal request: nothing left the account."""


class ExchangeUnavailable(Exception):
    """A wallet or account query got no usable answer; ask again later."""


@dataclass(frozen=True, slots=True)
class WithdrawalRequest:
    client_id: str
    """Our id of the withdrawal (Binance ``withdrawOrderId``; Upbit has no such field)."""
    asset: str
    network: str
    """The exchange's own name of the network."""
    address: str
    memo: str
    amount: Decimal
    """The request's ``amount``, in the exchange's convention (see ``HttpVenue.fee_in_amount``)."""
    claimed_ns: int
    """When the request was recorded, just before it was first sent."""
    not_after_ns: int
    """The last moment the request may still reach the exchange (Binance: ``recvWindow``)."""


WalletStatus: TypeAlias = Literal["pending", "done", "failed"]


@dataclass(frozen=True, slots=True)
class WithdrawalState:
    withdrawal_id: str
    status: WalletStatus
    amount: Decimal | None = None
    fee: Decimal | None = None
    txid: str = ""
    detail: str = ""
    """The exchange's own status (and reason, when it gives one)."""


@dataclass(frozen=True, slots=True)
class DepositState:
    status: WalletStatus
    """``done``: credited to the account."""
    amount: Decimal
    detail: str = ""


def parse_time_ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1_000_000) * 1000


def fmt_decimal(value: Decimal) -> str:
    """Plain notation, no exponent, no trailing zeros: what exchanges accept."""
    return f"{value.normalize():f}"


class HttpVenue(ABC):
    """A signed REST venue; subclasses build requests and read answers in the exchange's protocol."""

    name: str = ""
    limiter: RateLimiter
    fee_in_amount: bool = False
    """True when the exchange takes a withdrawal's fee out of the request's ``amount`` (what
    arrives is ``amount - fee``); False when it charges the fee on top."""

    def __init__(
        self,
        *,
        base_url: str,
        request_timeout_s: float,
        clock_margin_ns: int,
        poll_interval_s: float,
        poll_timeout_s: float,
        budget: SharedBudget | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.clock_margin_ns = clock_margin_ns
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.budget = budget
        """Rate budget shared with the other replicas (None: this process counts alone)."""
        self.clock_ns = clock_ns
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0
        """Order-placing requests sent (429s included)."""
        self.sent_withdrawals = 0
        """Withdrawal requests sent (429s included)."""

    def limiters(self) -> list[RateLimiter]:
        return [self.limiter]

    # ------------------------------------------------------------------ HTTP

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                headers={"User-Agent": "arb-executor"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _acquire(self, limiter: RateLimiter, weight: int, deadline_ns: int | None = None) -> None:
        while True:
            now = self.clock_ns() / 1e9
            if self.budget is None:
                wait = limiter.wait_time(weight, now)
            else:  # the shared budget counts everyone's requests; locally only the back-off is kept
                wait = max(0.0, limiter.blocked_until - now)
                if wait <= 0:
                    wait = await self.budget.take(limiter, weight, now)
            if wait <= 0:
                limiter.record(weight, now)
                return
            if deadline_ns is not None and (now + wait) * 1e9 > deadline_ns:
                raise Throttled(f"{self.name}: rate limited until after the order's deadline")
            await asyncio.sleep(wait)

    async def _send(self, limiter: RateLimiter, weight: int, method: str, url: str, *,
                    headers: Mapping[str, str], data: bytes | None = None,
                    deadline_ns: int | None = None) -> tuple[int, Any]:
        """One request through ``limiter``; returns (status, decoded JSON or None)."""
        await self._acquire(limiter, weight, deadline_ns)
        async with self.session.request(method, url, headers=dict(headers), data=data) as resp:
            body = await resp.read()
            now = self.clock_ns() / 1e9
            blocked = limiter.blocked_until
            limiter.on_response(resp.status, resp.headers, now)
            if self.budget is not None and limiter.blocked_until > blocked:
                await self.budget.block(limiter, limiter.blocked_until, now)
            if resp.status in (429, 418):
                raise Throttled(f"{self.name}: HTTP {resp.status}")
            if resp.status >= 500:
                raise ServerError(f"{self.name}: HTTP {resp.status}")
            try:
                payload = _json(body)
            except ValueError:
                payload = None
            return resp.status, payload

    # ------------------------------------------------------------------ protocol of one exchange

    @abstractmethod
    async def _place(self, order: PreparedOrder, not_after_ns: int) -> VenueResult | None:
        """Send the order once. A result (final or open), or None when the answer leaves the
        state unknown. Raises ``Throttled`` when refused for rate, aiohttp/timeout errors
        when there was no answer."""

    @abstractmethod
    async def _query(self, order: PreparedOrder) -> VenueResult | None:
        """The order as the exchange knows it by client order id; None when it does not."""

    # ------------------------------------------------------------------ the shared flow

    async def submit(self, order: PreparedOrder, not_after_ns: int) -> VenueResult:
        while True:
            try:
                self.sent += 1
                placed = await self._place(order, not_after_ns)
            except Throttled as exc:
                if self.clock_ns() >= not_after_ns:
                    return VenueResult("REJECTED", (), f"{exc}: not sent before the deadline")
                continue  # refused before matching: safe to send again once the back-off is over
            except (aiohttp.ClientError, TimeoutError, ServerError):
                return await self.reconcile(order, not_after_ns)
            if placed is None:
                return await self.reconcile(order, not_after_ns)
            return placed if placed.final else await self._poll(order)

    async def reconcile(self, order: PreparedOrder, not_after_ns: int) -> VenueResult:
        """Find out what became of an order sent earlier, by its client order id."""
        deadline = not_after_ns + self.clock_margin_ns
        while True:
            found = await self._query_or_unknown(order)
            if found is not None:
                return found if found.final else await self._poll(order)
            now = self.clock_ns()
            if now > deadline:
                return VenueResult("EXPIRED", (), "never reached the exchange: not found by client order id "
                                                  "after its deadline")
            await asyncio.sleep(min(self.poll_interval_s, (deadline - now) / 1e9 + 0.001))

    async def _poll(self, order: PreparedOrder) -> VenueResult:
        end = time.monotonic() + self.poll_timeout_s
        while time.monotonic() < end:
            await asyncio.sleep(self.poll_interval_s)
            found = await self._query_or_unknown(order)
            if found is not None and found.final:
                return found
        raise OrderStateUnknown(f"{self.name} {order.client_order_id}: still open after "
                                f"{self.poll_timeout_s:.1f} s")

    # ------------------------------------------------------------------ wallet (live transfers)

    @abstractmethod
    async def _withdraw(self, request: WithdrawalRequest) -> WithdrawalState | None:
        """Send the withdrawal request once: the exchange's answer, or None when it leaves the
        outcome unknown. Raises ``WithdrawalRefused``, ``Throttled``, aiohttp/timeout errors."""

    @abstractmethod
    async def _find_withdrawal(self, request: WithdrawalRequest, withdrawal_id: str,
                               taken: frozenset[str]) -> WithdrawalState | None:
        """The withdrawal as the exchange knows it (by its id when known, else by what the
        exchange can look it up by); None when it does not know it. ``taken``: withdrawal ids
        that belong to other requests."""

    @abstractmethod
    async def _find_deposit(self, asset: str, txid: str) -> DepositState | None:
        """The deposit of transaction ``txid`` into this account; None when not seen yet."""

    @abstractmethod
    async def _balances(self) -> dict[str, tuple[Decimal, Decimal]]:
        """Every asset of the account: (free, locked)."""

    async def withdraw(self, request: WithdrawalRequest) -> WithdrawalState | None:
        """Send a withdrawal request; None when its outcome is unknown (look it up, never resend)."""
        while True:
            try:
                self.sent_withdrawals += 1
                return await self._withdraw(request)
            except Throttled as exc:
                if self.clock_ns() >= request.not_after_ns:
                    raise WithdrawalRefused(f"{exc}: not sent before its deadline") from None
                continue  # refused before processing: the same request may go again after the back-off
            except (aiohttp.ClientError, TimeoutError, ServerError):
                return None

    async def find_withdrawal(self, request: WithdrawalRequest, withdrawal_id: str = "",
                              taken: frozenset[str] = frozenset()) -> WithdrawalState | None:
        return await self._wallet_query(lambda: self._find_withdrawal(request, withdrawal_id, taken))

    async def find_deposit(self, asset: str, txid: str) -> DepositState | None:
        return await self._wallet_query(lambda: self._find_deposit(asset, txid))

    async def balances(self) -> dict[str, tuple[Decimal, Decimal]]:
        return await self._wallet_query(self._balances)

    async def _wallet_query(self, query: Callable[[], Awaitable[_T]]) -> _T:
        while True:
            try:
                return await query()
            except Throttled:
                continue  # the limiter now holds the next request back
            except (aiohttp.ClientError, TimeoutError) as exc:  # its text may carry a signed URL: name only
                raise ExchangeUnavailable(f"{self.name}: {type(exc).__name__}") from exc
            except (ServerError, ValueError, KeyError, ArithmeticError) as exc:  # our own texts
                raise ExchangeUnavailable(f"{self.name}: {type(exc).__name__}: {exc}"[:300]) from exc

    async def _query_or_unknown(self, order: PreparedOrder) -> VenueResult | None:
        while True:
            try:
                return await self._query(order)
            except Throttled:
                continue  # the limiter now holds the next request back
            except (aiohttp.ClientError, TimeoutError, ServerError) as exc:
                raise OrderStateUnknown(f"{self.name} {order.client_order_id}: query failed "
                                        f"({type(exc).__name__})") from exc


# Numbers with a fraction decode to Decimal, never float: they are prices and sizes.
_decoder = msgspec.json.Decoder(float_hook=Decimal)


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError("not JSON") from exc
