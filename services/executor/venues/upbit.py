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
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import msgspec

from services.executor.markets import PreparedOrder
from services.executor.ratelimit import RateLimiter
from services.executor.signing import upbit_query_string, upbit_token
from services.executor.venues.base import HttpVenue, ServerError, VenueFill, VenueResult, fmt_decimal, parse_time_ns
from shared.config import Secret
from shared.models import OrderStatus

_FEE_QUANTUM = Decimal("1e-8")


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


def _error(data: Any) -> tuple[str, str]:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return str(err.get("name", "")), str(err.get("message", ""))
    return "", ""
