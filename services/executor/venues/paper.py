"""The paper venue: orders meet the live book (from Redis) after the configured latency and
fill through the ``FillSimulator``, against paper balances the caller locks in PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal

from services.executor.fills import Balances, FillSimulator
from services.executor.markets import MarketData, PreparedOrder
from services.executor.venues.base import VenueFill, VenueResult
from shared.models import BookSnapshot


class PaperVenue:
    def __init__(self, market: MarketData, simulator: FillSimulator, *,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.market = market
        self.simulator = simulator
        self.clock_ns = clock_ns

    async def arrive(self, order: PreparedOrder, sent_ns: int) -> tuple[BookSnapshot | None, int]:
        """Wait until the order reaches the (simulated) exchange; the book it meets there."""
        arrival = self.simulator.arrival_ns(sent_ns)
        delay = (arrival - self.clock_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        return await self.market.book(order.leg.exchange, order.leg.symbol), arrival

    def execute(self, order: PreparedOrder, book: BookSnapshot | None, arrival_ns: int,
                balances: Balances) -> VenueResult:
        fee_rate = Decimal(order.instrument.taker_fee)
        result = self.simulator.fill(order.leg, book, arrival_ns, fee_rate=fee_rate, balances=balances)
        fills = tuple(VenueFill(f.fill_id, f.price, f.quantity, f.fee, f.fee_asset, arrival_ns) for f in result.fills)
        return VenueResult(result.status, fills, result.reason, "")
