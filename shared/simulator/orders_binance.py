"""Binance spot order endpoints (``binance-spot-api-docs/rest-api.md``) for the simulator.

- ``POST /api/v3/order`` (weight 1), ``GET /api/v3/order`` (weight 4), ``GET /api/v3/myTrades``
  (weight 5); answers in Binance's JSON (FULL order responses with ``fills``; errors as
  ``{"code": -NNNN, "msg": ...}``).
- Signed requests are checked as Binance documents them: the key in ``X-MBX-APIKEY`` must be
  known; ``signature`` = hex HMAC-SHA256 of the query string concatenated with the body
  (the signature parameter itself removed) under that key's secret (``-1022`` otherwise);
  ``timestamp`` within ``recvWindow`` (default 5000) and not more than 1 s ahead (``-1021``).
- Request weight per minute with ``X-MBX-USED-WEIGHT-1M`` on every answer; over the limit a
  429 with ``Retry-After``; any request before that back-off is over gets a 418 ban.
- Commission in the asset received (buy: base, sell: quote), at the exchange's fee rate,
  exact (no rounding to the asset's precision).
- An IOC/FOK that did not fill completely ends ``EXPIRED``, as on Binance.

Wallet endpoints (``developers.binance.com/docs/wallet``), signed the same way:
- ``POST /sapi/v1/capital/withdraw/apply`` (UID weight 900): ``coin, network, address,
  addressTag, amount, withdrawOrderId`` -> ``{"id": ...}``; the fee comes out of ``amount``.
- ``GET /sapi/v1/capital/withdraw/history`` (weight 18000; ``coin``, ``withdrawOrderId``,
  ``idList``): ``status`` 4 processing, 6 completed, 5 failure, with ``txId`` once done.
- ``GET /sapi/v1/capital/deposit/hisrec`` (weight 1; ``coin``, ``txId``): ``status`` 1 success.
- ``GET /api/v3/account`` (weight 20; ``omitZeroBalances``): ``balances[] {asset, free, locked}``.
- SAPI weight is counted per second (180,000, the documented per-IP second limit) apart
  from the order endpoints' per-minute weight. Error codes for refused withdrawals
  (``-4026`` no funds, ``-4019`` network or amount) are this simulator's choice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qsl

from aiohttp import web

from shared.simulator.orders import Fault, OrderRequest, SimOrder, SimulatedExchange, SimWithdrawal, hold_then_cut

_SIGNATURE = re.compile(r"(?:^|&)signature=([0-9a-fA-F]*)$")


def binance_exchange(*, fee_rate: Decimal = Decimal("0.001"), deplete: bool = False) -> SimulatedExchange:
    def fee_rule(side: Literal["buy", "sell"], price: Decimal, qty: Decimal, base: str,
                 quote: str) -> tuple[Decimal, str]:
        return (qty * fee_rate, base) if side == "buy" else (price * qty * fee_rate, quote)

    ex = SimulatedExchange("binance", fee_rate=fee_rate, fee_rule=fee_rule, deplete=deplete)
    ex.fee_in_amount = True
    return ex


def _fmt(value: Decimal) -> str:
    # Binance prints 8 decimals; values with more digits (exact commissions) print in full.
    exponent = value.as_tuple().exponent
    return f"{value:.8f}" if isinstance(exponent, int) and exponent >= -8 else f"{value.normalize():f}"


def _error(status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=status, headers=headers)


class _Limits:
    def __init__(self, weight_per_minute: int, ban_s: float, window_s: float = 60.0,
                 header: str = "X-MBX-USED-WEIGHT-1M") -> None:
        self.weight_per_minute = weight_per_minute
        """Weight allowed per window (a minute for the order endpoints)."""
        self.window_s = window_s
        self.header = header
        self.ban_s = ban_s
        self.minute = -1
        self.used = 0
        self.backoff_until = 0.0
        self.banned_until = 0.0

    def gate(self, ex: SimulatedExchange, weight: int) -> web.Response | None:
        now = time.time()
        if now < self.banned_until:
            ex.requests["banned"] += 1
            return _error(418, -1003, "Way too much request weight used; IP banned.",
                          {"Retry-After": str(int(self.banned_until - now) + 1)})
        if now < self.backoff_until:  # came back before the Retry-After was over: banned
            self.banned_until = now + self.ban_s
            ex.requests["banned"] += 1
            return _error(418, -1003, "Way too much request weight used; IP banned.",
                          {"Retry-After": str(int(self.ban_s))})
        minute = int(now // self.window_s)
        if minute != self.minute:
            self.minute, self.used = minute, 0
        self.used += weight
        if self.used > self.weight_per_minute:
            return self.throttle(ex, (minute + 1) * self.window_s - now)
        return None

    def throttle(self, ex: SimulatedExchange, retry_after_s: float) -> web.Response:
        self.backoff_until = time.time() + retry_after_s
        ex.requests["throttled"] += 1
        return _error(429, -1003, "Too much request weight used.",
                      {"Retry-After": f"{retry_after_s:g}", self.header: str(self.used)})

    def headers(self) -> dict[str, str]:
        return {self.header: str(self.used)}


def add_binance_routes(app: web.Application, ex: SimulatedExchange, *, weight_per_minute: int = 6000,
                       ban_s: float = 120.0, sapi_weight_per_second: int = 180_000) -> None:
    limits = _Limits(weight_per_minute, ban_s)
    sapi = _Limits(sapi_weight_per_second, ban_s, window_s=1.0, header="X-SAPI-USED-IP-WEIGHT-1S")

    def authenticate(request: web.Request, body: str) -> dict[str, str] | web.Response:
        secret = ex.credentials.get(request.headers.get("X-MBX-APIKEY", ""))
        if secret is None:
            return _error(401, -2015, "Invalid API-key, IP, or permissions for action.")
        query = request.query_string
        signature = ""
        parts = []
        for part in (query, body):
            m = _SIGNATURE.search(part)
            if m:
                signature = m.group(1)
                part = part[: m.start()]
            parts.append(part)
        expected = hmac.new(secret.encode(), "".join(parts).encode(), hashlib.sha256).hexdigest()
        if not signature or not hmac.compare_digest(signature.lower(), expected):
            return _error(400, -1022, "Signature for this request is not valid.")
        params = dict(parse_qsl(parts[0]) + parse_qsl(parts[1]))
        try:
            ts, window = int(params["timestamp"]), int(params.get("recvWindow", "5000"))
        except (KeyError, ValueError):
            return _error(400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.")
        server = int(time.time() * 1000)
        if window > 60_000:
            return _error(400, -1131, "recvWindow must be less than 60000")
        if not (ts < server + 1000 and server - ts <= window):
            return _error(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        return params

    async def new_order(request: web.Request) -> web.StreamResponse:
        ex.requests["order"] += 1
        gated = limits.gate(ex, 1)
        if gated is not None:
            return gated
        params = authenticate(request, await request.text())
        if isinstance(params, web.Response):
            return params
        try:
            cid = params["newClientOrderId"]
            symbol, side = params["symbol"], params["side"].lower()
            price, quantity = Decimal(params["price"]), Decimal(params["quantity"])
            tif = params.get("timeInForce", "GTC")
        except (KeyError, ArithmeticError):
            return _error(400, -1102, "Mandatory parameter was not sent, was empty/null, or malformed.")
        if symbol not in ex.markets:
            return _error(400, -1121, "Invalid symbol.")
        if side not in ("buy", "sell") or params.get("type") != "LIMIT":
            return _error(400, -1116, "Invalid orderType.")
        info = OrderRequest("binance", cid, request.transport.get_extra_info("peername") if request.transport else None)
        if ex.hook is not None and await ex.hook("received", info):
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=504)
        fault = ex.take_fault(cid)
        kind = fault.kind if fault else None
        if fault is not None and kind in ("http_429", "http_418"):
            if kind == "http_418":
                limits.banned_until = time.time() + fault.retry_after_s
                ex.requests["banned"] += 1
                return _error(418, -1003, "IP banned.", {"Retry-After": f"{fault.retry_after_s:g}"})
            return limits.throttle(ex, fault.retry_after_s)
        if kind == "reject" or ex.lacks_funds(symbol, side, price, quantity):  # type: ignore[arg-type]
            return _error(400, -2010, "Account has insufficient balance for requested action.", limits.headers())
        if fault is not None and kind == "timeout_before_accept":
            return await hold_then_cut(request, fault)
        order = ex.place(client_order_id=cid, symbol=symbol, side=side,  # type: ignore[arg-type]
                         price=price, quantity=quantity, time_in_force=tif,
                         fill_ratio=fault.fill_ratio if fault and kind == "partial_fill" else None)
        if ex.hook is not None:
            await ex.hook("accepted", info)
        if fault is not None and kind == "timeout_after_accept":
            return await hold_then_cut(request, fault)
        if kind == "disconnect_after_accept":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=504)
        if kind == "http_500_after_accept":
            return _error(500, -1007, "Timeout waiting for response from backend server. Send status unknown; "
                                      "execution status unknown.")
        doc = _order_doc(order) | {"transactTime": order.created_ms, "fills": [
            {"price": _fmt(t.price), "qty": _fmt(t.quantity), "commission": _fmt(t.fee),
             "commissionAsset": t.fee_asset, "tradeId": t.trade_id} for t in order.trades]}
        return web.json_response(doc, headers=limits.headers())

    async def query_order(request: web.Request) -> web.Response:
        ex.requests["query"] += 1
        gated = limits.gate(ex, 4)
        if gated is not None:
            return gated
        params = authenticate(request, "")
        if isinstance(params, web.Response):
            return params
        order = ex.orders.get(params.get("origClientOrderId", ""))
        if order is None and "orderId" in params:
            order = next((o for o in ex.orders.values() if str(o.order_id) == params["orderId"]), None)
        if order is None or order.symbol != params.get("symbol"):
            return _error(400, -2013, "Order does not exist.", limits.headers())
        return web.json_response(_order_doc(order) | {"time": order.created_ms, "updateTime": order.created_ms,
                                                      "isWorking": False}, headers=limits.headers())

    async def my_trades(request: web.Request) -> web.Response:
        ex.requests["trades"] += 1
        gated = limits.gate(ex, 5)
        if gated is not None:
            return gated
        params = authenticate(request, "")
        if isinstance(params, web.Response):
            return params
        order = next((o for o in ex.orders.values() if str(o.order_id) == params.get("orderId")), None)
        trades = [] if order is None else [
            {"symbol": order.symbol, "id": t.trade_id, "orderId": order.order_id, "orderListId": -1,
             "price": _fmt(t.price), "qty": _fmt(t.quantity), "quoteQty": _fmt(t.price * t.quantity),
             "commission": _fmt(t.fee), "commissionAsset": t.fee_asset, "time": t.ts_ms,
             "isBuyer": order.side == "buy", "isMaker": False, "isBestMatch": True} for t in order.trades]
        return web.json_response(trades, headers=limits.headers())

    async def account(request: web.Request) -> web.Response:
        ex.requests["account"] += 1
        gated = limits.gate(ex, 20)
        if gated is not None:
            return gated
        params = authenticate(request, "")
        if isinstance(params, web.Response):
            return params
        ex.settle()
        omit = params.get("omitZeroBalances", "false") == "true"
        balances = [{"asset": a, "free": _fmt(v), "locked": _fmt(Decimal(0))}
                    for a, v in sorted(ex.balances.items()) if not (omit and v == 0)]
        return web.json_response({"makerCommission": 10, "takerCommission": 10, "canTrade": True,
                                  "canWithdraw": True, "canDeposit": True, "accountType": "SPOT",
                                  "updateTime": int(time.time() * 1000), "balances": balances,
                                  "permissions": ["SPOT"]}, headers=limits.headers())

    async def withdraw_apply(request: web.Request) -> web.StreamResponse:
        ex.requests["withdraw"] += 1
        gated = sapi.gate(ex, 900)
        if gated is not None:
            return gated
        params = authenticate(request, await request.text())
        if isinstance(params, web.Response):
            return params
        try:
            coin, address, amount = params["coin"], params["address"], Decimal(params["amount"])
        except (KeyError, ArithmeticError):
            return _error(400, -1102, "Mandatory parameter was not sent, was empty/null, or malformed.")
        cid = params.get("withdrawOrderId", "")
        fault = ex.take_withdrawal_fault(cid)
        kind = fault.kind if fault else None
        if fault is not None and kind in ("http_429", "http_418"):
            if kind == "http_418":
                sapi.banned_until = time.time() + fault.retry_after_s
                ex.requests["banned"] += 1
                return _error(418, -1003, "IP banned.", {"Retry-After": f"{fault.retry_after_s:g}"})
            return sapi.throttle(ex, fault.retry_after_s)
        if kind == "reject":
            return _error(400, -4026, "The user has insufficient balance available", sapi.headers())
        if fault is not None and kind == "timeout_before_accept":
            return await hold_then_cut(request, fault)
        accepted = ex.withdraw(client_id=cid, asset=coin, network=params.get("network", ""), address=address,
                               memo=params.get("addressTag", ""), amount=amount, fails=kind == "fail_after_accept")
        if isinstance(accepted, str):
            code = -4026 if accepted.startswith("insufficient") else -4019
            return _error(400, code, accepted, sapi.headers())
        if fault is not None and kind == "timeout_after_accept":
            return await hold_then_cut(request, fault)
        if kind == "disconnect_after_accept":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=504)
        if kind == "http_500_after_accept":
            return _error(500, -1007, "Timeout waiting for response from backend server.")
        return web.json_response({"id": accepted.withdrawal_id}, headers=sapi.headers())

    async def withdraw_history(request: web.Request) -> web.Response:
        ex.requests["withdraw_history"] += 1
        gated = sapi.gate(ex, 18_000)
        if gated is not None:
            return gated
        params = authenticate(request, "")
        if isinstance(params, web.Response):
            return params
        ex.settle()
        ids = set(params["idList"].split(",")) if params.get("idList") else None
        found = [w for w in ex.withdrawals
                 if params.get("coin", w.asset) == w.asset
                 and params.get("withdrawOrderId", w.client_id) == w.client_id
                 and (ids is None or w.withdrawal_id in ids)]
        return web.json_response([_withdrawal_doc(w) for w in reversed(found)], headers=sapi.headers())

    async def deposit_history(request: web.Request) -> web.Response:
        ex.requests["deposit_history"] += 1
        gated = sapi.gate(ex, 1)
        if gated is not None:
            return gated
        params = authenticate(request, "")
        if isinstance(params, web.Response):
            return params
        ex.settle()
        found = [d for d in ex.deposits
                 if params.get("coin", d.asset) == d.asset and params.get("txId", d.txid) == d.txid]
        return web.json_response([
            {"id": d.deposit_id, "amount": _fmt(d.amount), "coin": d.asset, "network": d.network, "status": 1,
             "address": d.address, "addressTag": d.memo, "txId": d.txid, "insertTime": d.created_ms,
             "completeTime": d.created_ms, "transferType": 0, "confirmTimes": "1/1", "unlockConfirm": 0,
             "walletType": 0} for d in reversed(found)], headers=sapi.headers())

    app.router.add_post("/api/v3/order", new_order)
    app.router.add_get("/api/v3/order", query_order)
    app.router.add_get("/api/v3/myTrades", my_trades)
    app.router.add_get("/api/v3/account", account)
    app.router.add_post("/sapi/v1/capital/withdraw/apply", withdraw_apply)
    app.router.add_get("/sapi/v1/capital/withdraw/history", withdraw_history)
    app.router.add_get("/sapi/v1/capital/deposit/hisrec", deposit_history)


_WITHDRAW_STATUS = {"processing": 4, "done": 6, "failed": 5}


def _withdrawal_doc(w: SimWithdrawal) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": w.withdrawal_id, "amount": _fmt(w.amount), "transactionFee": _fmt(w.fee), "coin": w.asset,
        "status": _WITHDRAW_STATUS[w.status], "address": w.address, "txId": w.txid,
        "applyTime": datetime.fromtimestamp(w.created_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "network": w.network, "transferType": 0, "confirmNo": 1 if w.status == "done" else 0, "walletType": 0,
    }
    if w.memo:
        doc["addressTag"] = w.memo
    if w.client_id:
        doc["withdrawOrderId"] = w.client_id
    if w.status == "failed":
        doc["info"] = "The withdrawal failed"
    if w.done_ms:
        doc["completeTime"] = datetime.fromtimestamp(w.done_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    return doc


def _order_doc(order: SimOrder) -> dict[str, Any]:
    return {
        "symbol": order.symbol, "orderId": order.order_id, "orderListId": -1, "clientOrderId": order.client_order_id,
        "price": _fmt(order.price), "origQty": _fmt(order.quantity), "executedQty": _fmt(order.executed),
        "cummulativeQuoteQty": _fmt(order.quote_executed),
        "status": "FILLED" if order.status == "filled" else "EXPIRED",
        "timeInForce": order.time_in_force, "type": "LIMIT", "side": order.side.upper(),
    }


__all__ = ["Fault", "add_binance_routes", "binance_exchange"]
