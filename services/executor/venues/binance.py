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

Wallet (``developers.binance.com/docs/wallet/capital``):
- Withdraw: ``POST /sapi/v1/capital/withdraw/apply`` ``coin, withdrawOrderId, network,
  address, addressTag, amount, walletType=0 (spot), recvWindow, timestamp`` -> ``{"id"}``
  (UID weight 900). The
  fee comes out of ``amount`` (what arrives is ``amount - fee``: not stated in Binance's
  pages; taken from an integration that had to add the fee to deliver the full amount).
- Look up: ``GET /sapi/v1/capital/withdraw/history`` by ``withdrawOrderId`` (or ``idList``);
  ``status`` 0 email sent, 2 awaiting approval, 4 processing (pending); 6 completed; 1
  cancelled, 3 rejected, 5 failure. ``recvWindow`` is the time left until the request's
  deadline, as for orders.
- Deposits: ``GET /sapi/v1/capital/deposit/hisrec?coin&txId``: ``status`` 1 success and 6
  credited (cannot withdraw yet) are credited; 2 rejected, 7 wrong deposit failed; 0, 8 pending.
- Balances: ``GET /api/v3/account?omitZeroBalances=true`` (weight 20) ``balances[]``.
- SAPI weights count against their own budget: 180,000 per second per IP (the withdraw
  history page), apart from the order endpoints' per-minute weight.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from services.executor.markets import PreparedOrder
from services.executor.ratelimit import RateLimiter
from services.executor.signing import binance_signature
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
)
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


_WITHDRAW_STATUS: dict[int, WalletStatus] = {0: "pending", 2: "pending", 4: "pending", 6: "done", 1: "failed",
                                            3: "failed", 5: "failed"}
_DEPOSIT_STATUS: dict[int, WalletStatus] = {0: "pending", 8: "pending", 1: "done", 6: "done", 2: "failed",
                                           7: "failed"}


class BinanceVenue(HttpVenue):
    name = "binance"
    fee_in_amount = True

    def __init__(self, *, api_key: Secret, api_secret: Secret, weight_per_minute: int = 6000,
                 sapi_weight_per_second: int = 180_000, **kw: Any) -> None:
        super().__init__(**kw)
        self._key = api_key
        self._secret = api_secret
        self.limiter = RateLimiter("binance", capacity=weight_per_minute, window_s=60.0, default_retry_after_s=10.0)
        self.sapi = RateLimiter("binance.sapi", capacity=sapi_weight_per_second, window_s=1.0,
                                default_retry_after_s=10.0)

    def limiters(self) -> list[RateLimiter]:
        return [self.limiter, self.sapi]

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

    # ------------------------------------------------------------------ wallet

    async def _withdraw(self, request: WithdrawalRequest) -> WithdrawalState | None:
        now_ms = self.clock_ns() // 1_000_000
        window = min(MAX_RECV_WINDOW_MS, request.not_after_ns // 1_000_000 - now_ms)
        if window < 1:
            raise WithdrawalRefused("deadline passed before the withdrawal could be sent")
        params = [("coin", request.asset), ("withdrawOrderId", request.client_id), ("network", request.network),
                  ("address", request.address)]
        if request.memo:  # networks without tags refuse an addressTag, even an empty one
            params.append(("addressTag", request.memo))
        # walletType 0: the spot wallet, where the inventory is traded and /api/v3/account reads
        params += [("amount", fmt_decimal(request.amount)), ("walletType", "0"), ("recvWindow", str(window)),
                   ("timestamp", str(now_ms))]
        status, data = await self._send(self.sapi, 900, "POST", f"{self.base_url}/sapi/v1/capital/withdraw/apply",
                                        headers=self._headers(form=True), data=self._signed(params),
                                        deadline_ns=request.not_after_ns)
        if status == 200 and isinstance(data, dict) and data.get("id"):
            return WithdrawalState(str(data["id"]), "pending", request.amount, None, "", "accepted")
        code, msg = _error(data)
        if code in _UNKNOWN_CODES or not code:
            return None  # no Binance error: we cannot tell whether it was processed
        raise WithdrawalRefused(f"binance {code}: {msg}")

    async def _find_withdrawal(self, request: WithdrawalRequest, withdrawal_id: str,
                               taken: frozenset[str]) -> WithdrawalState | None:
        params = [("coin", request.asset)]
        params.append(("idList", withdrawal_id) if withdrawal_id else ("withdrawOrderId", request.client_id))
        params.append(("timestamp", str(self.clock_ns() // 1_000_000)))
        status, data = await self._send(self.sapi, 18_000, "GET", f"{self.base_url}/sapi/v1/capital/withdraw/history?"
                                        f"{self._signed(params).decode()}", headers=self._headers(form=False))
        if status != 200 or not isinstance(data, list):
            code, msg = _error(data)
            raise _unknown(status, code, msg)
        for w in data:
            if (withdrawal_id and str(w.get("id")) == withdrawal_id) or (
                    not withdrawal_id and w.get("withdrawOrderId") == request.client_id):
                raw = int(w["status"])
                info = str(w.get("info") or "")
                return WithdrawalState(str(w["id"]), _WITHDRAW_STATUS.get(raw, "pending"),
                                       Decimal(str(w["amount"])), Decimal(str(w.get("transactionFee") or "0")),
                                       str(w.get("txId") or ""), f"status {raw}" + (f": {info}" if info else ""))
        return None

    async def _find_deposit(self, asset: str, txid: str) -> DepositState | None:
        params = [("coin", asset), ("txId", txid), ("timestamp", str(self.clock_ns() // 1_000_000))]
        status, data = await self._send(self.sapi, 1, "GET", f"{self.base_url}/sapi/v1/capital/deposit/hisrec?"
                                        f"{self._signed(params).decode()}", headers=self._headers(form=False))
        if status != 200 or not isinstance(data, list):
            code, msg = _error(data)
            raise _unknown(status, code, msg)
        for d in data:
            if d.get("txId") == txid and d.get("coin", asset) == asset:
                raw = int(d["status"])
                return DepositState(_DEPOSIT_STATUS.get(raw, "pending"), Decimal(str(d["amount"])), f"status {raw}")
        return None

    async def _balances(self) -> dict[str, tuple[Decimal, Decimal]]:
        params = [("omitZeroBalances", "true"), ("timestamp", str(self.clock_ns() // 1_000_000))]
        status, data = await self._send(self.limiter, 20, "GET",
                                        f"{self.base_url}/api/v3/account?{self._signed(params).decode()}",
                                        headers=self._headers(form=False))
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("balances"), list):
            code, msg = _error(data)
            raise _unknown(status, code, msg)
        return {str(b["asset"]): (Decimal(str(b["free"])), Decimal(str(b["locked"]))) for b in data["balances"]}

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
