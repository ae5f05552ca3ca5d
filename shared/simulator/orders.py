"""Simulated order entry: an in-memory matching engine per exchange, an order registry keyed by
client order id, injectable faults, and an aiohttp application serving the exchanges' own
REST order protocols (``orders_binance``, ``orders_upbit``) on 127.0.0.1.

What the tests read from it:
- ``submissions[client_order_id]``: how many order-placing requests with that client id
  reached the matching engine. More than one means a duplicate order on the exchange.
- ``orders[client_order_id]``: the order and its trades, as the exchange would report them.

Faults are queued with ``inject`` and consumed by the next matching order request:
reject, partial fill, 429 (with ``Retry-After``) / 418, 500 after the order was accepted,
no answer after the order was accepted (timeout), or the connection cut after it was
accepted. A ``hook`` sees every order request twice (``received``, before matching;
``accepted``, after) and may drop it at ``received``, so tests can kill the sender at
exactly that point.

Matching: IOC and FOK limit orders against the book set with ``set_book``, best level
first, never past the limit. The book is not depleted unless ``deplete`` is set, so a
run of orders sees the same liquidity.

Wallets: every trade moves ``balances`` (orders are refused for lack of funds only when
``check_funds`` is set). A withdrawal is debited when accepted (``amount`` when the
exchange takes its fee out of the amount, ``amount + fee`` otherwise), stays processing
for ``withdraw_seconds`` and is then done with a txid: a ``SimulatedChain`` credits the
exchange that owns the destination address (a deposit with the same txid). What the tests
read: ``withdrawals`` (everything the exchange accepted; a second one for one transfer is
a duplicate), ``withdraw_requests`` (accepted per client id) and ``requests["withdraw"]``
(withdrawal requests received). Withdrawal faults are queued apart from order
faults (``inject_withdrawal``): reject, 429/418, timeouts and cuts around acceptance, and
``fail_after_accept`` (accepted, then failed by the exchange and refunded).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, TypeAlias

from aiohttp import web

FaultKind: TypeAlias = Literal[
    "reject", "partial_fill", "http_429", "http_418", "http_500_after_accept", "timeout_after_accept",
    "timeout_before_accept", "disconnect_after_accept", "fail_after_accept",
]
Stage: TypeAlias = Literal["received", "accepted"]
Level: TypeAlias = tuple[Decimal, Decimal]


@dataclass
class Fault:
    kind: FaultKind
    client_order_id: str | None = None
    """Only the order with this client id; None = the next order request."""
    times: int = 1
    retry_after_s: float = 1.0
    fill_ratio: Decimal = Decimal("0.5")
    delay_s: float = 3.0
    """How long a timeout keeps the client waiting."""


@dataclass
class SimTrade:
    trade_id: int
    uuid: str
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_asset: str
    ts_ms: int


@dataclass
class SimOrder:
    order_id: int
    uuid: str
    client_order_id: str
    symbol: str
    """The exchange's own market code."""
    base: str
    quote: str
    side: Literal["buy", "sell"]
    price: Decimal
    quantity: Decimal
    time_in_force: str
    created_ms: int
    trades: list[SimTrade] = field(default_factory=list)
    status: Literal["filled", "canceled"] = "canceled"

    @property
    def executed(self) -> Decimal:
        return sum((t.quantity for t in self.trades), Decimal(0))

    @property
    def quote_executed(self) -> Decimal:
        return sum((t.price * t.quantity for t in self.trades), Decimal(0))

    @property
    def fee(self) -> Decimal:
        return sum((t.fee for t in self.trades), Decimal(0))


@dataclass
class SimWithdrawal:
    withdrawal_id: str
    client_id: str
    """Binance ``withdrawOrderId`` (empty when none was sent, and always on Upbit)."""
    asset: str
    network: str
    address: str
    memo: str
    amount: Decimal
    """The request's ``amount``, as the exchange reports it back."""
    fee: Decimal
    debited: Decimal
    received: Decimal
    """What the destination is credited."""
    created_ms: int
    due_ms: int
    fails: bool = False
    status: Literal["processing", "done", "failed"] = "processing"
    txid: str = ""
    done_ms: int = 0


@dataclass
class SimDeposit:
    deposit_id: str
    asset: str
    network: str
    address: str
    memo: str
    amount: Decimal
    txid: str
    created_ms: int


class SimulatedChain:
    """Who owns which deposit address: a withdrawal that completes credits its owner."""

    def __init__(self) -> None:
        self.exchanges: list[SimulatedExchange] = []
        self.addresses: dict[tuple[str, str, str], tuple[SimulatedExchange, str]] = {}

    def attach(self, *exchanges: SimulatedExchange) -> None:
        for ex in exchanges:
            ex.chain = self
            if ex not in self.exchanges:
                self.exchanges.append(ex)

    def add_address(self, exchange: SimulatedExchange, asset: str, network: str, address: str,
                    memo: str = "") -> None:
        """``network`` is the label the sending exchange uses (withdrawals are matched on it)."""
        self.attach(exchange)
        self.addresses[(network, address, memo)] = (exchange, asset)

    def settle(self, now_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        for ex in self.exchanges:
            for w in ex.settle_withdrawals(now):
                owner = self.addresses.get((w.network, w.address, w.memo))
                if owner is not None and owner[1] == w.asset:
                    owner[0].credit_deposit(w)


@dataclass(frozen=True)
class OrderRequest:
    exchange: str
    client_order_id: str
    peer: tuple[str, int] | None


Hook: TypeAlias = Callable[[Stage, OrderRequest], Awaitable[bool | None]]
"""Returns True at ``received`` to drop the request before the matching engine sees it."""

FeeRule: TypeAlias = Callable[[Literal["buy", "sell"], Decimal, Decimal, str, str], tuple[Decimal, str]]


class SimulatedExchange:
    """One exchange's matching engine, order registry, faults and API keys."""

    def __init__(self, name: str, *, fee_rate: Decimal, fee_rule: FeeRule, deplete: bool = False) -> None:
        self.name = name
        self.fee_rate = fee_rate
        self.fee_rule = fee_rule
        self.deplete = deplete
        self.books: dict[str, tuple[list[Level], list[Level]]] = {}
        self.markets: dict[str, tuple[str, str]] = {}
        self.orders: dict[str, SimOrder] = {}
        self.submissions: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        """Requests per kind (``order``, ``query``, ``trades``, ``throttled``, ``banned``, ...)."""
        self.credentials: dict[str, str] = {}
        self.hook: Hook | None = None
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)
        self._trade_ids = itertools.count(1000)
        # Wallets
        self.balances: dict[str, Decimal] = {}
        self.check_funds = False
        self.fee_in_amount = False
        """True: a withdrawal's fee comes out of its ``amount``; False: it is charged on top."""
        self.withdraw_fees: dict[tuple[str, str], Decimal] = {}
        """(asset, network label) -> fee; only these networks accept withdrawals."""
        self.withdraw_seconds = 0.2
        self.withdrawals: list[SimWithdrawal] = []
        self.deposits: list[SimDeposit] = []
        self.withdraw_requests: Counter[str] = Counter()
        """Withdrawals accepted, per client id ('' when none was sent): above 1 is a duplicate."""
        self.chain: SimulatedChain | None = None
        self._withdraw_faults: list[Fault] = []
        self._withdraw_ids = itertools.count(1)

    # ------------------------------------------------------------------ setup

    def add_key(self, api_key: str, secret: str) -> None:
        self.credentials[api_key] = secret

    def set_book(self, symbol: str, base: str, quote: str, bids: Iterable[tuple[object, object]],
                 asks: Iterable[tuple[object, object]]) -> None:
        """Levels best first, as (price, size); any numbers, kept as exact Decimals."""
        self.markets[symbol] = (base, quote)
        self.books[symbol] = ([(_dec(p), _dec(s)) for p, s in bids], [(_dec(p), _dec(s)) for p, s in asks])

    def inject(self, fault: Fault) -> None:
        self._faults.append(fault)

    def take_fault(self, client_order_id: str) -> Fault | None:
        for fault in self._faults:
            if fault.client_order_id in (None, client_order_id):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def fund(self, balances: dict[str, object]) -> None:
        """Set free balances and refuse orders and withdrawals the account cannot pay for."""
        for asset, amount in balances.items():
            self.balances[asset] = _dec(amount)
        self.check_funds = True

    def inject_withdrawal(self, fault: Fault) -> None:
        """A fault for withdrawal requests (``client_order_id`` matches Binance's ``withdrawOrderId``)."""
        self._withdraw_faults.append(fault)

    def take_withdrawal_fault(self, client_id: str) -> Fault | None:
        for fault in self._withdraw_faults:
            if fault.client_order_id in (None, client_id):
                fault.times -= 1
                if fault.times <= 0:
                    self._withdraw_faults.remove(fault)
                return fault
        return None

    @property
    def duplicates(self) -> dict[str, int]:
        return {cid: n for cid, n in self.submissions.items() if n > 1}

    # ------------------------------------------------------------------ wallets

    def lacks_funds(self, symbol: str, side: Literal["buy", "sell"], price: Decimal, quantity: Decimal) -> bool:
        """The account cannot pay for the order (checked only when ``check_funds`` is set)."""
        if not self.check_funds:
            return False
        base, quote = self.markets[symbol]
        if side == "sell":
            return self.balances.get(base, Decimal(0)) < quantity
        fee, asset = self.fee_rule(side, price, quantity, base, quote)
        need = price * quantity + (fee if asset == quote else Decimal(0))
        return self.balances.get(quote, Decimal(0)) < need

    def withdraw(self, *, client_id: str, asset: str, network: str, address: str, memo: str, amount: Decimal,
                 fails: bool = False) -> SimWithdrawal | str:
        """Accept a withdrawal (debited now) or say why not."""
        fee = self.withdraw_fees.get((asset, network))
        if fee is None:
            return f"no withdrawals of {asset} on {network}"
        debited, received = (amount, amount - fee) if self.fee_in_amount else (amount + fee, amount)
        if received <= 0:
            return f"amount {amount} does not cover the fee {fee}"
        if self.check_funds and self.balances.get(asset, Decimal(0)) < debited:
            return f"insufficient {asset}: {self.balances.get(asset, Decimal(0))} < {debited}"
        self.balances[asset] = self.balances.get(asset, Decimal(0)) - debited
        self.withdraw_requests[client_id] += 1
        n = next(self._withdraw_ids)
        now = int(time.time() * 1000)
        w = SimWithdrawal(withdrawal_id=f"{self.name}w{n:06d}{uuid.uuid4().hex[:12]}", client_id=client_id,
                          asset=asset, network=network, address=address, memo=memo, amount=amount, fee=fee,
                          debited=debited, received=received, created_ms=now,
                          due_ms=now + int(self.withdraw_seconds * 1000), fails=fails)
        self.withdrawals.append(w)
        return w

    def settle(self) -> None:
        """Advance withdrawals that are due (through the chain, so their deposits are credited)."""
        if self.chain is not None:
            self.chain.settle()
        else:
            self.settle_withdrawals(int(time.time() * 1000))

    def settle_withdrawals(self, now_ms: int) -> list[SimWithdrawal]:
        """Withdrawals that completed now (failed ones are refunded)."""
        done = []
        for w in self.withdrawals:
            if w.status != "processing" or w.due_ms > now_ms:
                continue
            w.done_ms = now_ms
            if w.fails:
                w.status = "failed"
                self.balances[w.asset] = self.balances.get(w.asset, Decimal(0)) + w.debited
                continue
            w.status = "done"
            w.txid = "0x" + hashlib.sha256(w.withdrawal_id.encode()).hexdigest()
            done.append(w)
        return done

    def credit_deposit(self, w: SimWithdrawal) -> SimDeposit:
        self.balances[w.asset] = self.balances.get(w.asset, Decimal(0)) + w.received
        d = SimDeposit(deposit_id=f"{self.name}d{len(self.deposits) + 1:06d}", asset=w.asset, network=w.network,
                       address=w.address, memo=w.memo, amount=w.received, txid=w.txid, created_ms=w.done_ms)
        self.deposits.append(d)
        return d

    # ------------------------------------------------------------------ matching

    def place(self, *, client_order_id: str, symbol: str, side: Literal["buy", "sell"], price: Decimal,
              quantity: Decimal, time_in_force: str, fill_ratio: Decimal | None = None) -> SimOrder:
        """Register and match an order (it reached the matching engine)."""
        self.submissions[client_order_id] += 1
        base, quote = self.markets[symbol]
        n = next(self._ids)
        order = SimOrder(order_id=n, uuid=f"{self.name}-{n:08d}-{client_order_id}", client_order_id=client_order_id,
                         symbol=symbol, base=base, quote=quote, side=side, price=price, quantity=quantity,
                         time_in_force=time_in_force.upper(), created_ms=int(time.time() * 1000))
        self.orders[client_order_id] = order
        bids, asks = self.books[symbol]
        levels = asks if side == "buy" else bids
        cap = quantity if fill_ratio is None else (quantity * fill_ratio).quantize(Decimal("1e-8"))
        available = sum((s for p, s in levels if (p <= price if side == "buy" else p >= price)), Decimal(0))
        if order.time_in_force == "FOK" and available < quantity:
            return order
        remaining = min(cap, quantity)
        for i, (p, s) in enumerate(levels):
            if remaining <= 0 or (p > price if side == "buy" else p < price):
                break
            take = min(s, remaining)
            if take <= 0:
                continue
            fee, asset = self.fee_rule(side, p, take, base, quote)
            sign = Decimal(1) if side == "buy" else Decimal(-1)
            self.balances[base] = self.balances.get(base, Decimal(0)) + sign * take
            self.balances[quote] = self.balances.get(quote, Decimal(0)) - sign * p * take
            self.balances[asset] = self.balances.get(asset, Decimal(0)) - fee
            trade_id = next(self._trade_ids)
            order.trades.append(SimTrade(trade_id, f"{self.name}-t{trade_id}", p, take, fee, asset,
                                         order.created_ms))
            remaining -= take
            if self.deplete:
                levels[i] = (p, s - take)
        if self.deplete:
            levels[:] = [(p, s) for p, s in levels if s > 0]
        order.status = "filled" if order.executed == quantity else "canceled"
        return order


def _dec(value: object) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(repr(value) if isinstance(value, float) else str(value))


async def hold_then_cut(request: web.Request, fault: Fault) -> web.Response:
    """No answer for ``delay_s`` (the client times out), then the connection is closed."""
    await asyncio.sleep(fault.delay_s)
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=504)


class OrderSimulatorServer:
    """The order endpoints of the given exchanges on one 127.0.0.1 port (any free one)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def order_app(*, binance: SimulatedExchange | None = None, upbit: SimulatedExchange | None = None,
              binance_weight_per_minute: int = 6000, upbit_orders_per_second: int = 8,
              upbit_requests_per_second: int = 30) -> web.Application:
    """An aiohttp application with the order routes of each given exchange (paths do not collide)."""
    from shared.simulator.orders_binance import add_binance_routes
    from shared.simulator.orders_upbit import add_upbit_routes

    app = web.Application()
    if binance is not None:
        add_binance_routes(app, binance, weight_per_minute=binance_weight_per_minute)
    if upbit is not None:
        add_upbit_routes(app, upbit, orders_per_second=upbit_orders_per_second,
                         requests_per_second=upbit_requests_per_second)
    return app
