"""Rebalance planning: the cheapest route that restores a venue's inventory. Pure and deterministic.

The graph's nodes are (exchange, asset). Its edges are withdrawals between exchanges (one per
network open at both ends: fee, minimum, time) and conversions on one exchange (at its book,
with the taker fee). A route delivers an amount at a destination node from a source node
that holds more than its target.

What a route costs, in the reference currency: the value of what it takes from the source,
minus the value of what it delivers, plus the cost of capital while amounts are on a
network (``capital_cost_per_hour`` x value x hours). The delivered value is the same for
every route to one destination, so the search minimises *value taken + capital cost*.

The search runs backwards from the destination, one hop at a time, carrying for each
partial route the amount needed at its first node (``need``) and the capital cost of its
suffix. Every edge's needed input and capital cost grow with the amount it must deliver,
so a partial route whose need, capital cost and hop count are all no larger, and whose
visited nodes and assets are subsets, is at least as good for every extension: only such
dominated routes are dropped. The result is exact over all simple routes of at most ``max_steps``
edges that never return to an asset they converted away from (a property test checks it
against brute force).

Which inventory may pay: a source gives at most its excess over its target. Conversion
turns an asset with an overall excess (the sum over venues of balance minus target) into an
asset with an overall shortage, never more than either: the coin that spatial arbitrage
shifted between venues is moved back, neither sold nor bought again, and only what piled up
overall (KRW on a Korean venue) is converted into what ran short (USDT).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, NamedTuple, Protocol

import msgspec

from services.rebalancer.market import ConversionMarket, Marks, step_of
from services.rebalancer.networks import TransferNetwork, TransferNetworkTable
from shared.config import RebalancerSettings, WithdrawalAddress
from shared.models import Transfer, TransferState, TransferStep
from shared.money import round_to_step

ZERO = Decimal(0)
SECONDS_PER_HOUR = Decimal(3600)


class Node(NamedTuple):
    exchange: str
    asset: str

    def __str__(self) -> str:
        return f"{self.exchange}:{self.asset}"


class PlanningInputError(ValueError):
    """Inputs the planner refuses to plan from (missing or negative balance, ...)."""


# --------------------------------------------------------------------------- edges


@dataclass(frozen=True, slots=True)
class Flow:
    """One edge carrying an amount: what goes in at ``edge.source``, what comes out at ``edge.target``."""

    edge: Edge
    amount_in: Decimal
    amount_out: Decimal
    fee: Decimal


class Edge(Protocol):
    @property
    def source(self) -> Node: ...

    @property
    def target(self) -> Node: ...

    @property
    def seconds(self) -> float: ...

    @property
    def sort_key(self) -> tuple[str, ...]: ...

    def flow_for(self, amount_out: Decimal) -> Flow | None:
        """The least input delivering at least ``amount_out``; None if impossible."""

    def capital_cost(self, flow: Flow, marks: Marks, rate_per_hour: Decimal) -> Decimal | None:
        """Cost of capital while ``flow`` is in transit; None if the asset has no price."""

    def step(self, flow: Flow) -> TransferStep: ...


@dataclass(frozen=True, slots=True)
class WithdrawalEdge:
    src: TransferNetwork
    dst: TransferNetwork
    address: WithdrawalAddress | None
    amount_step: Decimal

    @property
    def source(self) -> Node:
        return Node(self.src.exchange, self.src.asset)

    @property
    def target(self) -> Node:
        return Node(self.dst.exchange, self.dst.asset)

    @property
    def seconds(self) -> float:
        # Slower end decides: the source's processing or the destination's confirmations.
        return max(self.src.confirm_seconds, self.dst.confirm_seconds)

    @property
    def sort_key(self) -> tuple[str, ...]:
        return ("w", self.src.exchange, self.dst.exchange, self.src.asset, self.src.network)

    def flow_for(self, amount_out: Decimal) -> Flow | None:
        if amount_out <= 0:
            return None
        # Below the network minimum the minimum is sent: the extra lands at the destination.
        amount = max(amount_out, self.src.withdraw_min)
        fee = round_to_step(self.src.fee_for(amount), self.amount_step, up=True)
        return Flow(self, amount + fee, amount, fee)

    def capital_cost(self, flow: Flow, marks: Marks, rate_per_hour: Decimal) -> Decimal | None:
        mark = marks.get(self.src.asset)
        if mark is None:
            return None
        return flow.amount_out * mark * rate_per_hour * Decimal(repr(self.seconds)) / SECONDS_PER_HOUR

    def step(self, flow: Flow) -> TransferStep:
        return TransferStep(
            kind="withdrawal",
            from_exchange=self.src.exchange,
            to_exchange=self.dst.exchange,
            from_asset=self.src.asset,
            to_asset=self.dst.asset,
            amount=flow.amount_out,
            fee=flow.fee,
            network=self.src.network,
            network_label=self.src.label,
            expected_seconds=self.seconds,
            amount_out=flow.amount_out,
            address=self.address.address if self.address else "",
            memo=self.address.memo if self.address else "",
        )


@dataclass(frozen=True, slots=True)
class ConversionEdge:
    market: ConversionMarket
    from_asset: str
    to_asset: str

    @property
    def source(self) -> Node:
        return Node(self.market.exchange, self.from_asset)

    @property
    def target(self) -> Node:
        return Node(self.market.exchange, self.to_asset)

    @property
    def seconds(self) -> float:
        return 0.0

    @property
    def sort_key(self) -> tuple[str, ...]:
        return ("c", self.market.exchange, self.from_asset, self.to_asset)

    def flow_for(self, amount_out: Decimal) -> Flow | None:
        amount_in = self.market.input_for(self.from_asset, amount_out)
        if amount_in is None:
            return None
        done = self.market.convert(self.from_asset, amount_in)
        if done is None:
            return None
        return Flow(self, amount_in, done.amount_out, done.fee)

    def capital_cost(self, flow: Flow, marks: Marks, rate_per_hour: Decimal) -> Decimal | None:
        return ZERO

    def step(self, flow: Flow) -> TransferStep:
        return TransferStep(
            kind="conversion",
            from_exchange=self.market.exchange,
            to_exchange=self.market.exchange,
            from_asset=self.from_asset,
            to_asset=self.to_asset,
            amount=flow.amount_in,
            fee=flow.fee,
            network=self.market.symbol,
            expected_seconds=0.0,
            amount_out=flow.amount_out,
        )


class TransferGraph:
    """Edges by the node they lead into (the search walks backwards)."""

    def __init__(self, edges: Iterable[Edge]) -> None:
        self._into: dict[Node, list[Edge]] = {}
        for edge in sorted(edges, key=lambda e: e.sort_key):
            self._into.setdefault(edge.target, []).append(edge)

    def into(self, node: Node) -> list[Edge]:
        return self._into.get(node, [])

    def edges(self) -> list[Edge]:
        return [e for edges in self._into.values() for e in edges]

    @classmethod
    def build(
        cls,
        networks: TransferNetworkTable,
        markets: Iterable[ConversionMarket],
        settings: RebalancerSettings,
        *,
        require_address: bool,
    ) -> TransferGraph:
        """Withdrawal edges for every open network pair (only to whitelisted addresses when
        ``require_address``: live mode) and conversion edges both ways on every market."""
        edges: list[Edge] = []
        for asset in networks.assets():
            for src, dst in networks.withdrawals(asset):
                address = settings.whitelisted_address(dst.exchange, asset, dst.network)
                if require_address and address is None:
                    continue
                edges.append(WithdrawalEdge(src, dst, address, step_of(settings.amount_steps, asset)))
        for market in markets:
            edges.append(ConversionEdge(market, market.quote, market.base))
            edges.append(ConversionEdge(market, market.base, market.quote))
        return cls(edges)


# --------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class Route:
    flows: tuple[Flow, ...]
    """Source first."""
    need: Decimal
    """Debited at the source, in its asset."""
    capital_cost: Decimal
    objective: Decimal
    """Value taken from the source plus capital cost: what the search minimises."""
    cost: Decimal
    """``objective`` minus the value delivered: the route's expected cost in the reference currency.
    (Extra that a network minimum forces onto an intermediate venue stays there; it is counted
    as cost, which only makes such routes look dearer than they are.)"""

    @property
    def source(self) -> Node:
        return self.flows[0].edge.source

    @property
    def destination(self) -> Node:
        return self.flows[-1].edge.target

    @property
    def delivered(self) -> Decimal:
        return self.flows[-1].amount_out

    @property
    def seconds(self) -> float:
        return sum(f.edge.seconds for f in self.flows)

    def steps(self) -> list[TransferStep]:
        return [f.edge.step(f) for f in self.flows]


@dataclass(slots=True)
class _Label:
    """A partial route from ``node`` to the destination."""

    node: Node
    need: Decimal
    capital: Decimal
    hops: int
    visited: frozenset[Node]
    assets: frozenset[str]
    flows: tuple[Flow, ...]
    alive: bool = True

    def dominates(self, other: _Label) -> bool:
        return (
            self.need <= other.need
            and self.capital <= other.capital
            and self.hops <= other.hops
            and self.visited <= other.visited
            and self.assets <= other.assets
        )


def extends(label_node: Node, label_assets: frozenset[str], visited: frozenset[Node], source: Node) -> bool:
    """Whether a partial route at ``label_node`` may be extended back to ``source``: routes are
    simple, and never return to an asset they converted away from (USDT -> BTC -> KRW -> USDT
    would be a trade, not a transfer)."""
    if source in visited:
        return False
    return source.asset == label_node.asset or source.asset not in label_assets


def _route_key(flows: Sequence[Flow]) -> tuple[tuple[str, ...], ...]:
    return tuple(f.edge.sort_key for f in flows)


def cheapest_route(
    graph: TransferGraph,
    destination: Node,
    amount: Decimal,
    caps: Mapping[Node, Decimal],
    marks: Marks,
    *,
    rate_per_hour: Decimal,
    max_steps: int,
) -> Route | None:
    """The cheapest simple route of at most ``max_steps`` edges delivering ``amount`` at
    ``destination`` from a node in ``caps`` that can give what the route takes from it."""
    dest_mark = marks.get(destination.asset)
    if amount <= 0 or dest_mark is None:
        return None
    start = _Label(destination, amount, ZERO, 0, frozenset({destination}), frozenset({destination.asset}), ())
    labels: dict[Node, list[_Label]] = {destination: [start]}
    frontier = [start]
    best: tuple[Decimal, int, tuple[tuple[str, ...], ...]] | None = None
    best_label: _Label | None = None
    for _ in range(max_steps):
        grown: list[_Label] = []
        for label in frontier:
            if not label.alive:
                continue
            for edge in graph.into(label.node):
                node = edge.source
                if not extends(label.node, label.assets, label.visited, node):
                    continue
                flow = edge.flow_for(label.need)
                if flow is None:
                    continue
                capital = edge.capital_cost(flow, marks, rate_per_hour)
                if capital is None:
                    continue
                new = _Label(node, flow.amount_in, label.capital + capital, label.hops + 1,
                             label.visited | {node}, label.assets | {node.asset}, (flow, *label.flows))
                here = labels.setdefault(node, [])
                if any(old.dominates(new) for old in here):
                    continue
                for old in here:
                    if new.dominates(old):
                        old.alive = False
                here[:] = [old for old in here if old.alive]
                here.append(new)
                grown.append(new)
                cap = caps.get(node)
                mark = marks.get(node.asset)
                if cap is None or mark is None or new.need > cap:
                    continue
                rank = (new.need * mark + new.capital, new.hops, _route_key(new.flows))
                if best is None or rank < best:
                    best, best_label = rank, new
        frontier = grown
    if best is None or best_label is None:
        return None
    objective = best[0]
    return Route(
        flows=best_label.flows,
        need=best_label.need,
        capital_cost=best_label.capital,
        objective=objective,
        cost=objective - best_label.flows[-1].amount_out * dest_mark,
    )


# --------------------------------------------------------------------------- planning


PlanReason = Literal["below_low", "above_high", "manual"]


@dataclass(frozen=True, slots=True)
class TransferPlan:
    transfer_id: str
    destination: Node
    amount: Decimal
    """What the plan restores at the destination."""
    route: Route
    reason: PlanReason
    created_ns: int

    @property
    def asset(self) -> str:
        return self.destination.asset

    @property
    def expected_cost(self) -> Decimal:
        return self.route.cost

    @property
    def expected_seconds(self) -> float:
        return self.route.seconds

    def steps(self) -> list[TransferStep]:
        return self.route.steps()

    def to_transfer(self, state: TransferState, ts_ns: int, mode: Literal["paper", "live", "backtest"],
                    reason: str = "") -> Transfer:
        return Transfer(
            transfer_id=self.transfer_id,
            asset=self.asset,
            steps=self.steps(),
            state=state,
            expected_cost=float(self.expected_cost),
            expected_seconds=self.expected_seconds,
            ts_ns=ts_ns,
            reason=reason or self.reason,
            mode=mode,
        )


_id_encoder = msgspec.json.Encoder(decimal_format="string")


def transfer_id_for(destination: Node, amount: Decimal, steps: Sequence[TransferStep], created_ns: int) -> str:
    """Deterministic id: the same plan made at the same time gets the same id (idempotent inserts)."""
    payload = _id_encoder.encode([list(destination), str(amount), list(steps), created_ns])
    return "tr-" + hashlib.sha256(payload).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A venue the planner could not restore, and why."""

    node: Node
    amount: Decimal
    reason: str


@dataclass(frozen=True, slots=True)
class PlanningResult:
    plans: list[TransferPlan] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Bounds:
    target: Decimal
    low: Decimal
    high: Decimal | None


class RebalancePlanner:
    """Turns balances, open transfers and prices into transfer plans (see the module doc)."""

    def __init__(
        self,
        settings: RebalancerSettings,
        networks: TransferNetworkTable,
        *,
        require_address: bool,
    ) -> None:
        self.settings = settings
        self.networks = networks
        self.require_address = require_address
        self.max_cost_fraction = settings.max_cost_fraction
        self.rate = settings.capital_cost_per_hour
        self.max_steps = settings.max_steps

    def graph(self, markets: Iterable[ConversionMarket]) -> TransferGraph:
        return TransferGraph.build(self.networks, markets, self.settings, require_address=self.require_address)

    # ------------------------------------------------------------------ inputs

    def projected(self, balances: Mapping[Node, Decimal], in_flight: Mapping[Node, Decimal]) -> dict[Node, Decimal]:
        """Free balances plus what open transfers will still add or take; refuses bad input."""
        for node, amount in balances.items():
            if not isinstance(amount, Decimal) or not amount.is_finite():
                raise PlanningInputError(f"balance of {node} is not a decimal amount: {amount!r}")
            if amount < 0:
                raise PlanningInputError(f"balance of {node} is negative: {amount}")
        missing = sorted(
            str(Node(t.exchange, t.asset)) for t in self.settings.targets if Node(t.exchange, t.asset) not in balances
        )
        if missing:
            raise PlanningInputError(f"missing balance for {', '.join(missing)}: nothing planned")
        out = dict(balances)
        for node, delta in in_flight.items():
            out[node] = out.get(node, ZERO) + delta
        return out

    def bounds(self, projected: Mapping[Node, Decimal]) -> dict[Node, _Bounds]:
        totals: dict[str, Decimal] = {}
        for node, amount in projected.items():
            totals[node.asset] = totals.get(node.asset, ZERO) + max(amount, ZERO)
        out: dict[Node, _Bounds] = {}
        for t in self.settings.targets:
            scale = totals.get(t.asset, ZERO) if t.kind == "share" else Decimal(1)
            out[Node(t.exchange, t.asset)] = _Bounds(
                t.target * scale, t.low * scale, None if t.high is None else t.high * scale
            )
        return out

    # ------------------------------------------------------------------ plans

    def plan(
        self,
        balances: Mapping[Node, Decimal],
        in_flight: Mapping[Node, Decimal],
        markets: Sequence[ConversionMarket],
        marks: Marks,
        now_ns: int,
    ) -> PlanningResult:
        """Plans restoring every venue below its low threshold, then spreading every excess
        above a high threshold to venues of the same asset below their target."""
        projected = self.projected(balances, in_flight)
        graph = self.graph(markets)
        result = PlanningResult()
        for node in self._deficits(projected, marks):
            own = self.bounds(projected)[node]
            if projected[node] >= own.low:  # an earlier plan's leftovers landed here
                continue
            full = own.target - projected[node]
            least = own.low - projected[node]
            shortage = -self._excess(projected).get(node.asset, ZERO)
            self._plan_one(graph, node, full, least, self._caps(projected, node.asset), shortage, projected, marks,
                           "below_low", now_ns, result)
        for source in self._excesses(projected, marks):
            for dest in self._under_target(projected, source.asset, marks):
                bounds = self.bounds(projected)
                surplus = projected[source] - bounds[source].target
                shortfall = bounds[dest].target - projected[dest]
                if surplus <= 0:
                    break
                if shortfall <= 0:
                    continue
                amount = min(surplus, shortfall)
                self._plan_one(graph, dest, amount, ZERO, {source: surplus}, ZERO, projected, marks,
                               "above_high", now_ns, result)
        return result

    def plan_request(
        self,
        destination: Node,
        amount: Decimal,
        balances: Mapping[Node, Decimal],
        in_flight: Mapping[Node, Decimal],
        markets: Sequence[ConversionMarket],
        marks: Marks,
        now_ns: int,
    ) -> PlanningResult:
        """An operator's request: deliver ``amount`` at ``destination`` from whatever can pay."""
        if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
            raise PlanningInputError(f"amount must be a positive number, got {amount!r}")
        projected = self.projected(balances, in_flight)
        result = PlanningResult()
        self._plan_one(self.graph(markets), destination, amount, amount, self._caps(projected, destination.asset),
                       amount, projected, marks, "manual", now_ns, result)
        return result

    def _plan_one(
        self,
        graph: TransferGraph,
        node: Node,
        full: Decimal,
        least: Decimal,
        caps: Mapping[Node, Decimal],
        convertible: Decimal,
        projected: dict[Node, Decimal],
        marks: Marks,
        reason: PlanReason,
        now_ns: int,
        result: PlanningResult,
    ) -> None:
        step = step_of(self.settings.amount_steps, node.asset)
        full = round_to_step(full, step, up=True)
        least = max(round_to_step(least, step, up=True), step)
        if node.asset not in marks:
            result.shortfalls.append(Shortfall(node, full, f"no price for {node.asset}"))
            return
        caps = {n: c for n, c in caps.items() if n != node and c > 0}
        route = self._choose(graph, node, full, least, step, caps, convertible, marks)
        if route is None:
            why = "no route: no source with enough excess, or no open network or book"
            result.shortfalls.append(Shortfall(node, full, why))
            return
        delivered_value = marks.value(node.asset, route.flows[-1].amount_out)
        if route.cost > delivered_value * self.max_cost_fraction:
            result.shortfalls.append(
                Shortfall(node, full, f"cheapest route costs {route.cost:.2f} {marks.reference}, over "
                                      f"{self.max_cost_fraction:%} of the {delivered_value:.2f} it delivers")
            )
            return
        amount = route.delivered
        steps = route.steps()
        plan = TransferPlan(
            transfer_id=transfer_id_for(node, amount, steps, now_ns),
            destination=node,
            amount=amount,
            route=route,
            reason=reason,
            created_ns=now_ns,
        )
        result.plans.append(plan)
        for node_delta, delta in plan_effects(steps).items():  # later plans see this one done
            projected[node_delta] = projected.get(node_delta, ZERO) + delta

    def _choose(self, graph: TransferGraph, node: Node, full: Decimal, least: Decimal, step: Decimal,
                caps: Mapping[Node, Decimal], convertible: Decimal, marks: Marks) -> Route | None:
        """Move the same asset back, or convert another asset into it: whichever costs less
        per unit delivered. Each restores the full amount when some source can pay for it,
        else the largest amount of at least ``least``.

        Conversion makes at most ``convertible`` of the asset (its overall shortage): a coin
        that only changed venue is moved back, never bought again at the venue that sold it.
        Moving it back can rarely restore the full target (the fees are lost on the way), but
        it leaves the venue above its low threshold."""
        same = {n: c for n, c in caps.items() if n.asset == node.asset}
        other = {n: c for n, c in caps.items() if n.asset != node.asset}
        moved = self._affordable(graph, node, full, least, step, same, marks)
        limit = min(full, round_to_step(convertible, step, up=False))
        converted = self._affordable(graph, node, limit, least, step, other, marks) if limit >= least else None
        if moved is None or converted is None:
            return moved or converted
        return moved if self._cost_share(moved, marks) <= self._cost_share(converted, marks) else converted

    def _affordable(self, graph: TransferGraph, node: Node, full: Decimal, least: Decimal, step: Decimal,
                    caps: Mapping[Node, Decimal], marks: Marks) -> Route | None:
        """The cheapest route for ``full``, else for the largest amount in [least, full) that
        a source in ``caps`` can pay for."""
        if not caps:
            return None
        route = self._route(graph, node, full, caps, marks)
        if route is None and least < full:
            route = self._largest_route(graph, node, least, full, step, caps, marks)
        return route

    @staticmethod
    def _cost_share(route: Route, marks: Marks) -> Decimal:
        return route.cost / marks.value(route.destination.asset, route.delivered)

    def _route(self, graph: TransferGraph, node: Node, amount: Decimal, caps: Mapping[Node, Decimal],
               marks: Marks) -> Route | None:
        return cheapest_route(graph, node, amount, caps, marks, rate_per_hour=self.rate, max_steps=self.max_steps)

    def _largest_route(self, graph: TransferGraph, node: Node, least: Decimal, full: Decimal, step: Decimal,
                       caps: Mapping[Node, Decimal], marks: Marks) -> Route | None:
        """The route for the largest amount in [least, full) that some source can pay for
        (feasibility only shrinks as the amount grows, so bisection finds it)."""
        lo_units, hi_units = int(least / step), int(full / step)  # lo feasible?, hi known infeasible
        found = self._route(graph, node, least, caps, marks)
        if found is None:
            return None
        while hi_units - lo_units > 1:
            mid = (lo_units + hi_units) // 2
            route = self._route(graph, node, mid * step, caps, marks)
            if route is None:
                hi_units = mid
            else:
                lo_units, found = mid, route
        return found

    # ------------------------------------------------------------------ who needs, who pays

    def _deficits(self, projected: Mapping[Node, Decimal], marks: Marks) -> list[Node]:
        bounds = self.bounds(projected)
        short = [n for n, b in bounds.items() if projected[n] < b.low]
        # Largest shortfall in value first; unpriced assets last; names break ties.
        return sorted(short, key=lambda n: (-self._value(n.asset, bounds[n].target - projected[n], marks), n))

    def _excesses(self, projected: Mapping[Node, Decimal], marks: Marks) -> list[Node]:
        bounds = self.bounds(projected)
        over = [n for n, b in bounds.items() if b.high is not None and projected[n] > b.high]
        return sorted(over, key=lambda n: (-self._value(n.asset, projected[n] - bounds[n].target, marks), n))

    def _under_target(self, projected: Mapping[Node, Decimal], asset: str, marks: Marks) -> list[Node]:
        bounds = self.bounds(projected)
        under = [n for n, b in bounds.items() if n.asset == asset and projected[n] < b.target]
        return sorted(under, key=lambda n: (-(bounds[n].target - projected[n]), n))

    def _excess(self, projected: Mapping[Node, Decimal]) -> dict[str, Decimal]:
        """Per asset: the sum over its venues of balance minus target (negative: short overall)."""
        excess: dict[str, Decimal] = {}
        for node, b in self.bounds(projected).items():
            excess[node.asset] = excess.get(node.asset, ZERO) + projected[node] - b.target
        return excess

    def _caps(self, projected: Mapping[Node, Decimal], asset: str) -> dict[Node, Decimal]:
        """What each venue may give towards a deficit in ``asset`` (see the module doc)."""
        excess = self._excess(projected)
        caps: dict[Node, Decimal] = {}
        for node, b in self.bounds(projected).items():
            surplus = projected[node] - b.target
            if node.asset != asset:
                surplus = min(surplus, excess[node.asset])
            if surplus > 0:
                caps[node] = surplus
        return caps

    @staticmethod
    def _value(asset: str, amount: Decimal, marks: Marks) -> Decimal:
        mark = marks.get(asset)
        return ZERO if mark is None else amount * mark


def plan_effects(steps: Sequence[TransferStep]) -> dict[Node, Decimal]:
    """How a route's steps move each node once done: sources down, destinations up."""
    out: dict[Node, Decimal] = {}

    def add(node: Node, delta: Decimal) -> None:
        out[node] = out.get(node, ZERO) + delta

    for s in steps:
        if s.kind == "withdrawal":
            add(Node(s.from_exchange, s.from_asset), -(s.amount + s.fee))
            add(Node(s.to_exchange, s.to_asset), s.amount)
        else:
            add(Node(s.from_exchange, s.from_asset), -s.amount)
            add(Node(s.to_exchange, s.to_asset), s.amount_out)
    return out
