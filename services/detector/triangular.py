"""Triangular arbitrage: around a cycle of three markets on one exchange (USDT -> BTC -> ETH ->
USDT), ending with more of the start currency than went in, after taker fees and depth.

Each exchange's markets form a currency graph; every triangle of markets gives two cycles
(one per direction), starting in the first of ``start_currencies`` the triangle contains.
A book update re-evaluates only the cycles through that market: first the product of the
three best rates net of fees (one multiplication per cycle, so a hub market such as BTC/USDT
with hundreds of cycles stays cheap), then, for the few that clear ``1 + min_profit``, a walk
of all three books at once.

Sizing: amount ``x`` of the start currency becomes ``f(x)`` after the three legs; ``f`` is
piecewise linear and concave (each leg's rate only worsens as it eats into its book), so the
profit ``f(x) - x`` is largest at the last ``x`` whose marginal rate ``f'(x)`` still clears
``1 + min_profit``, capped by the notional limit. The legs are then rounded forwards: each
leg's quantity is floored to its lot and the next leg only spends what the rounded one
returns (the remainder is dust and counts for nothing), limit prices are the worst levels the
rounded quantities reach, and the edge is recomputed on those figures.

The legs are sent at once (IOC), so the intermediate currencies must be held as inventory;
the net change in them is the dust only. Fees are taken from what a leg receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from services.detector.books import InstrumentTable, MarketKey, book_problem
from services.detector.common import InvalidInput, signal_id
from services.detector.depth import base_for, snap, take
from services.detector.fx import FxTable, fx_problem
from shared.config import Config
from shared.models import BookSnapshot, BookStatus, FxRate, Instrument, Side, Signal, SignalLeg
from shared.money import meets_minimums, round_price, round_to_step

_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class TriangularConfig:
    reference_currency: str = "USDT"
    min_profit: float = 0.0005
    max_notional: float = 1_000.0
    max_book_age_ns: int = 2_000 * _MS
    max_fx_age_ns: int = 60_000 * _MS
    cooldown_ns: int = 5_000 * _MS
    reemit_edge_step_bps: float = 1.0
    start_currencies: tuple[str, ...] = ("USDT", "USDC", "USD", "KRW", "BTC", "ETH")

    @classmethod
    def from_config(cls, cfg: Config) -> TriangularConfig:
        d = cfg.detector
        return cls(
            reference_currency=cfg.trading.reference_currency,
            min_profit=cfg.trading.min_profit_threshold,
            max_notional=cfg.trading.max_notional,
            max_book_age_ns=d.max_book_age_ms * _MS,
            max_fx_age_ns=d.max_fx_age_ms * _MS,
            cooldown_ns=d.cooldown_ms * _MS,
            reemit_edge_step_bps=d.reemit_edge_step_bps,
            start_currencies=d.triangular_start_currencies,
        )


class _Market:
    __slots__ = ("_ladders", "base", "book", "exchange", "fee", "index", "quote", "symbol")

    def __init__(self, index: int, exchange: str, symbol: str, fee: float) -> None:
        self.index = index
        self.exchange = exchange
        self.symbol = symbol
        self.base, _, self.quote = symbol.partition("/")
        self.fee = fee
        self.book: BookSnapshot | None = None
        self._ladders: dict[Side, list[tuple[float, float]]] = {}

    def set_book(self, book: BookSnapshot | None) -> None:
        self.book = book
        self._ladders.clear()

    def ladder(self, side: Side) -> list[tuple[float, float]]:
        """The book as a leg sees it, built once per book: a hub market serves hundreds of cycles."""
        ladder = self._ladders.get(side)
        if ladder is None:
            assert self.book is not None
            ladder = self._ladders[side] = _ladder(self.book, self.fee, side)
        return ladder


@dataclass(frozen=True, slots=True)
class Cycle:
    """One direction around a triangle: currencies[0] -> [1] -> [2] -> [0]."""

    exchange: str
    currencies: tuple[str, str, str]
    markets: tuple[int, int, int]
    sides: tuple[Side, Side, Side]
    """``sell``: the leg's input is the market's base; ``buy``: its quote."""

    @property
    def rate_slots(self) -> tuple[int, int, int]:
        return tuple(2 * m + (s == "buy") for m, s in zip(self.markets, self.sides, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class TriangularLeg:
    book: BookSnapshot
    side: Side
    quantity: Decimal
    """In the market's base currency."""
    price: Decimal
    """Limit: the worst level reached, rounded to the tick (buys up, sells down)."""
    spent: float
    """Input currency given up (base for a sell, quote for a buy)."""
    received: float
    """Output currency received, after the taker fee."""
    gross_received: float
    """Output currency before the taker fee."""


@dataclass(frozen=True, slots=True)
class TriangularOpportunity:
    cycle: Cycle
    legs: tuple[TriangularLeg, TriangularLeg, TriangularLeg]
    start_amount: float
    """Start currency spent by the first (rounded) leg."""
    end_amount: float
    """Start currency returned by the last leg, after fees."""
    start_value: float
    """Value of one unit of the start currency in the reference currency."""
    unrounded_start: float
    unrounded_profit: float
    """Profit in the start currency of the best continuous size, before lot rounding."""
    fx_age_ns: int | None
    fx_rate: float | None

    @property
    def profit(self) -> float:
        return self.end_amount - self.start_amount

    @property
    def net_profit(self) -> float:
        """In the reference currency."""
        return self.profit * self.start_value

    @property
    def notional(self) -> float:
        return self.start_amount * self.start_value

    @property
    def net_edge_bps(self) -> float:
        return self.profit / self.start_amount * 10_000

    @property
    def gross_edge_bps(self) -> float:
        factor = 1.0
        for leg in self.legs:
            factor *= leg.gross_received / leg.spent
        return (factor - 1.0) * 10_000


@dataclass(frozen=True, slots=True)
class _Sized:
    """A cycle walked at its best continuous size, not yet rounded to lots."""

    cycle: Cycle
    books: list[BookSnapshot]
    markets: list[_Market]
    start_value: float
    fx_age: int | None
    fx_rate: float | None
    start: float
    end: float

    @property
    def bound(self) -> float:
        """Continuous profit in the reference currency: no rounding of it can do better."""
        return (self.end - self.start) * self.start_value


class TriangularDetector:
    """Pure core: books of one or more exchanges in, cycle signals out; time is an argument."""

    def __init__(self, config: TriangularConfig, instruments: InstrumentTable, fx: FxTable | None = None) -> None:
        self.config = config
        self.instruments = instruments
        self.fx = fx if fx is not None else FxTable(config.max_fx_age_ns)
        self._markets: list[_Market] = []
        self._index: dict[MarketKey, int] = {}
        self._links: dict[str, dict[str, dict[str, int]]] = {}
        """exchange -> currency -> neighbour currency -> market index."""
        self.cycles: list[Cycle] = []
        self._cycles_of: list[list[tuple[int, int, int, int]]] = []
        """market index -> (rate slot, rate slot, rate slot, cycle index) of every cycle through it."""
        self._rates: list[float] = []
        """Two per market: best bid x (1 - fee) (selling base) and (1 - fee) / best ask (buying base)."""
        self._hurdle = 1.0 + config.min_profit
        self._cooldown: dict[tuple[str, tuple[int, int, int]], tuple[int, float]] = {}

    # ------------------------------------------------------------------ inputs

    def on_book(self, book: BookSnapshot, now_ns: int, *, evaluate: bool = True) -> list[Signal]:
        """Take a book update and return the signals of the cycles through its market.
        ``evaluate=False`` only stores it (a market another replica is responsible for)."""
        if book.status == "synced":
            problem = book_problem(book)
            if problem is not None:
                raise InvalidInput(problem, f"{book.exchange} {book.symbol} seq {book.seq}")
        m = self._market((book.exchange, book.symbol))
        held = m.book
        if held is not None and book.ts_recv_ns < held.ts_recv_ns:
            return []
        if book.status != "synced":
            self._clear(m)
            return []
        m.set_book(book)
        self._rates[2 * m.index] = book.bids[0][0] * (1.0 - m.fee)
        self._rates[2 * m.index + 1] = (1.0 - m.fee) / book.asks[0][0]
        if not evaluate:
            return []
        return self._signals(m, book, now_ns)

    def on_status(self, status: BookStatus, now_ns: int) -> None:
        if status.status != "stale":
            return
        i = self._index.get((status.exchange, status.symbol))
        if i is not None:
            m = self._markets[i]
            if m.book is None or status.ts_ns >= m.book.ts_recv_ns:
                self._clear(m)

    def on_fx(self, rate: FxRate, now_ns: int) -> None:
        problem = fx_problem(rate)
        if problem is not None:
            raise InvalidInput(problem, rate.pair)
        self.fx.update(rate)

    def set_instrument(self, instrument: Instrument) -> None:
        self.instruments.set(instrument)
        i = self._index.get((instrument.exchange, instrument.symbol))
        if i is not None:
            m = self._markets[i]
            m.fee = float(instrument.taker_fee)
            m.set_book(m.book)  # its ladders carry the old fee
            if m.book is not None:
                self._rates[2 * i] = m.book.bids[0][0] * (1.0 - m.fee)
                self._rates[2 * i + 1] = (1.0 - m.fee) / m.book.asks[0][0]

    def drop_asset(self, base: str) -> None:
        for m in self._markets:
            if m.base == base:
                self._clear(m)

    def _clear(self, m: _Market) -> None:
        m.set_book(None)
        self._rates[2 * m.index] = 0.0
        self._rates[2 * m.index + 1] = 0.0

    # ------------------------------------------------------------------ graph

    def _market(self, key: MarketKey) -> _Market:
        i = self._index.get(key)
        if i is not None:
            return self._markets[i]
        exchange, symbol = key
        m = _Market(len(self._markets), exchange, symbol, self.instruments.taker_fee(exchange, symbol))
        self._index[key] = m.index
        self._markets.append(m)
        self._rates += [0.0, 0.0]
        self._cycles_of.append([])
        links = self._links.setdefault(exchange, {})
        around_base = links.setdefault(m.base, {})
        around_quote = links.setdefault(m.quote, {})
        if m.quote in around_base:  # a second market on the same currency pair: not part of cycles
            return m
        for third in around_base.keys() & around_quote.keys():
            self._add_triangle(exchange, (m.base, m.quote, third), {
                frozenset((m.base, m.quote)): m.index,
                frozenset((m.base, third)): around_base[third],
                frozenset((m.quote, third)): around_quote[third],
            })
        around_base[m.quote] = m.index
        around_quote[m.base] = m.index
        return m

    def _add_triangle(self, exchange: str, currencies: tuple[str, str, str],
                      markets: dict[frozenset[str], int]) -> None:
        start = next((c for c in self.config.start_currencies if c in currencies), None)
        if start is None:
            return
        a, b = (c for c in currencies if c != start)
        for path in ((start, a, b), (start, b, a)):
            hops = ((path[0], path[1]), (path[1], path[2]), (path[2], path[0]))
            idx = tuple(markets[frozenset(h)] for h in hops)
            sides = tuple("sell" if self._markets[i].base == h[0] else "buy" for i, h in zip(idx, hops, strict=True))
            cycle = Cycle(exchange, path, idx, sides)  # type: ignore[arg-type]
            ci = len(self.cycles)
            self.cycles.append(cycle)
            s0, s1, s2 = cycle.rate_slots
            for i in set(idx):
                self._cycles_of[i].append((s0, s1, s2, ci))

    # ------------------------------------------------------------------ evaluation

    def opportunities(self, now_ns: int, market: MarketKey | None = None) -> list[TriangularOpportunity]:
        """Profitable cycles now (through ``market`` if given, else all), best profit first, no cooldown."""
        candidates: list[int]
        if market is None:
            candidates = list(range(len(self.cycles)))
        else:
            i = self._index.get(market)
            if i is None:
                return []
            candidates = self._crossing(i)
        found = [opp for ci in candidates if (opp := self._evaluate(self.cycles[ci], now_ns)) is not None]
        found.sort(key=lambda o: o.net_profit, reverse=True)
        return found

    def _crossing(self, market: int) -> list[int]:
        rates = self._rates
        hurdle = self._hurdle
        return [ci for s0, s1, s2, ci in self._cycles_of[market] if rates[s0] * rates[s1] * rates[s2] >= hurdle]

    def _evaluate(self, cycle: Cycle, now_ns: int) -> TriangularOpportunity | None:
        sized = self._size(cycle, now_ns)
        return self._round(sized) if sized is not None else None

    def _size(self, cycle: Cycle, now_ns: int) -> _Sized | None:
        """The best continuous size of a cycle (fresh books and a start value needed), before rounding."""
        oldest = now_ns - self.config.max_book_age_ns
        markets = [self._markets[i] for i in cycle.markets]
        books: list[BookSnapshot] = []
        for m in markets:
            if m.book is None or m.book.ts_recv_ns < oldest:
                return None
            books.append(m.book)
        value = self._start_value(cycle.exchange, cycle.currencies[0], now_ns)
        if value is None:
            return None
        start_value, fx_age, fx_rate = value
        ladders = [m.ladder(side) for m, side in zip(markets, cycle.sides, strict=True)]
        x, out = _walk(ladders, self._hurdle, self.config.max_notional / start_value)
        if x <= 0.0:
            return None
        return _Sized(cycle, books, markets, start_value, fx_age, fx_rate, x, out)

    def _round(self, sized: _Sized) -> TriangularOpportunity | None:
        """The legs of a sized cycle floored to their lots, forwards, and the profit they keep."""
        legs: list[TriangularLeg] = []
        available = sized.start
        for book, m, side in zip(sized.books, sized.markets, sized.cycle.sides, strict=True):
            leg = self._leg(book, m, side, available)
            if leg is None:
                return None
            legs.append(leg)
            available = leg.received
        opp = TriangularOpportunity(
            cycle=sized.cycle, legs=(legs[0], legs[1], legs[2]), start_amount=legs[0].spent, end_amount=available,
            start_value=sized.start_value, unrounded_start=sized.start, unrounded_profit=sized.end - sized.start,
            fx_age_ns=sized.fx_age, fx_rate=sized.fx_rate,
        )
        if opp.profit <= 0.0 or opp.profit < opp.start_amount * self.config.min_profit:
            return None
        return opp

    def _leg(self, book: BookSnapshot, m: _Market, side: Side, available: float) -> TriangularLeg | None:
        """The rounded order that turns at most ``available`` of the leg's input into its output."""
        inst = self.instruments.get(m.exchange, m.symbol)
        if side == "sell":
            qty = round_to_step(snap(available), inst.lot_size, up=False)
            if qty <= 0:
                return None
            sold = take(book.bids, float(qty), paying=False)
            if sold is None:
                return None
            gross, worst = sold
            spent = float(qty)
        else:
            base = base_for(book.asks, available)
            qty = round_to_step(snap(base), inst.lot_size, up=False)
            if qty <= 0:
                return None
            bought = take(book.asks, float(qty), paying=True)
            if bought is None:
                return None
            spent, worst = bought
            gross = float(qty)
        price = round_price(inst, worst, side)
        if not meets_minimums(inst, price, qty):
            return None
        return TriangularLeg(book=book, side=side, quantity=qty, price=price, spent=spent,
                             received=gross * (1.0 - m.fee), gross_received=gross)

    def _start_value(self, exchange: str, currency: str, now_ns: int) -> tuple[float, int | None, float | None] | None:
        """(reference value of one unit, FX age, FX rate) of the start currency: from the
        exchange's own book against the reference currency if fresh, else through FX."""
        ref = self.config.reference_currency
        if currency == ref:
            return 1.0, None, None
        oldest = now_ns - self.config.max_book_age_ns
        for symbol, inverse in ((f"{currency}/{ref}", False), (f"{ref}/{currency}", True)):
            i = self._index.get((exchange, symbol))
            book = self._markets[i].book if i is not None else None
            if book is not None and book.ts_recv_ns >= oldest:
                mid = (book.bids[0][0] + book.asks[0][0]) / 2
                return (1.0 / mid if inverse else mid), None, None
        conv = self.fx.conversion(currency, ref, now_ns)
        if conv is None:
            return None
        return conv.mid, conv.age_ns(now_ns), conv.rates[0][1] if conv.rates else None

    # ------------------------------------------------------------------ output

    def _signals(self, m: _Market, trigger: BookSnapshot, now_ns: int) -> list[Signal]:
        crossing = self._crossing(m.index)
        if not crossing:
            return []
        # Every cycle here runs through this market, so at most one of them can trade: the most
        # profitable after rounding. Rounding only loses profit, so each cycle's continuous profit
        # bounds its rounded one: round the best first and stop once no bound can beat the best
        # rounded profit (a hub such as BTC/USDT jumping crosses hundreds of cycles at once).
        sized = [s for ci in crossing if (s := self._size(self.cycles[ci], now_ns)) is not None]
        sized.sort(key=lambda s: s.bound, reverse=True)
        best: TriangularOpportunity | None = None
        for candidate in sized:
            if best is not None and candidate.bound * (1 + 1e-9) <= best.net_profit:
                break
            opp = self._round(candidate)
            if opp is not None and (best is None or opp.net_profit > best.net_profit):
                best = opp
        if best is None or self._cooling(best, now_ns):
            return []
        return [self._signal(best, trigger, now_ns)]

    def _cooling(self, opp: TriangularOpportunity, now_ns: int) -> bool:
        key = (opp.cycle.exchange, opp.cycle.markets)
        edge = opp.net_edge_bps
        held = self._cooldown.get(key)
        if held is not None:
            until, last_edge = held
            if now_ns < until and edge < last_edge + self.config.reemit_edge_step_bps:
                return True
        self._cooldown[key] = (now_ns + self.config.cooldown_ns, edge)
        return False

    def _signal(self, opp: TriangularOpportunity, trigger: BookSnapshot, now_ns: int) -> Signal:
        legs = [
            SignalLeg(exchange=leg.book.exchange, symbol=leg.book.symbol, side=leg.side, price=leg.price,
                      quantity=leg.quantity, book_seq=leg.book.seq, book_age_ns=now_ns - leg.book.ts_recv_ns)
            for leg in opp.legs
        ]
        start = opp.cycle.currencies[0]
        gross_factor = 1.0 + opp.gross_edge_bps / 10_000
        return Signal(
            signal_id=signal_id("triangular", start, legs, [leg.book.ts_recv_ns for leg in opp.legs]),
            strategy="triangular",
            asset=start,
            legs=legs,
            gross_edge_bps=opp.gross_edge_bps,
            net_edge_bps=opp.net_edge_bps,
            expected_profit=opp.net_profit,
            profit_currency=self.config.reference_currency,
            notional=opp.notional,
            ts_ns=now_ns,
            ts_origin_ns=trigger.ts_recv_ns,
            fx_rate=opp.fx_rate,
            fx_age_ns=opp.fx_age_ns,
            meta={
                "cycle": list(opp.cycle.currencies),
                "start_amount": opp.start_amount,
                "end_amount": opp.end_amount,
                "profit_start_currency": opp.profit,
                "gross_profit": opp.start_amount * (gross_factor - 1.0) * opp.start_value,
                "start_value": opp.start_value,
            },
        )


# ------------------------------------------------------------------ book walking


def _ladder(book: BookSnapshot, fee: float, side: Side) -> list[tuple[float, float]]:
    """A leg's book as (rate after fee, capacity in the leg's input currency), best first."""
    keep = 1.0 - fee
    if side == "sell":
        return [(price * keep, size) for price, size in book.bids]
    return [(keep / price, size * price) for price, size in book.asks]


def _walk(ladders: list[list[tuple[float, float]]], hurdle: float, max_start: float) -> tuple[float, float]:
    """(start amount, end amount) of the largest size whose marginal rate around the cycle
    clears ``hurdle``, walking the three ladders together."""
    l0, l1, l2 = ladders
    i0 = i1 = i2 = 0
    r0, c0 = l0[0]
    r1, c1 = l1[0]
    r2, c2 = l2[0]
    x = out = 0.0
    while r0 * r1 * r2 >= hurdle:
        # Capacity of each leg's current level, in start-currency units.
        k0, k1, k2 = c0, c1 / r0, c2 / (r0 * r1)
        step = min(k0, k1, k2)
        room = max_start - x
        if room <= step:  # the notional limit binds inside these levels
            if room > 0.0:
                x += room
                out += room * r0 * r1 * r2
            break
        x += step
        out += step * r0 * r1 * r2
        c0 = 0.0 if step == k0 else c0 - step
        c1 = 0.0 if step == k1 else c1 - step * r0
        c2 = 0.0 if step == k2 else c2 - step * r0 * r1
        if c0 <= 0.0:
            i0 += 1
            if i0 == len(l0):
                break
            r0, c0 = l0[i0]
        if c1 <= 0.0:
            i1 += 1
            if i1 == len(l1):
                break
            r1, c1 = l1[i1]
        if c2 <= 0.0:
            i2 += 1
            if i2 == len(l2):
                break
            r2, c2 = l2[i2]
    return x, out
