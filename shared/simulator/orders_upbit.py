"""Upbit order endpoints (``docs.upbit.com/kr/reference``: new-order, get-order, auth,
rate-limits) for the simulator.

- ``POST /v1/orders`` (JSON body; group ``order``) answers 201 with the order still ``wait``,
  as Upbit does; ``GET /v1/order?identifier=|uuid=`` (group ``default``) answers the final
  order with its ``trades`` and ``paid_fee`` (quote currency, exact), or 404
  ``order_not_found``. An IOC with a remainder ends ``cancel``, a complete one ``done``.
- Every request carries ``Authorization: Bearer <JWT>``, verified here independently of the
  client: HS512 with the access key's secret (as given, not base64-decoded), a nonce never
  seen before, and ``query_hash`` = SHA-512 of the unencoded query string (GET) or of the
  JSON body as ``key=value&...`` in the body's key order (POST).
- ``identifier`` can be used once, ever: a second order request with it gets
  ``duplicate_identifier`` (the error name is this simulator's; Upbit's exact name is not
  documented in the pages we read).
- Requests per second per group with ``Remaining-Req: group=..; min=..; sec=N``; over the
  limit a 429; a request within the second after a 429 gets a 418 block (with
  ``Retry-After``).

Wallet endpoints (``reference/디지털자산-출금하기``, ``개별-출금-조회``, ``list-withdrawals``,
``입금-리스트-조회``, ``전체-계좌-조회``), group ``default``, signed the same way:
- ``POST /v1/withdraws/coin`` JSON ``currency, net_type, amount, address, secondary_address,
  transaction_type``: the withdrawal (``uuid``, ``state`` ``WAITING``); the fee is charged on
  top of ``amount``. No client-side id exists for withdrawals.
- ``GET /v1/withdraw?uuid=``, ``GET /v1/withdraws?currency=&limit=&order_by=`` (newest first):
  ``state`` ``WAITING``/``PROCESSING``/``DONE``/``FAILED``, ``txid`` once done.
- ``GET /v1/deposits?currency=&txids[]=``: ``state`` ``ACCEPTED`` once credited.
- ``GET /v1/accounts``: ``[{currency, balance, locked, avg_buy_price, ...}]``.
- Error names for refused withdrawals and unknown uuids (``insufficient_funds_withdraw``,
  ``invalid_withdraw``, ``withdraw_not_found``) are this simulator's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import parse_qs, parse_qsl, unquote

from aiohttp import web

from shared.simulator.orders import (
    OrderRequest,
    SimDeposit,
    SimOrder,
    SimulatedExchange,
    SimWithdrawal,
    hold_then_cut,
)

KST = timezone(timedelta(hours=9))


def upbit_exchange(*, fee_rate: Decimal = Decimal("0.0005"), deplete: bool = False) -> SimulatedExchange:
    def fee_rule(side: Literal["buy", "sell"], price: Decimal, qty: Decimal, base: str,
                 quote: str) -> tuple[Decimal, str]:
        return price * qty * fee_rate, quote

    return SimulatedExchange("upbit", fee_rate=fee_rate, fee_rule=fee_rule, deplete=deplete)


def _error(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"name": name, "message": message}}, status=status, headers=headers)


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, secrets: dict[str, str]) -> dict[str, Any]:
    """Claims of a valid HS512 token signed with its access key's secret; ValueError otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("malformed token")
    header, claims = json.loads(_b64(parts[0])), json.loads(_b64(parts[1]))
    if not isinstance(header, dict) or header.get("alg") != "HS512" or not isinstance(claims, dict):
        raise ValueError("not an HS512 token")
    secret = secrets.get(str(claims.get("access_key", "")))
    if secret is None:
        raise ValueError("unknown access key")
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha512).digest()
    if not hmac.compare_digest(expected, _b64(parts[2])):
        raise ValueError("signature does not match")
    return claims


def body_query_string(body: dict[str, Any]) -> str:
    parts = []
    for key, value in body.items():
        if isinstance(value, list):
            parts += [f"{key if key.endswith('[]') else key + '[]'}={v}" for v in value]
        elif value is not None:
            parts.append(f"{key}={value}")
    return "&".join(parts)


class _Limits:
    def __init__(self, per_second: dict[str, int], block_s: float) -> None:
        self.per_second = per_second
        self.block_s = block_s
        self.second: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.last_429 = -10.0
        self.blocked_until = 0.0

    def gate(self, ex: SimulatedExchange, group: str) -> web.Response | None:
        now = time.time()
        if now < self.blocked_until:
            ex.requests["banned"] += 1
            return _error(418, "too_many_requests", "blocked",
                          {"Retry-After": str(int(self.blocked_until - now) + 1)})
        if now - self.last_429 < 1.0:  # kept sending in the second after a 429
            self.blocked_until = now + self.block_s
            ex.requests["banned"] += 1
            return _error(418, "too_many_requests", "blocked", {"Retry-After": f"{self.block_s:g}"})
        sec = int(now)
        if self.second.get(group) != sec:
            self.second[group], self.count[group] = sec, 0
        self.count[group] += 1
        if self.count[group] > self.per_second[group]:
            return self.throttle(ex, group)
        return None

    def throttle(self, ex: SimulatedExchange, group: str) -> web.Response:
        self.last_429 = time.time()
        ex.requests["throttled"] += 1
        return _error(429, "too_many_requests", "Too many API requests.", self.headers(group))

    def headers(self, group: str) -> dict[str, str]:
        left = max(0, self.per_second[group] - self.count.get(group, 0))
        return {"Remaining-Req": f"group={group}; min=1800; sec={left}"}


def add_upbit_routes(app: web.Application, ex: SimulatedExchange, *, orders_per_second: int = 8,
                     requests_per_second: int = 30, block_s: float = 10.0) -> None:
    limits = _Limits({"order": orders_per_second, "default": requests_per_second}, block_s)
    nonces: set[str] = set()
    burned: set[str] = set()

    def authenticate(request: web.Request, query: str) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return _error(401, "no_authorization_token", "Authorization token does not exist.")
        try:
            claims = verify_jwt(auth[len("Bearer "):], ex.credentials)
        except (ValueError, json.JSONDecodeError):
            return _error(401, "jwt_verification", "Failed to verify Jwt token.")
        nonce = str(claims.get("nonce", ""))
        if not nonce or nonce in nonces:
            return _error(401, "nonce_used", "The nonce has already been used.")
        nonces.add(nonce)
        if query and claims.get("query_hash") != hashlib.sha512(query.encode()).hexdigest():
            return _error(401, "invalid_query_payload", "query_hash does not match the request.")
        return None

    async def new_order(request: web.Request) -> web.StreamResponse:
        ex.requests["order"] += 1
        gated = limits.gate(ex, "order")
        if gated is not None:
            return gated
        try:
            body = json.loads(await request.text(), parse_float=Decimal)
        except json.JSONDecodeError:
            return _error(400, "invalid_parameter_format", "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_parameter_format", "body is not an object")
        denied = authenticate(request, body_query_string(body))
        if denied is not None:
            return denied
        try:
            market, side = str(body["market"]), {"bid": "buy", "ask": "sell"}[body["side"]]
            price, volume = Decimal(str(body["price"])), Decimal(str(body["volume"]))
            ident = str(body["identifier"])
        except (KeyError, ArithmeticError):
            return _error(400, "invalid_parameter", "market, side, price, volume and identifier are required")
        if body.get("ord_type") != "limit":
            return _error(400, "invalid_parameter", "only limit orders are simulated")
        if market not in ex.markets:
            return _error(404, "market_does_not_exist", "market does not exist")
        if ident in burned:
            return _error(400, "duplicate_identifier", "identifier already used", limits.headers("order"))
        info = OrderRequest("upbit", ident, request.transport.get_extra_info("peername") if request.transport else None)
        if ex.hook is not None and await ex.hook("received", info):
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=504)
        burned.add(ident)
        fault = ex.take_fault(ident)
        kind = fault.kind if fault else None
        if fault is not None and kind in ("http_429", "http_418"):
            burned.discard(ident)  # refused at the gate: the identifier never reached the order service
            if kind == "http_418":
                limits.blocked_until = time.time() + fault.retry_after_s
                ex.requests["banned"] += 1
                return _error(418, "too_many_requests", "blocked", {"Retry-After": f"{fault.retry_after_s:g}"})
            return limits.throttle(ex, "order")
        if kind == "reject" or ex.lacks_funds(market, side, price, volume):  # type: ignore[arg-type]
            name = "insufficient_funds_bid" if side == "buy" else "insufficient_funds_ask"
            return _error(400, name, "주문가능한 금액이 부족합니다.", limits.headers("order"))
        if fault is not None and kind == "timeout_before_accept":
            return await hold_then_cut(request, fault)
        tif = str(body.get("time_in_force") or "gtc")
        order = ex.place(client_order_id=ident, symbol=market, side=side,  # type: ignore[arg-type]
                         price=price, quantity=volume, time_in_force=tif,
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
            return _error(500, "server_error", "internal error")
        doc = _order_doc(order, final=False)
        return web.json_response(doc, status=201, headers=limits.headers("order"))

    async def get_order(request: web.Request) -> web.Response:
        ex.requests["query"] += 1
        gated = limits.gate(ex, "default")
        if gated is not None:
            return gated
        query = unquote(request.query_string)
        denied = authenticate(request, query)
        if denied is not None:
            return denied
        params = dict(parse_qsl(query))
        order = ex.orders.get(params.get("identifier", ""))
        if order is None and "uuid" in params:
            order = next((o for o in ex.orders.values() if o.uuid == params["uuid"]), None)
        if order is None:
            return _error(404, "order_not_found", "주문을 찾지 못했습니다.", limits.headers("default"))
        return web.json_response(_order_doc(order, final=True), headers=limits.headers("default"))

    async def signed_query(request: web.Request) -> dict[str, str] | web.Response:
        gated = limits.gate(ex, "default")
        if gated is not None:
            return gated
        query = unquote(request.query_string)
        denied = authenticate(request, query)
        if denied is not None:
            return denied
        ex.settle()
        return dict(parse_qsl(query))

    async def accounts(request: web.Request) -> web.Response:
        ex.requests["account"] += 1
        params = await signed_query(request)
        if isinstance(params, web.Response):
            return params
        return web.json_response([
            {"currency": a, "balance": _s(v), "locked": "0", "avg_buy_price": "0", "avg_buy_price_modified": False,
             "unit_currency": "KRW"} for a, v in sorted(ex.balances.items())], headers=limits.headers("default"))

    async def withdraw_coin(request: web.Request) -> web.StreamResponse:
        ex.requests["withdraw"] += 1
        gated = limits.gate(ex, "default")
        if gated is not None:
            return gated
        try:
            body = json.loads(await request.text(), parse_float=Decimal)
        except json.JSONDecodeError:
            return _error(400, "invalid_parameter_format", "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_parameter_format", "body is not an object")
        denied = authenticate(request, body_query_string(body))
        if denied is not None:
            return denied
        try:
            currency, net_type = str(body["currency"]), str(body["net_type"])
            amount, address = Decimal(str(body["amount"])), str(body["address"])
        except (KeyError, ArithmeticError):
            return _error(400, "invalid_parameter", "currency, net_type, amount and address are required")
        fault = ex.take_withdrawal_fault("")
        kind = fault.kind if fault else None
        if fault is not None and kind in ("http_429", "http_418"):
            if kind == "http_418":
                limits.blocked_until = time.time() + fault.retry_after_s
                ex.requests["banned"] += 1
                return _error(418, "too_many_requests", "blocked", {"Retry-After": f"{fault.retry_after_s:g}"})
            return limits.throttle(ex, "default")
        if kind == "reject":
            return _error(400, "insufficient_funds_withdraw", "출금가능 수량이 부족합니다.", limits.headers("default"))
        if fault is not None and kind == "timeout_before_accept":
            return await hold_then_cut(request, fault)
        accepted = ex.withdraw(client_id="", asset=currency, network=net_type, address=address,
                               memo=str(body.get("secondary_address") or ""), amount=amount,
                               fails=kind == "fail_after_accept")
        if isinstance(accepted, str):
            name = "insufficient_funds_withdraw" if accepted.startswith("insufficient") else "invalid_withdraw"
            return _error(400, name, accepted, limits.headers("default"))
        if fault is not None and kind == "timeout_after_accept":
            return await hold_then_cut(request, fault)
        if kind == "disconnect_after_accept":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=504)
        if kind == "http_500_after_accept":
            return _error(500, "server_error", "internal error")
        return web.json_response(_withdrawal_doc(accepted, submitted=True), status=201,
                                 headers=limits.headers("default"))

    async def get_withdrawal(request: web.Request) -> web.Response:
        ex.requests["withdraw_history"] += 1
        params = await signed_query(request)
        if isinstance(params, web.Response):
            return params
        found = next((w for w in ex.withdrawals if w.withdrawal_id == params.get("uuid")
                      or (w.txid and w.txid == params.get("txid"))), None)
        if found is None:
            return _error(404, "withdraw_not_found", "출금 내역을 찾지 못했습니다.", limits.headers("default"))
        return web.json_response(_withdrawal_doc(found), headers=limits.headers("default"))

    async def list_withdrawals(request: web.Request) -> web.Response:
        ex.requests["withdraw_history"] += 1
        params = await signed_query(request)
        if isinstance(params, web.Response):
            return params
        uuids = set(parse_qs(unquote(request.query_string)).get("uuids[]", []))
        found = [w for w in ex.withdrawals if params.get("currency", w.asset) == w.asset
                 and (not uuids or w.withdrawal_id in uuids)]
        if params.get("order_by", "desc") == "desc":
            found.reverse()
        limit = int(params.get("limit", "100"))
        return web.json_response([_withdrawal_doc(w) for w in found[:limit]], headers=limits.headers("default"))

    async def list_deposits(request: web.Request) -> web.Response:
        ex.requests["deposit_history"] += 1
        params = await signed_query(request)
        if isinstance(params, web.Response):
            return params
        txids = set(parse_qs(unquote(request.query_string)).get("txids[]", []))
        found = [d for d in reversed(ex.deposits) if params.get("currency", d.asset) == d.asset
                 and (not txids or d.txid in txids)]
        return web.json_response([_deposit_doc(d) for d in found], headers=limits.headers("default"))

    app.router.add_post("/v1/orders", new_order)
    app.router.add_get("/v1/order", get_order)
    app.router.add_get("/v1/accounts", accounts)
    app.router.add_post("/v1/withdraws/coin", withdraw_coin)
    app.router.add_get("/v1/withdraw", get_withdrawal)
    app.router.add_get("/v1/withdraws", list_withdrawals)
    app.router.add_get("/v1/deposits", list_deposits)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(KST).isoformat(timespec="milliseconds")


def _s(value: Decimal) -> str:
    return f"{value.normalize():f}"


_WITHDRAW_STATE = {"processing": "PROCESSING", "done": "DONE", "failed": "FAILED"}


def _withdrawal_doc(w: SimWithdrawal, *, submitted: bool = False) -> dict[str, Any]:
    return {
        "type": "withdraw", "uuid": w.withdrawal_id, "currency": w.asset, "net_type": w.network,
        "txid": w.txid or None, "state": "WAITING" if submitted else _WITHDRAW_STATE[w.status],
        "created_at": _iso(w.created_ms), "done_at": _iso(w.done_ms) if w.done_ms else None,
        "amount": _s(w.amount), "fee": _s(w.fee), "transaction_type": "default", "is_cancelable": False,
    }


def _deposit_doc(d: SimDeposit) -> dict[str, Any]:
    return {
        "type": "deposit", "uuid": d.deposit_id, "currency": d.asset, "net_type": d.network, "txid": d.txid,
        "state": "ACCEPTED", "created_at": _iso(d.created_ms), "done_at": _iso(d.created_ms),
        "amount": _s(d.amount), "fee": "0", "transaction_type": "default",
    }


def _order_doc(order: SimOrder, *, final: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "uuid": order.uuid, "side": "bid" if order.side == "buy" else "ask", "ord_type": "limit",
        "price": _s(order.price), "state": "wait", "market": order.symbol, "created_at": _iso(order.created_ms),
        "volume": _s(order.quantity), "remaining_volume": _s(order.quantity), "reserved_fee": "0",
        "remaining_fee": "0", "paid_fee": "0", "locked": "0", "executed_volume": "0", "trades_count": 0,
        "time_in_force": order.time_in_force.lower(), "identifier": order.client_order_id,
    }
    if not final:
        return doc
    doc.update({
        "state": "done" if order.status == "filled" else "cancel",
        "remaining_volume": _s(order.quantity - order.executed), "executed_volume": _s(order.executed),
        "paid_fee": _s(order.fee), "trades_count": len(order.trades),
        "trades": [{"market": order.symbol, "uuid": t.uuid, "price": _s(t.price), "volume": _s(t.quantity),
                    "funds": _s(t.price * t.quantity), "trend": "up" if order.side == "buy" else "down",
                    "created_at": _iso(t.ts_ms), "side": "bid" if order.side == "buy" else "ask"}
                   for t in order.trades],
    })
    return doc
