"""Edge history: the best top-of-book edge of each route per interval, for ``spread_history``.

The spatial core evaluates a route on every book update of its asset, many times a second;
what an operator charts over days is how close each route came to paying. ``EdgeHistory``
keeps, per route, the observation with the highest net edge of the current interval and hands
it out once the interval is over: at most one ``SpreadSample`` per route per interval, whatever
the update rate. Pure and driven by explicit time, like the cores.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.detector.spatial import RouteEdge
from shared.models import SpreadSample, Strategy

Route = tuple[str, str, str, str, str]


class EdgeHistory:
    def __init__(self, strategy: Strategy = "spatial", interval_ns: int = 1_000_000_000) -> None:
        if interval_ns <= 0:
            raise ValueError("interval_ns must be positive")
        self.strategy: Strategy = strategy
        self.interval_ns = interval_ns
        self._best: dict[Route, tuple[int, RouteEdge, int]] = {}
        """Route -> (interval index, its best edge so far, when it was seen)."""

    def observe(self, edges: Iterable[RouteEdge], now_ns: int) -> list[SpreadSample]:
        """Take the edges evaluated at ``now_ns``; returns the samples of intervals now over."""
        out = self.due(now_ns)
        slot = now_ns // self.interval_ns
        best = self._best
        for edge in edges:
            held = best.get(edge.route)
            if held is None or edge.net_edge_bps > held[1].net_edge_bps:
                best[edge.route] = (slot, edge, now_ns)
        return out

    def due(self, now_ns: int) -> list[SpreadSample]:
        """The best sample of every route whose interval ended by ``now_ns``, oldest first."""
        slot = now_ns // self.interval_ns
        ended = [route for route, (held, _, _) in self._best.items() if held < slot]
        out = [self._sample(*self._best.pop(route)[1:]) for route in ended]
        out.sort(key=lambda s: s.ts_ns)
        return out

    def _sample(self, edge: RouteEdge, ts_ns: int) -> SpreadSample:
        return SpreadSample(
            asset=edge.asset, strategy=self.strategy, buy_exchange=edge.buy_exchange, buy_symbol=edge.buy_symbol,
            sell_exchange=edge.sell_exchange, sell_symbol=edge.sell_symbol, ts_ns=ts_ns,
            gross_edge_bps=edge.gross_edge_bps, net_edge_bps=edge.net_edge_bps, fx_rate=edge.fx_rate,
            notional=edge.notional,
        )
