"""The simulated exchange's own book: price string -> level as received, rendered on demand.

The simulator keeps, per book, the state the real exchange would have after the recorded
frames it has played so far, so that a client resyncing mid-stream (a REST snapshot, a
resubscription) gets a snapshot consistent with the frames that follow. Levels stay the
strings of the recording, so checksums computed over them match the exchange's.
Independent of the collector's book code on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal


class LevelBook:
    __slots__ = ("asks", "bids", "seq")

    def __init__(self) -> None:
        self.bids: dict[str, Sequence[str]] = {}
        self.asks: dict[str, Sequence[str]] = {}
        self.seq: int = 0

    def load(self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]], seq: int) -> None:
        self.bids, self.asks = {}, {}
        self.apply(bids, asks, seq)

    def apply(self, bids: Iterable[Sequence[str]], asks: Iterable[Sequence[str]], seq: int) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for level in levels:
                price = str(level[0])
                if Decimal(str(level[1])) == 0:
                    side.pop(price, None)
                else:
                    side[price] = [str(x) for x in level]
        self.seq = seq

    def top(self, n: int | None = None) -> tuple[list[Sequence[str]], list[Sequence[str]]]:
        bids = sorted(self.bids.values(), key=lambda lv: Decimal(lv[0]), reverse=True)
        asks = sorted(self.asks.values(), key=lambda lv: Decimal(lv[0]))
        if n is not None:
            bids, asks = bids[:n], asks[:n]
        return bids, asks
