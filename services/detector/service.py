"""The detector service shell: Redis in, the pure cores, signals out.

Per configured strategy (``spatial``, ``triangular``, ``statistical``) one consumer group
reads the ``md.<BASE>`` streams. Replicas split those streams through leases (one lease per
stream per group): a replica reads only the streams it holds, from the group's last
delivered id, so each stream has exactly one reader per group and a dead replica's streams
move to the survivors within the lease time. A stream's books are seeded from the
collector's latest-book keys when its lease is taken.

Triangular cycles and statistical pairs span several streams (BTC/USDT is in ``md.BTC``,
ETH/BTC in ``md.ETH``), so those groups also follow the streams they do not hold with a
plain XREAD (no group): the books stay current, and only the holder of a market's stream
evaluates on its updates.

FX rates and balances are needed by every replica, so they are read without a group (XREAD
from the tail; a group would hand each rate to one replica only): first the latest value of
each configured pair (``fx_latest`` keys) and the stream's recent entries, then every new
entry as it arrives, with no polling delay. Instruments are re-read from their hashes
periodically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec
import redis.exceptions as rexc

from services.detector import metrics
from services.detector.common import DetectorCore, InvalidInput
from services.detector.cores import base_of, build_cores, configured_markets, market_streams
from services.detector.edges import EdgeHistory
from services.detector.spatial import RouteEdge, SpatialDetector
from shared.models import Balance, BookSnapshot, BookStatus, FxRate, Instrument, Signal, TopOfBook, Trade, decoder_for
from shared.runtime import FIELD, Consumer, Delivery, LeaseKeeper, backoff_delay, is_redis_down
from shared.service import Service
from shared.streams import BALANCES, FX, MD_PREFIX, SIGNALS, SPREADS

if TYPE_CHECKING:
    from services.detector.statistical import StatisticalDetector

log = logging.getLogger(__name__)

_decode_md = decoder_for(BookSnapshot, BookStatus, TopOfBook, Trade).decode
_decode_fx = decoder_for(FxRate).decode
_decode_balance = decoder_for(Balance).decode
_decode_book = decoder_for(BookSnapshot).decode
_instrument = msgspec.json.Decoder(Instrument)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError, TypeError)
_LOG_EVERY_S = 10.0


class _Complaints:
    """Logs a bad input at most once per kind and reason every few seconds; counts every one."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, kind: str, reason: str, detail: str = "") -> None:
        metrics.REJECTED.labels(kind, reason).inc()
        now = time.monotonic()
        if now - self._last.get((kind, reason), -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last[(kind, reason)] = now
            log.warning("unusable input skipped", extra={"kind": kind, "reason": reason, "detail": detail[:200]})


class StrategyRunner:
    """One strategy: its core, its consumer group over the streams it leases, and the mirror
    of the streams it needs but does not hold."""

    def __init__(self, service: DetectorService, strategy: str, core: DetectorCore, streams: list[str]) -> None:
        self.service = service
        self.strategy = strategy
        self.core = core
        self.streams = streams
        self.mirrored = not isinstance(core, SpatialDetector)  # spatial needs nothing beyond its own streams
        cfg = service.cfg
        self.consumer: Consumer = service.consumer(
            strategy, [], self.handle, start_id="$", decoder=_decode_md,
        )
        self.keeper = LeaseKeeper(
            service.bus, group=strategy, owner=service.instance, resources=streams,
            ttl_ms=cfg.detector.lease_ttl_ms, on_acquired=self.acquired, on_lost=self.lost,
        )
        self._update_seconds = metrics.UPDATE_SECONDS.labels(strategy)
        self._mirror_from: dict[str, bytes | str] = {}

    @property
    def held(self) -> list[str]:
        return self.consumer.streams

    # ------------------------------------------------------------------ leases

    async def keep_leases(self) -> None:
        """Run the lease keeper until the service stops, then hand the streams over at once
        (released leases, not expired ones, so a surviving replica takes them immediately)."""
        task = asyncio.create_task(self.keeper.run(), name=f"leases:{self.strategy}")
        try:
            while not self.service.stopping and not task.done():
                await self.service.sleep(0.2)
        finally:
            try:
                await self.keeper.stop()
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
            await task

    async def acquired(self, stream: str) -> None:
        # Read the stream whatever happens to the seeding: a leased stream must never go unread.
        self._mirror_from.pop(stream, None)
        self.consumer.add_stream(stream)
        self._owners_changed()
        try:
            await self.service.seed_books(self.core, stream.removeprefix(MD_PREFIX))
        except Exception as exc:
            if not is_redis_down(exc):
                raise
            log.warning("could not seed books", extra={"stream": stream, "error": str(exc)})

    def lost(self, stream: str) -> None:
        self.consumer.remove_stream(stream)
        if not self.mirrored:
            self.core.drop_asset(stream.removeprefix(MD_PREFIX))
        self._owners_changed()

    def _owners_changed(self) -> None:
        if self.strategy == "statistical":  # a pair signals from the reader of its y leg's stream
            core = cast("StatisticalDetector", self.core)
            core.set_active_bases({s.removeprefix(MD_PREFIX) for s in self.consumer.streams})

    # ------------------------------------------------------------------ messages

    async def handle(self, delivery: Delivery) -> None:
        self.apply(delivery.message, evaluate=True)

    def apply(self, msg: Any, *, evaluate: bool) -> None:
        now = time.time_ns()
        if isinstance(msg, BookSnapshot):
            started = time.perf_counter()
            try:
                signals = self.core.on_book(msg, now, evaluate=evaluate)
            except InvalidInput as exc:
                self.service.complain("book", exc.reason, str(exc))
                return
            if evaluate:
                self._update_seconds.observe(time.perf_counter() - started)
            for signal in signals:
                self.service.publish_signal(signal)
            # Only the holder of the stream evaluates: each route is recorded by one replica.
            if evaluate and msg.status == "synced" and isinstance(self.core, SpatialDetector):
                self.service.record_edges(self.core.route_edges(base_of(msg.symbol), now), now)
        elif isinstance(msg, BookStatus):
            self.core.on_status(msg, now)
        # TopOfBook and Trade are not used: sizing needs the depth only the L2 book carries.

    async def mirror(self) -> None:
        """Follow the needed streams this replica does not hold (no group, no acks)."""
        redis = self.service.bus.redis
        attempt = 0
        while not self.service.stopping:
            held = set(self.consumer.streams)
            wanted = [s for s in self.streams if s not in held]
            if not wanted:
                self._mirror_from.clear()
                await self.service.sleep(self.service.cfg.redis.block_ms / 1000)
                continue
            try:
                for stream in wanted:
                    if stream not in self._mirror_from:
                        tail = await self.service.stream_tail(stream)
                        await self.service.seed_books(self.core, stream.removeprefix(MD_PREFIX))
                        if stream not in self.consumer.streams:  # the lease may have come while we waited
                            self._mirror_from[stream] = tail
                start = {s: self._mirror_from[s] for s in wanted if s in self._mirror_from}
                if not start:
                    continue
                reply: Any = await redis.xread(
                    {self.service.bus.stream(s): i for s, i in start.items()},
                    count=self.service.cfg.redis.batch_size, block=self.service.cfg.redis.block_ms,
                )
                attempt = 0
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                attempt += 1
                await self.service.sleep(backoff_delay(attempt))
                continue
            for key, entries in reply or ():
                stream = self.service.bus.logical(key)
                if stream in self.consumer.streams:
                    continue  # taken over meanwhile: the group delivers it now
                for entry_id, fields in entries:
                    self._mirror_from[stream] = entry_id
                    try:
                        msg = _decode_md((fields or {}).get(FIELD, b""))
                    except _DECODE_ERRORS as exc:
                        self.service.complain("book", "decode", str(exc))
                        continue
                    self.apply(msg, evaluate=False)


class DetectorService(Service):
    name = "detector"

    async def setup(self) -> None:
        self._complain = _Complaints()
        self.cores = build_cores(self.cfg)
        self.runners = [StrategyRunner(self, strategy, core, market_streams(self.cfg, strategy))
                        for strategy, core in self.cores.items()]
        self.markets = configured_markets(self.cfg)
        self._instrument_raw: dict[tuple[str, str], bytes] = {}
        self._fx_seen: dict[str, int] = {}
        for runner in self.runners:
            self.background(runner.keep_leases)
            if runner.mirrored:
                self.background(runner.mirror)
        self.background(self._follow_fx)
        if any(isinstance(c, SpatialDetector) for c in self.cores.values()):
            self.background(self._follow_balances)
        self.background(self._refresh_instruments)
        self.background(self._premium_gauges)
        interval_ms = self.cfg.detector.spread_history_ms
        self.edges = EdgeHistory("spatial", interval_ms * 1_000_000) if interval_ms else None
        if self.edges is not None and "spatial" in self.cores:
            self.background(self._edges_due)
        log.info("detector ready", extra={"strategies": list(self.cores),
                                          "streams": {r.strategy: r.streams for r in self.runners}})


    async def extra_health(self) -> dict[str, Any]:
        now = time.time_ns()
        return {
            "strategies": {r.strategy: {"streams": r.held, "leases": sorted(r.keeper.held)} for r in self.runners},
            "fx_age_s": {pair: round((now - ts) / 1e9, 3) for pair, ts in self._fx_seen.items()},
        }

    # ------------------------------------------------------------------ outputs

    def publish_signal(self, signal: Signal) -> None:
        self.producer.publish(SIGNALS, signal)
        metrics.SIGNALS.labels(signal.strategy).inc()
        metrics.SIGNAL_EDGE.labels(signal.strategy, signal.asset).set(signal.net_edge_bps)
        if signal.ts_origin_ns:
            metrics.TICK_TO_SIGNAL.labels(signal.strategy).observe(max(0, time.time_ns() - signal.ts_origin_ns) / 1e9)

    def record_edges(self, edges: list[RouteEdge], now_ns: int) -> None:
        if self.edges is not None:
            self.producer.publish_many(SPREADS, self.edges.observe(edges, now_ns))

    async def _edges_due(self) -> None:
        """Samples of routes whose books went quiet leave when their interval is over."""
        assert self.edges is not None
        interval_s = self.edges.interval_ns / 1e9
        while await self.sleep(interval_s):
            self.producer.publish_many(SPREADS, self.edges.due(time.time_ns()))

    def complain(self, kind: str, reason: str, detail: str = "") -> None:
        self._complain(kind, reason, detail)

    async def _premium_gauges(self) -> None:
        """Premium of each venue per asset, for the market-data dashboard (once a second)."""
        spatial = [c for c in self.cores.values() if isinstance(c, SpatialDetector)]
        bases = sorted({symbol.partition("/")[0] for _, symbol in self.markets})
        while await self.sleep(1.0):
            now = time.time_ns()
            for core in spatial:
                for base in bases:
                    for exchange, premium in core.premiums(base, now).items():
                        metrics.PREMIUM.labels(base, exchange).set(premium)

    # ------------------------------------------------------------------ seeding

    async def seed_books(self, core: DetectorCore, base: str) -> None:
        """Load the collector's latest book of every configured market of ``base``."""
        keys = [(ex, sym) for ex, sym in self.markets if base_of(sym) == base]
        if not keys:
            return
        values: list[Any] = await self.bus.redis.mget([self.bus.keys.latest_book(ex, sym) for ex, sym in keys])
        now = time.time_ns()
        for raw in values:
            if raw is None:
                continue
            try:
                book = _decode_book(raw)
                core.on_book(book, now, evaluate=False)
            except _DECODE_ERRORS as exc:
                self.complain("book", "decode", str(exc))
            except InvalidInput as exc:
                self.complain("book", exc.reason, str(exc))

    async def stream_tail(self, stream: str) -> bytes | str:
        """The id of a stream's newest entry, to read what comes after it ('0-0' if empty)."""
        last: Any = await self.bus.redis.xrevrange(self.bus.stream(stream), count=1)
        return last[0][0] if last else "0-0"

    # ------------------------------------------------------------------ FX, balances, instruments

    def _apply_fx(self, raw: bytes) -> None:
        try:
            rate = _decode_fx(raw)
        except _DECODE_ERRORS as exc:
            self.complain("fx", "decode", str(exc))
            return
        now = time.time_ns()
        for core in self.cores.values():
            try:
                core.on_fx(rate, now)
            except InvalidInput as exc:
                self.complain("fx", exc.reason, str(exc))
                return
        self._fx_seen[rate.pair] = max(self._fx_seen.get(rate.pair, 0), rate.ts_source_ns)
        metrics.FX_AGE.labels(rate.pair).set(max(0, now - rate.ts_source_ns) / 1e9)

    async def _follow_fx(self) -> None:
        async def seed() -> bytes | str:
            recent: Any = await self.bus.redis.xrevrange(self.bus.stream(FX), count=500)
            for _, fields in reversed(recent or []):
                self._apply_fx((fields or {}).get(FIELD, b""))
            pairs = self.cfg.detector.fx_pairs
            latest: Any = await self.bus.redis.mget([self.bus.keys.fx_latest(p) for p in pairs]) if pairs else []
            for raw in latest:
                if raw is not None:
                    self._apply_fx(raw)
            return recent[0][0] if recent else "0-0"

        await self._follow(FX, seed, self._apply_fx)

    def _apply_balance(self, raw: bytes) -> None:
        try:
            balance = _decode_balance(raw)
        except _DECODE_ERRORS as exc:
            self.complain("balance", "decode", str(exc))
            return
        for core in self.cores.values():
            if isinstance(core, SpatialDetector):
                core.on_balance(balance)

    async def _follow_balances(self) -> None:
        async def seed() -> bytes | str:
            recent: Any = await self.bus.redis.xrevrange(self.bus.stream(BALANCES), count=2000)
            for _, fields in reversed(recent or []):
                self._apply_balance((fields or {}).get(FIELD, b""))
            return recent[0][0] if recent else "0-0"

        await self._follow(BALANCES, seed, self._apply_balance)

    async def _follow(self, stream: str, seed: Callable[[], Any], apply: Callable[[bytes], None]) -> None:
        """Seed, then read every new entry of ``stream`` (no group) until stopped."""
        last: bytes | str | None = None
        attempt = 0
        while not self.stopping:
            try:
                if last is None:
                    last = await seed()
                reply: Any = await self.bus.redis.xread({self.bus.stream(stream): last}, count=500,
                                                        block=self.cfg.redis.block_ms)
                attempt = 0
            except Exception as exc:
                if not is_redis_down(exc):
                    raise
                attempt += 1
                await self.sleep(backoff_delay(attempt))
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    apply((fields or {}).get(FIELD, b""))

    async def _refresh_instruments(self) -> None:
        exchanges = sorted({ex for ex, _ in self.markets})
        while not self.stopping:
            try:
                for exchange in exchanges:
                    table: Any = await self.bus.redis.hgetall(self.bus.keys.instruments(exchange))
                    for symbol, raw in (table or {}).items():
                        self._apply_instrument(exchange, symbol.decode(), raw)
            except (rexc.RedisError, OSError) as exc:
                if not is_redis_down(exc):
                    raise
            await self.sleep(self.cfg.detector.instruments_refresh_s)

    def _apply_instrument(self, exchange: str, symbol: str, raw: bytes) -> None:
        if self._instrument_raw.get((exchange, symbol)) == raw:
            return
        try:
            instrument = _instrument.decode(raw)
        except _DECODE_ERRORS as exc:
            self.complain("instrument", "decode", str(exc))
            return
        if (instrument.exchange, instrument.symbol) != (exchange, symbol) or instrument.lot_size <= 0 \
                or instrument.tick_size <= 0 or not 0 <= instrument.taker_fee < 1:
            self.complain("instrument", "invalid", f"{exchange} {symbol}")
            return
        self._instrument_raw[(exchange, symbol)] = raw
        for core in self.cores.values():
            core.set_instrument(instrument)
