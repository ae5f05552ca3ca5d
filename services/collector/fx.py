"""FX rates for the KRW legs: USDT/KRW from Upbit's KRW-USDT book, USD/KRW from a reference.

``FxDesk`` is the pure part. It watches the collector's own outputs: every synced
``BookSnapshot`` of the source book (default: Upbit ``USDT/KRW``) whose best bid or ask
changed gives ``FxRate(pair="USDT/KRW", rate=mid, bid, ask, source="upbit")`` stamped with
the book's exchange time. ``on_reference`` takes a reference USD/KRW quote (optional, from a
configured HTTP source, see ``ReferenceSource``). When both are fresh and
``|USDT/KRW / USD/KRW - 1|`` exceeds ``max_divergence`` the desk raises an ``Alert`` (once
per excursion, again after ``realert_ns``) and the divergence gauge shows the gap at all
times -- a large gap means a depeg, a stale source or a broken feed, and detectors that
convert through one of the rates deserve to know.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

import aiohttp
import msgspec

from services.collector import metrics
from shared.models import Alert, BookSnapshot, FxRate, Message

log = logging.getLogger(__name__)

USDT_KRW = "USDT/KRW"
USD_KRW = "USD/KRW"


class FxDesk:
    def __init__(
        self,
        *,
        source_exchange: str = "upbit",
        source_symbol: str = USDT_KRW,
        max_divergence: float = 0.03,
        max_age_ns: int = 120_000_000_000,
        realert_ns: int = 600_000_000_000,
    ) -> None:
        self.source_exchange = source_exchange
        self.source_symbol = source_symbol
        self.max_divergence = max_divergence
        self.max_age_ns = max_age_ns
        self.realert_ns = realert_ns
        self.latest: dict[str, FxRate] = {}
        self._seen: dict[str, int] = {}
        self._last_quote: tuple[float, float] | None = None
        self._alerting = False
        self._last_alert_ns = 0

    def on_outputs(self, outputs: Iterable[Message], now_ns: int) -> list[Message]:
        out: list[Message] = []
        for msg in outputs:
            if (type(msg) is BookSnapshot and msg.symbol == self.source_symbol
                    and msg.exchange == self.source_exchange and msg.status == "synced"):
                out.extend(self._on_book(msg, now_ns))
        return out

    def _on_book(self, book: BookSnapshot, now_ns: int) -> list[Message]:
        if not book.bids or not book.asks:
            return []
        bid, ask = book.bids[0][0], book.asks[0][0]
        if self._last_quote == (bid, ask):
            return []
        self._last_quote = (bid, ask)
        rate = FxRate(pair=self.source_symbol, rate=(bid + ask) / 2, source=self.source_exchange,
                      ts_source_ns=book.ts_exchange_ns, bid=bid, ask=ask)
        return [rate, *self._update(rate, now_ns)]

    def on_reference(self, rate: float, source: str, ts_source_ns: int, now_ns: int) -> list[Message]:
        fx = FxRate(pair=USD_KRW, rate=rate, source=source, ts_source_ns=ts_source_ns)
        return [fx, *self._update(fx, now_ns)]

    def _update(self, fx: FxRate, now_ns: int) -> list[Message]:
        self.latest[fx.pair] = fx
        self._seen[fx.pair] = now_ns
        metrics.FX_RATE.labels(fx.pair, fx.source).set(fx.rate)
        usdt, usd = self.latest.get(self.source_symbol), self.latest.get(USD_KRW)
        if usdt is None or usd is None or usd.rate <= 0:
            return []
        # Compare only quotes we received recently (local clock: no exchange clock skew involved).
        if min(self._seen[self.source_symbol], self._seen[USD_KRW]) < now_ns - self.max_age_ns:
            return []
        divergence = abs(usdt.rate / usd.rate - 1)
        metrics.FX_DIVERGENCE.labels(self.source_symbol, USD_KRW).set(divergence)
        if divergence <= self.max_divergence:
            self._alerting = False
            return []
        if self._alerting and now_ns - self._last_alert_ns < self.realert_ns:
            return []
        self._alerting = True
        self._last_alert_ns = now_ns
        metrics.FX_ALERTS.inc()
        return [Alert(
            alert_id=uuid.uuid4().hex,
            severity="warning",
            source="collector",
            kind="fx_divergence",
            message=(f"{self.source_symbol} {usdt.rate:.2f} ({usdt.source}) and {USD_KRW} {usd.rate:.2f} "
                     f"({usd.source}) differ by {divergence:.2%}, more than {self.max_divergence:.2%}"),
            ts_ns=now_ns,
            labels={"pair_a": self.source_symbol, "pair_b": USD_KRW, "divergence": f"{divergence:.6f}"},
        )]


def dig(doc: Any, path: str) -> float:
    """The number at a dotted path (``rates.KRW``, ``0.basePrice``) of a JSON document."""
    node = doc
    for part in path.split(".") if path else ():
        if isinstance(node, list) and part.isdigit():
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            raise KeyError(path)
    if isinstance(node, bool) or not isinstance(node, int | float | str):
        raise TypeError(f"{path} is not a number")
    value = float(node)
    if not value > 0:
        raise ValueError(f"{path} is not a positive rate: {node!r}")
    return value


class ReferenceSource:
    """Polls a configured HTTP endpoint for USD/KRW (KRW per 1 USD at ``field``)."""

    def __init__(self, url: str, field: str, *, name: str = "reference", timeout_s: float = 10.0) -> None:
        self.url = url
        self.field = field
        self.name = name
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def fetch(self, session: aiohttp.ClientSession) -> float:
        async with session.get(self.url, timeout=self.timeout) as resp:
            resp.raise_for_status()
            body = await resp.read()
        return dig(msgspec.json.decode(body), self.field)

    async def poll(self, desk: FxDesk, emit: Any, interval_s: float) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    rate = await self.fetch(session)
                    now = time.time_ns()
                    emit(desk.on_reference(rate, self.name, now, now))
                except Exception as exc:
                    log.warning("FX reference unavailable", extra={"url": self.url, "error": str(exc)[:200]})
                await asyncio.sleep(interval_s)
