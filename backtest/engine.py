"""The backtest engine: the services' cores in one process on a simulated clock, without Redis.

What each service does with a message, the engine does with the same core, at the time the
latency model says the message reaches it:

- **collector**: the source's batches are what the collector publishes (books, statuses,
  trades, BBOs); the Upbit USDT/KRW book gives FX rates through the collector's ``FxDesk``.
  The latest book of each market is what the paper executor reads (``latest_book``, with
  its TTL; a stale status replaces it with a stale copy, as the publisher does).
- **detector**: every configured core (``build_cores``) gets books, statuses and FX rates
  ``feed latency`` after the collector received them (per venue, FIFO per venue); balances
  after each execution, as the executor publishes them.
- **risk**: ``RiskEngine`` (``RiskBook`` on ``MemoryRiskState``, the reference the Lua state
  mirrors) decides each signal when it is emitted; executions and balances settle it.
- **executor**: one intent at a time, as one replica: ``backtest.execution`` runs the
  service's sequence with the ``FillSimulator``; an order meets the book ``order latency``
  after it was sent.

Everything is a pure function of the inputs, the configuration and the latency model's
seed: two runs give the same ids, fills and PnL.
"""

from __future__ import annotations

import gc
import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from backtest.execution import Executor, Outcome
from backtest.latency import LatencyModel
from backtest.sources import MarketSource
from services.collector.fx import FxDesk
from services.detector.common import DetectorCore, InvalidInput
from services.detector.cores import build_cores
from services.detector.spatial import SpatialDetector
from services.executor.fills import InMemoryBalances
from services.risk.core import RiskEngine
from services.risk.limits import RiskLimits
from shared.config import Config
from shared.models import (
    BookSnapshot,
    BookStatus,
    Decision,
    Fill,
    FxRate,
    Instrument,
    OrderIntent,
    Signal,
    TopOfBook,
    Trade,
)
from shared.streams import Domain

Progress = Callable[[int, int], None]
GC_EVERY = 1_000_000


@dataclass
class RunStats:
    batches: int = 0
    books: int = 0
    statuses: int = 0
    bbos: int = 0
    trades: int = 0
    fx_rates: int = 0
    rejected_inputs: Counter[str] = field(default_factory=Counter)
    signals: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    intents: int = 0
    fills: int = 0
    wall_s: float = 0.0


@dataclass
class RunResult:
    """Everything a report is made of. ``signals``/``decisions``/``intents``/``fills`` are kept
    when the engine records (parity, tests); executions always are."""

    stats: RunStats
    outcomes: list[Outcome]
    start_ns: int
    end_ns: int
    trade_from_ns: int
    first_event_ns: int
    last_event_ns: int
    starting_balances: dict[tuple[str, str], Decimal]
    final_balances: dict[tuple[str, str], Decimal]
    signals: list[Signal] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    intents: list[OrderIntent] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)


class Engine:
    def __init__(self, cfg: Config, source: MarketSource, *, latency: LatencyModel | None = None,
                 trade_from_ns: int | None = None, until_ns: int | None = None, record: bool = False) -> None:
        self.cfg = cfg
        self.source = source
        self.latency = latency or LatencyModel()
        self.trade_from_ns = trade_from_ns or 0
        self.until_ns = until_ns
        self.record = record
        venues = list(source.exchanges)
        self._zero_feed = self.latency.zero_feed(venues)
        self._feed_latency = self.latency.samplers("feed", venues)
        self._feed_due: dict[str, int] = dict.fromkeys(venues, 0)
        flat: list[Instrument] = [i for found in source.instruments.values() for i in found]
        self.cores: dict[str, DetectorCore] = build_cores(cfg, flat)
        self._core_list = list(self.cores.values())
        self._spatial = [c for c in self._core_list if isinstance(c, SpatialDetector)]
        self.risk = RiskEngine(RiskLimits.from_config(cfg), env=cfg.env, session=cfg.session)
        for exchange, found in source.instruments.items():
            self.risk.book.set_instruments(exchange, found)
        self.balances = InMemoryBalances.from_mapping(cfg.executor.start_balances)
        self.starting_balances = dict(self.balances.free)
        self.executor = Executor(cfg, {(i.exchange, i.symbol): i for i in flat}, self.balances,
                                 self.latency.samplers("order", venues))
        c = cfg.collector
        self.fx_desk = FxDesk(source_symbol=c.fx_source, max_divergence=c.fx_max_divergence)
        self._fx_exchange = self.fx_desk.source_exchange if self.fx_desk.source_exchange in venues else None
        self._book_ttl_ns = (c.latest_book_ttl_ms or Domain.BOOK.ttl_s * 1000) * 1_000_000
        self.now = 0
        self.stats = RunStats()
        self.outcomes: list[Outcome] = []
        self._books: dict[tuple[str, str], tuple[BookSnapshot, int]] = {}
        self._fx: dict[str, FxRate] = {}
        self._heap: list[tuple[int, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._queue: deque[OrderIntent] = deque()
        self._busy = False
        self._signals: list[Signal] = []
        self._decisions: list[Decision] = []
        self._intents: list[OrderIntent] = []
        self._first_event = self._last_event = 0

    # ------------------------------------------------------------------ what the executor reads

    def book(self, exchange: str, symbol: str) -> BookSnapshot | None:
        held = self._books.get((exchange, symbol))
        if held is None or self.now - held[1] > self._book_ttl_ns:
            return None
        return held[0]

    def fx(self, pair: str) -> FxRate | None:
        return self._fx.get(pair)

    # ------------------------------------------------------------------ the loop

    def _at(self, when: int, fn: Callable[[Any], None], arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, arg))

    def _run_due(self, before: int) -> None:
        heap = self._heap
        while heap and heap[0][0] < before:
            when, _, fn, arg = heapq.heappop(heap)
            self.now = when
            fn(arg)

    def run(self, progress: Progress | None = None, progress_every: int = 20_000) -> RunResult:
        # Millions of short-lived objects and next to no reference cycles: the cyclic collector
        # would only cost time here (it runs again every GC_EVERY batches, and at the end).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(progress, progress_every)
        finally:
            # Whatever the run made since its last collection is in the youngest generation (nothing
            # is collected while disabled): collecting that one finds the run's cycles without
            # walking every older object (with the recording loaded, a full collection costs
            # ~50 ms, a tenth of the scenario's run).
            gc.collect(0)
            if collecting:
                gc.enable()

    def _run(self, progress: Progress | None, progress_every: int) -> RunResult:
        started = time.perf_counter()
        stats = self.stats
        books = self._books
        until = self.until_ns if self.until_ns is not None else 1 << 62
        zero_feed = self._zero_feed
        detect = self._detect
        deliver = self._deliver
        fx_exchange = self._fx_exchange
        heap = self._heap
        total = len(self.source)
        count = last = n_books = n_bbos = n_trades = n_statuses = 0
        next_report = progress_every
        for t, exchange, outputs in self.source.batches():
            if t >= until:
                break
            last = t
            count += 1
            if heap and heap[0][0] < t:
                self._run_due(t)
            self.now = t
            msg: Any
            for msg in outputs:
                kind = type(msg)
                if kind is TopOfBook:  # the most frequent, and nothing downstream reads it
                    n_bbos += 1
                elif kind is BookSnapshot:
                    n_books += 1
                    books[(msg.exchange, msg.symbol)] = (msg, t)
                    if zero_feed:
                        detect(msg)
                    else:
                        deliver(msg.exchange, msg)
                elif kind is Trade:
                    n_trades += 1
                elif kind is BookStatus:
                    n_statuses += 1
                    held = books.get((msg.exchange, msg.symbol))
                    if msg.status == "stale" and held is not None and held[0].status == "synced":
                        books[(msg.exchange, msg.symbol)] = (msgspec.structs.replace(held[0], status="stale"), t)
                    if zero_feed:
                        detect(msg)
                    else:
                        deliver(msg.exchange, msg)
            if exchange == fx_exchange:
                for rate in self.fx_desk.on_outputs(outputs, t):
                    if type(rate) is FxRate:
                        stats.fx_rates += 1
                        self._fx[rate.pair] = rate
                        if zero_feed:
                            detect(rate)
                        else:
                            deliver(exchange, rate)
            if count == next_report:
                next_report += progress_every
                if progress is not None:
                    progress(count, total)
                if count % GC_EVERY == 0:
                    gc.collect()
        self._first_event = self._first_event or (self.source.start_ns if count else 0)
        self._last_event = last
        stats.batches, stats.books, stats.bbos, stats.trades, stats.statuses = (
            count, n_books, n_bbos, n_trades, n_statuses)
        self._run_due(1 << 62)  # orders in flight and executions still running finish
        stats.wall_s = time.perf_counter() - started
        if progress is not None:
            progress(total, total)
        return self._result()

    def _deliver(self, venue: str, msg: Any) -> None:
        # FIFO per venue: a message never overtakes an earlier one of the same connection.
        due = max(self.now + self._feed_latency[venue](), self._feed_due[venue])
        self._feed_due[venue] = due
        self._at(due, self._detect, msg)

    # ------------------------------------------------------------------ detector and risk

    def _detect(self, msg: Any) -> None:
        now = self.now
        kind = type(msg)
        if kind is BookSnapshot:
            evaluate = now >= self.trade_from_ns
            for core in self._core_list:
                try:
                    signals = core.on_book(msg, now, evaluate=evaluate)
                except InvalidInput as exc:
                    self.stats.rejected_inputs[f"book:{exc.reason}"] += 1
                    continue
                for signal in signals:
                    self._decide(signal)
        elif kind is BookStatus:
            for core in self._core_list:
                core.on_status(msg, now)
        elif kind is FxRate:
            for core in self._core_list:
                try:
                    core.on_fx(msg, now)
                except InvalidInput as exc:
                    self.stats.rejected_inputs[f"fx:{exc.reason}"] += 1
                    break
            self.risk.on_fx(msg)

    def _decide(self, signal: Signal) -> None:
        stats = self.stats
        stats.signals[signal.strategy] += 1
        verdict = self.risk.check(signal, self.now)
        stats.decisions[verdict.decision.reason] += 1
        if self.record:
            self._signals.append(signal)
            self._decisions.append(verdict.decision)
        if verdict.intent is not None:
            stats.intents += 1
            if self.record:
                self._intents.append(verdict.intent)
            self._queue.append(verdict.intent)
            if not self._busy:
                self._start_next()

    # ------------------------------------------------------------------ executor

    def _start_next(self) -> None:
        intent = self._queue.popleft()
        self._busy = True
        self._step(self.executor.execute(intent, self))

    def _step(self, run: Generator[int, None, Outcome]) -> None:
        try:
            wake = next(run)
        except StopIteration as done:
            self._finished(done.value)
            return
        self._at(wake, self._step, run)

    def _finished(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.stats.fills += len(outcome.fills)
        self.risk.on_execution(outcome.execution)
        for balance in outcome.balances:
            self.risk.on_balance(balance)
            for core in self._spatial:
                core.on_balance(balance)
        self._busy = False
        if self._queue:
            self._start_next()

    def _result(self) -> RunResult:
        fills = [f for o in self.outcomes for f in o.fills] if self.record else []
        return RunResult(
            stats=self.stats, outcomes=self.outcomes, start_ns=self.source.start_ns, end_ns=self.source.end_ns,
            trade_from_ns=self.trade_from_ns, first_event_ns=self._first_event, last_event_ns=self._last_event,
            starting_balances=self.starting_balances, final_balances=dict(self.balances.free),
            signals=self._signals, decisions=self._decisions, intents=self._intents, fills=fills)
