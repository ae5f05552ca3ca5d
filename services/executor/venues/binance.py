"""Binance spot over signed REST (``binance-spot-api-docs/rest-api.md``).

- Place: ``POST /api/v3/order`` as a form body ``symbol, side, type=LIMIT, timeInForce,
  quantity, price, newClientOrderId, newOrderRespType=FULL, recvWindow, timestamp`` plus
  ``signature``; the FULL answer lists the fills (price, qty, commission, commissionAsset,
  tradeId). Weight 1.
- ``recvWindow`` is the time left until the order's deadline, so Binance itself refuses a
  request that arrives later than that: an order not found after the deadline never traded.
- Look up: ``GET /api/v3/order?symbol&origClientOrderId`` (weight 4; ``-2013`` = no such
  order), then ``GET /api/v3/myTrades?symbol&orderId`` for the fills (weight 5).
- 5xx and ``-1006``/``-1007`` mean the execution status is unknown; "Duplicate order sent."
  means the client id is in use: both are looked up, not re-sent.
- IOC remainders end ``EXPIRED`` on Binance; here they are ``CANCELED`` (the rest cancelled).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from services.executor.markets import PreparedOrder
from services.executor.ratelimit import RateLimiter
from services.executor.signing import binance_signature
from services.executor.venues.base import HttpVenue, ServerError, VenueFill, VenueResult, fmt_decimal
from shared.config import Secret
from shared.models import OrderStatus

_STATUS: dict[str, OrderStatus] = {
    "NEW": "NEW",
    "PARTIALLY_FILLED": "PARTIALLY_FILLED",
    "FILLED": "FILLED",
    "CANCELED": "CANCELED",
    "PENDING_CANCEL": "CANCELED",
    "EXPIRED": "CANCELED",
    "EXPIRED_IN_MATCH": "CANCELED",
    "REJECTED": "REJECTED",
}
_UNKNOWN_CODES = {-1000, -1001, -1006, -1007}
_NO_SUCH_ORDER = -2013
MAX_RECV_WINDOW_MS = 60_000


class BinanceVenue(HttpVenue):
    name = "binance"

    def __init__(self, *, api_key: Secret, api_secret: Secret, weight_per_minute: int = 6000, **kw: Any) -> None:
        super().__init__(**kw)
        self._key = api_key
        self._secret = api_secret
        self.limiter = RateLimiter("binance", capacity=weight_per_minute, window_s=60.0, default_retry_after_s=10.0)

    def _signed(self, params: list[tuple[str, str]]) -> bytes:
        query = urlencode(params)
        return f"{query}&signature={binance_signature(self._secret.reveal(), query)}".encode()

    def _headers(self, form: bool) -> dict[str, str]:
        headers = {"X-MBX-APIKEY": self._key.reveal()}
        if form:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    async def _place(self, order: PreparedOrder, not_after_ns: int) -> VenueResult | None:
        leg = order.leg
        now_ms = self.clock_ns() // 1_000_000
        window = min(MAX_RECV_WINDOW_MS, not_after_ns // 1_000_000 - now_ms)
        if window < 1:
            return VenueResult("REJECTED", (), "deadline passed before the order could be sent")
        params = [
            ("symbol", order.instrument.native),
            ("side", leg.side.upper()),
            ("type", "LIMIT"),
            ("timeInForce", leg.time_in_force),
            ("quantity", fmt_decimal(leg.quantity)),
            ("price", fmt_decimal(leg.price)),
            ("newClientOrderId", leg.client_order_id),
            ("newOrderRespType", "FULL"),
            ("recvWindow", str(window)),
            ("timestamp", str(now_ms)),
        ]
        status, data = await self._send(self.limiter, 1, "POST", f"{self.base_url}/api/v3/order",
                                        headers=self._headers(form=True), data=self._signed(params),
                                        deadline_ns=not_after_ns)
        if status == 200 and isinstance(data, dict):
            fills = data.get("fills") or []
            if fills and all("tradeId" in f for f in fills):
                return self._result(data, [self._fill(f, int(data.get("transactTime", 0))) for f in fills])
            return await self._query(order)  # the answer lacks trade ids: read them from myTrades
        code, msg = _error(data)
        if code in _UNKNOWN_CODES or "Duplicate order" in msg:
            return None
        return VenueResult("REJECTED", (), f"binance {code}: {msg}" if code else f"binance HTTP {status}")

    async def _query(self, order: PreparedOrder) -> VenueResult | None:
        params = [("symbol", order.instrument.native), ("origClientOrderId", order.client_order_id),
                  ("timestamp", str(self.clock_ns() // 1_000_000))]
        status, data = await self._send(self.limiter, 4, "GET",
                                        f"{self.base_url}/api/v3/order?{self._signed(params).decode()}",
                                        headers=self._headers(form=False))
        if status != 200 or not isinstance(data, dict):
            code, msg = _error(data)
            if code == _NO_SUCH_ORDER:
                return None
            raise _unknown(status, code, msg)
        if Decimal(str(data.get("executedQty", "0"))) == 0:
            return self._result(data, [])
        params = [("symbol", order.instrument.native), ("orderId", str(data["orderId"])),
                  ("timestamp", str(self.clock_ns() // 1_000_000))]
        status, trades = await self._send(self.limiter, 5, "GET",
                                          f"{self.base_url}/api/v3/myTrades?{self._signed(params).decode()}",
                                          headers=self._headers(form=False))
        if status != 200 or not isinstance(trades, list):
            code, msg = _error(trades)
            raise _unknown(status, code, msg)
        return self._result(data, [
            VenueFill(str(t["id"]), Decimal(str(t["price"])), Decimal(str(t["qty"])), Decimal(str(t["commission"])),
                      str(t["commissionAsset"]), int(t.get("time", 0)) * 1_000_000)
            for t in trades])

    @staticmethod
    def _fill(f: dict[str, Any], ts_ms: int) -> VenueFill:
        return VenueFill(str(f["tradeId"]), Decimal(str(f["price"])), Decimal(str(f["qty"])),
                         Decimal(str(f["commission"])), str(f["commissionAsset"]), ts_ms * 1_000_000)

    @staticmethod
    def _result(data: dict[str, Any], fills: list[VenueFill]) -> VenueResult:
        raw = str(data.get("status", ""))
        status = _STATUS.get(raw)
        if status is None:
            raise ValueError(f"binance: unknown order status {raw!r}")
        reason = "IOC: rest cancelled by the exchange" if raw == "EXPIRED" else ""
        filled = sum((f.quantity for f in fills), Decimal(0))
        if status == "CANCELED" and filled == Decimal(str(data.get("origQty", "0"))):
            status = "FILLED"
        return VenueResult(status, tuple(fills), reason, str(data.get("orderId", "")))


def _error(data: Any) -> tuple[int, str]:
    if isinstance(data, dict) and "code" in data:
        return int(data["code"]), str(data.get("msg", ""))
    return 0, ""


def _unknown(status: int, code: int, msg: str) -> Exception:
    # An answer we cannot read leaves the order's state unknown: it is looked up again later.
    return ServerError(f"binance: HTTP {status} {code} {msg}".strip())
