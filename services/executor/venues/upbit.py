"""Upbit over signed REST (``docs.upbit.com/kr/reference``: new-order, get-order, auth, rate-limits).

- Place: ``POST /v1/orders`` with a JSON body ``market, side (bid|ask), volume, price,
  ord_type=limit, time_in_force (ioc|fok), identifier``; the JWT's ``query_hash`` covers the
  body as ``key=value&...`` in the body's order. The answer is the order, usually still
  ``wait``: fills are discovered by polling ``GET /v1/order?identifier=`` until ``done``
  or ``cancel`` (an IOC with a remainder), which lists ``trades`` (uuid, price, volume, funds).
- Upbit reports the fee per order (``paid_fee``, quote currency), not per trade: it is
  spread over the trades by their funds, the last trade taking the rounding remainder, so
  the fills add up to ``paid_fee`` exactly.
- ``identifier`` is unique over all orders ever, even failed ones: an error naming the
  identifier means it is taken, so the order is looked up, never re-sent under a new id.
- Limits per second: group ``order`` (8, 12 from 2026-08-21) and ``default`` (30); the
  ``Remaining-Req`` header says what is left this second; 429 then 418 if ignored.

Wallet (``reference/디지털자산-출금하기``, ``개별-출금-조회``, ``list-withdrawals``,
``개별-입금-조회``, ``전체-계좌-조회``; group ``default``):
- Withdraw: ``POST /v1/withdraws/coin`` JSON ``currency, net_type, amount, address,
  secondary_address, transaction_type=default`` -> the withdrawal with its ``uuid``. The
  destination must be registered as an allowed address on Upbit's site beforehand.
- Upbit has no client-side id for withdrawals and no request expiry: a request whose answer
  was lost is looked for in ``GET /v1/withdraws?currency=&limit=100&order_by=desc`` as the
  one of the same ``net_type`` and ``amount`` created after the request was recorded and
  not already owned by another request. Until it shows, its outcome stays unknown: it is
  never sent again.
- Status: ``GET /v1/withdraw?uuid=``, ``state`` ``WAITING``/``PROCESSING`` pending, ``DONE``
  done, ``FAILED``/``CANCELLED``/``REJECTED`` failed (older lower-case states are read too).
- Deposits: ``GET /v1/deposits?currency=&txids[]=``: ``ACCEPTED`` credited; ``PROCESSING``,
  ``TRAVEL_RULE_SUSPECTED`` pending; ``CANCELLED``, ``REJECTED``, ``REFUNDING``, ``REFUNDED``
  failed.
- Balances: ``GET /v1/accounts`` ``[{currency, balance, locked}]``. The withdrawal fee is
  charged on top of ``amount`` (not stated in the API pages).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import msgspec

from services.executor.markets import PreparedOrder
from services.executor.ratelimit import RateLimiter
from services.executor.signing import upbit_query_string, upbit_token
from services.executor.venues.base import (
    DepositState,
    HttpVenue,
    ServerError,
    VenueFill,
    VenueResult,
    WalletStatus,
    WithdrawalRefused,
    WithdrawalRequest,
    WithdrawalState,
    fmt_decimal,
    parse_time_ns,
)
from shared.config import Secret
from shared.models import OrderStatus

_FEE_QUANTUM = Decimal("1e-8")
_WITHDRAW_STATE: dict[str, WalletStatus] = {"DONE": "done", "FAILED": "failed", "CANCELLED": "failed",
                                            "CANCELED": "failed", "REJECTED": "failed"}
_DEPOSIT_STATE: dict[str, WalletStatus] = {"ACCEPTED": "done", "CANCELLED": "failed", "CANCELED": "failed",
                                           "REJECTED": "failed", "REFUNDING": "failed", "REFUNDED": "failed"}


class UpbitVenue(HttpVenue):
    name = "upbit"

    def __init__(self, *, api_key: Secret, api_secret: Secret, orders_per_second: int = 8,
                 requests_per_second: int = 30, **kw: Any) -> None:
        super().__init__(**kw)
        self._key = api_key
        self._secret = api_secret
        self.order_limiter = RateLimiter("upbit.order", capacity=orders_per_second, window_s=1.0)
        self.limiter = RateLimiter("upbit.default", capacity=requests_per_second, window_s=1.0)

    def limiters(self) -> list[RateLimiter]:
        return [self.order_limiter, self.limiter]

    def _auth(self, query: str) -> dict[str, str]:
        token = upbit_token(self._key.reveal(), self._secret.reveal(), query)
        return {"Authorization": f"Bearer {token}"}

    async def _place(self, order: PreparedOrder, not_after_ns: int) -> VenueResult | None:
        leg = order.leg
        if self.clock_ns() >= not_after_ns:
            return VenueResult("REJECTED", (), "deadline passed before the order could be sent")
        body = {
            "market": order.instrument.native,
            "side": "bid" if leg.side == "buy" else "ask",
            "volume": fmt_decimal(leg.quantity),
            "price": fmt_decimal(leg.price),
            "ord_type": "limit",
            "time_in_force": leg.time_in_force.lower(),
            "identifier": leg.client_order_id,
        }
        headers = self._auth(upbit_query_string(body)) | {"Content-Type": "application/json; charset=utf-8"}
        status, data = await self._send(self.order_limiter, 1, "POST", f"{self.base_url}/v1/orders",
                                        headers=headers, data=msgspec.json.encode(body), deadline_ns=not_after_ns)
        if status in (200, 201) and isinstance(data, dict):
            return self._result(data, order)
        name, message = _error(data)
        if "identifier" in name or "identifier" in message:
            return None  # the identifier is taken: find out by it what happened
        return VenueResult("REJECTED", (), f"upbit {name}: {message}" if name else f"upbit HTTP {status}")

    async def _query(self, order: PreparedOrder) -> VenueResult | None:
        query = upbit_query_string({"identifier": order.client_order_id})
        status, data = await self._send(self.limiter, 1, "GET", f"{self.base_url}/v1/order?{query}",
                                        headers=self._auth(query))
        if status == 200 and isinstance(data, dict):
            return self._result(data, order)
        name, message = _error(data)
        if status == 404 or name == "order_not_found":
            return None
        raise ServerError(f"upbit: HTTP {status} {name} {message}".strip())

    # ------------------------------------------------------------------ wallet

    async def _withdraw(self, request: WithdrawalRequest) -> WithdrawalState | None:
        if self.clock_ns() >= request.not_after_ns:
            raise WithdrawalRefused("deadline passed before the withdrawal could be sent")
        body = {"currency": request.asset, "net_type": request.network, "amount": fmt_decimal(request.amount),
                "address": request.address}
        if request.memo:
            body["secondary_address"] = request.memo
        body["transaction_type"] = "default"
        headers = self._auth(upbit_query_string(body)) | {"Content-Type": "application/json; charset=utf-8"}
        status, data = await self._send(self.limiter, 1, "POST", f"{self.base_url}/v1/withdraws/coin",
                                        headers=headers, data=msgspec.json.encode(body),
                                        deadline_ns=request.not_after_ns)
        if status in (200, 201) and isinstance(data, dict) and data.get("uuid"):
            return _withdrawal(data)
        name, message = _error(data)
        if not name:
            return None  # no Upbit error: we cannot tell whether it was processed
        raise WithdrawalRefused(f"upbit {name}: {message}")

    async def _find_withdrawal(self, request: WithdrawalRequest, withdrawal_id: str,
                               taken: frozenset[str]) -> WithdrawalState | None:
        if withdrawal_id:
            query = upbit_query_string({"uuid": withdrawal_id})
            status, data = await self._send(self.limiter, 1, "GET", f"{self.base_url}/v1/withdraw?{query}",
                                            headers=self._auth(query))
            if status == 200 and isinstance(data, dict):
                return _withdrawal(data)
            name, message = _error(data)
            raise ServerError(f"upbit: HTTP {status} {name} {message}".strip())
        query = upbit_query_string({"currency": request.asset, "limit": 100, "order_by": "desc"})
        status, data = await self._send(self.limiter, 1, "GET", f"{self.base_url}/v1/withdraws?{query}",
                                        headers=self._auth(query))
        if status != 200 or not isinstance(data, list):
            name, message = _error(data)
            raise ServerError(f"upbit: HTTP {status} {name} {message}".strip())
        since = request.claimed_ns - self.clock_margin_ns
        matches = [w for w in data
                   if str(w.get("uuid")) not in taken and w.get("net_type") == request.network
                   and Decimal(str(w.get("amount"))) == request.amount
                   and parse_time_ns(str(w["created_at"])) >= since]
        if not matches:
            return None
        return _withdrawal(min(matches, key=lambda w: parse_time_ns(str(w["created_at"]))))

    async def _find_deposit(self, asset: str, txid: str) -> DepositState | None:
        query = upbit_query_string([("currency", asset), ("txids[]", txid)])
        status, data = await self._send(self.limiter, 1, "GET", f"{self.base_url}/v1/deposits?{query}",
                                        headers=self._auth(query))
        if status != 200 or not isinstance(data, list):
            name, message = _error(data)
            raise ServerError(f"upbit: HTTP {status} {name} {message}".strip())
        for d in data:
            if d.get("txid") == txid:
                state = str(d.get("state", "")).upper()
                return DepositState(_DEPOSIT_STATE.get(state, "pending"), Decimal(str(d["amount"])), state)
        return None

    async def _balances(self) -> dict[str, tuple[Decimal, Decimal]]:
        status, data = await self._send(self.limiter, 1, "GET", f"{self.base_url}/v1/accounts",
                                        headers=self._auth(""))
        if status != 200 or not isinstance(data, list):
            name, message = _error(data)
            raise ServerError(f"upbit: HTTP {status} {name} {message}".strip())
        return {str(a["currency"]): (Decimal(str(a["balance"])), Decimal(str(a["locked"]))) for a in data}

    def _result(self, data: dict[str, Any], order: PreparedOrder) -> VenueResult:
        state = str(data.get("state", ""))
        volume = Decimal(str(data.get("volume") or order.leg.quantity))
        executed = Decimal(str(data.get("executed_volume") or "0"))
        fills = _fills(data, order.instrument.quote)
        if state in ("wait", "watch"):
            open_status: OrderStatus = "PARTIALLY_FILLED" if executed > 0 else "NEW"
            return VenueResult(open_status, fills, "", str(data.get("uuid", "")))
        if state == "done" or (state == "cancel" and executed == volume and executed > 0):
            return VenueResult("FILLED", fills, "", str(data.get("uuid", "")))
        if state == "cancel":
            reason = "IOC: rest cancelled by the exchange" if executed > 0 else "IOC: nothing filled"
            return VenueResult("CANCELED", fills, reason, str(data.get("uuid", "")))
        raise ValueError(f"upbit: unknown order state {state!r}")


def _fills(data: dict[str, Any], quote: str) -> tuple[VenueFill, ...]:
    trades = data.get("trades") or []
    if not trades:
        return ()
    paid = Decimal(str(data.get("paid_fee") or "0"))
    funds = [Decimal(str(t.get("funds") or Decimal(str(t["price"])) * Decimal(str(t["volume"])))) for t in trades]
    total = sum(funds, Decimal(0))
    fees: list[Decimal] = []
    for i, f in enumerate(funds):
        if i == len(funds) - 1:
            fees.append(paid - sum(fees, Decimal(0)))
        else:
            fees.append((paid * f / total).quantize(_FEE_QUANTUM, rounding=ROUND_HALF_EVEN) if total else Decimal(0))
    return tuple(
        VenueFill(str(t["uuid"]), Decimal(str(t["price"])), Decimal(str(t["volume"])), fee, quote,
                  parse_time_ns(str(t["created_at"])) if t.get("created_at") else 0)
        for t, fee in zip(trades, fees, strict=True))


def _withdrawal(data: dict[str, Any]) -> WithdrawalState:
    state = str(data.get("state", "")).upper()
    fee = data.get("fee")
    return WithdrawalState(str(data["uuid"]), _WITHDRAW_STATE.get(state, "pending"), Decimal(str(data["amount"])),
                           Decimal(str(fee)) if fee not in (None, "") else None, str(data.get("txid") or ""), state)


def _error(data: Any) -> tuple[str, str]:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return str(err.get("name", "")), str(err.get("message", ""))
    return "", ""
