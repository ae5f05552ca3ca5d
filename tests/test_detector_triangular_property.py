"""The triangular core against brute force over every 3-cycle of random exchanges.

The oracle shares no code with the detector: it tries every combination of three markets,
keeps those that close a cycle, and for each direction enumerates every point where a
level of any leg runs out (mapped back to the start currency by inverting the legs), keeps
the prefixes whose every unit clears the threshold and takes the most profitable one.
Every signal the detector emits is then re-valued from the books: its rounded legs must be
executable as sent and return at least the threshold.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from decimal import Decimal

from services.detector.books import FallbackRules, InstrumentTable
from services.detector.triangular import TriangularConfig, TriangularDetector
from shared.models import BookSnapshot, Instrument, Signal

NOW = 1_700_000_000_000_000_000
MAX_BOOK_AGE = 2_000_000_000
START = ("USDT", "BTC", "ETH")
CURRENCIES = ("USDT", "BTC", "ETH", "SOL", "XRP", "DOGE")
RANK = {c: i for i, c in enumerate(CURRENCIES)}
"""A market's quote is the currency ranked first (SOL/BTC, never BTC/SOL)."""
VALUE_RANGES = {"USDT": (1.0, 1.0), "BTC": (20_000.0, 100_000.0), "ETH": (1_000.0, 5_000.0),
                "SOL": (10.0, 300.0), "XRP": (0.2, 3.0), "DOGE": (0.05, 0.5)}
EDGE_TOLERANCE = 1e-12


@dataclass
class Market:
    symbol: str
    base: str
    quote: str
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]
    fee: float
    lot: Decimal
    tick: Decimal
    min_notional: Decimal
    age_ns: int


@dataclass
class Case:
    markets: list[Market]
    threshold: float
    max_notional: float


def _sig(x: float) -> float:
    return float(f"{x:.8g}")


def random_case(rng: random.Random, *, fine_lots: bool) -> Case:
    names = ["USDT", "BTC", "ETH", *rng.sample(CURRENCIES[3:], rng.randint(1, 3))]
    value = {c: rng.uniform(*VALUE_RANGES[c]) for c in names}
    markets = []
    for a, b in itertools.combinations(names, 2):
        if rng.random() < 0.25:
            continue
        quote, base = (a, b) if RANK[a] < RANK[b] else (b, a)
        mid = value[base] / value[quote] * (1 + rng.uniform(-0.006, 0.006))
        half = mid * rng.uniform(0.00002, 0.001)
        asks, bids = [], []
        price = mid + half
        for _ in range(rng.randint(1, 6)):
            asks.append((_sig(price), _sig(rng.uniform(5.0, 400.0) / (price * value[quote]))))
            price *= 1 + rng.uniform(0.00005, 0.002)
        price = mid - half
        for _ in range(rng.randint(1, 6)):
            bids.append((_sig(price), _sig(rng.uniform(5.0, 400.0) / (price * value[quote]))))
            price *= 1 - rng.uniform(0.00005, 0.002)
        if fine_lots:
            lot, tick, min_notional = Decimal("1e-12"), Decimal("1e-12"), Decimal(0)
        else:
            lot = Decimal(rng.choice(("0.00001", "0.0001", "0.001", "0.01", "0.1")))
            tick = Decimal(f"{asks[0][0]:.8g}").as_tuple()
            tick = Decimal((0, (1,), tick.exponent))  # type: ignore[arg-type]
            min_notional = Decimal(rng.choice(("0", "0", "5"))) / Decimal(repr(_sig(value[quote])))
        markets.append(Market(
            symbol=f"{base}/{quote}", base=base, quote=quote, bids=bids, asks=asks,
            fee=rng.choice((0.0, 0.0002, 0.0005, 0.001, rng.uniform(0.0, 0.0015))),
            lot=lot, tick=tick, min_notional=min_notional.quantize(Decimal("1e-12")),
            age_ns=rng.randrange(MAX_BOOK_AGE + 1, 2 * MAX_BOOK_AGE) if rng.random() < 0.05
            else rng.randrange(0, MAX_BOOK_AGE // 4),
        ))
    return Case(markets=markets, threshold=rng.choice((0.0, 0.0003, rng.uniform(0.0, 0.002))),
                max_notional=rng.uniform(50.0, 3000.0))


# ------------------------------------------------------------------ the oracle


def leg_levels(market: Market, sell: bool) -> list[tuple[float, float]]:
    """(capacity in the leg's input currency, rate after fee) of each level."""
    if sell:
        return [(s, p * (1 - market.fee)) for p, s in market.bids]
    return [(s * p, (1 - market.fee) / p) for p, s in market.asks]


def apply(levels: list[tuple[float, float]], amount: float) -> float | None:
    out, left = 0.0, amount
    for capacity, rate in levels:
        used = min(capacity, left)
        out += used * rate
        left -= used
        if left <= amount * 1e-12:
            return out
    return None


def invert(levels: list[tuple[float, float]], target: float) -> float | None:
    """The input that makes ``apply`` return ``target``."""
    amount, out = 0.0, 0.0
    for capacity, rate in levels:
        if out + capacity * rate >= target:
            return amount + (target - out) / rate
        amount += capacity
        out += capacity * rate
    return None


def rate_at(levels: list[tuple[float, float]], amount: float) -> float:
    start = 0.0
    for capacity, rate in levels:
        if start + capacity >= amount:
            return rate
        start += capacity
    raise AssertionError("beyond the book")


def start_value(case: Case, currency: str) -> float | None:
    if currency == "USDT":
        return 1.0
    for m in case.markets:
        if m.age_ns <= MAX_BOOK_AGE and {m.base, m.quote} == {currency, "USDT"}:
            mid = (m.bids[0][0] + m.asks[0][0]) / 2
            return mid if m.base == currency else 1 / mid
    return None


def oracle_best(case: Case) -> tuple[float, tuple[str, ...]] | None:
    """(best profit in USDT before lot rounding, its currency path) over every 3-cycle."""
    best: tuple[float, tuple[str, ...]] | None = None
    for trio in itertools.combinations(case.markets, 3):
        currencies = {c for m in trio for c in (m.base, m.quote)}
        if len(currencies) != 3 or any(m.age_ns > MAX_BOOK_AGE for m in trio):
            continue
        start = next((c for c in START if c in currencies), None)
        value = start_value(case, start) if start else None
        if start is None or value is None:
            continue
        others = sorted(currencies - {start})
        for path in ((start, others[0], others[1]), (start, others[1], others[0])):
            legs = []
            for u, v in ((path[0], path[1]), (path[1], path[2]), (path[2], path[0])):
                m = next(m for m in trio if {m.base, m.quote} == {u, v})
                legs.append(leg_levels(m, sell=m.base == u))
            profit = oracle_cycle(legs, 1 + case.threshold, case.max_notional / value)
            if profit is not None and (best is None or profit * value > best[0]):
                best = (profit * value, path)
    return best


def oracle_cycle(legs: list[list[tuple[float, float]]], hurdle: float, max_start: float) -> float | None:
    l1, l2, l3 = legs
    points = {max_start}
    total = 0.0
    for capacity, _ in l1:
        total += capacity
        points.add(total)
    total = 0.0
    for capacity, _ in l2:
        total += capacity
        x = invert(l1, total)
        if x is not None:
            points.add(x)
    total = 0.0
    for capacity, _ in l3:
        total += capacity
        y = invert(l2, total)
        x = invert(l1, y) if y is not None else None
        if x is not None:
            points.add(x)
    best, previous = None, 0.0
    for x in sorted(points):
        y1 = apply(l1, x)
        y2 = apply(l2, y1) if y1 is not None else None
        y3 = apply(l3, y2) if y2 is not None else None
        if y3 is None or x > max_start * (1 + 1e-12):
            break
        mid = (previous + x) / 2
        m1 = apply(l1, mid)
        m2 = apply(l2, m1) if m1 is not None else None
        assert m1 is not None and m2 is not None
        if rate_at(l1, mid) * rate_at(l2, m1) * rate_at(l3, m2) < hurdle:
            break
        previous = x
        if y3 - x > 0 and (best is None or y3 - x > best):
            best = y3 - x
    return best


# ------------------------------------------------------------------ re-valuing a signal


def take(levels: list[tuple[float, float]], qty: float) -> float | None:
    amount, left = 0.0, qty
    for price, size in levels:
        used = min(size, left)
        amount += used * price
        left -= used
        if left <= qty * 1e-12:
            return amount
    return None


def revalue(case: Case, signal: Signal) -> float:
    """Net edge (fraction of the start amount) of the signal's legs on the books it came from."""
    by_symbol = {m.symbol: m for m in case.markets}
    path = signal.meta["cycle"]
    holding = None
    spent_first = None
    for k, leg in enumerate(signal.legs):
        m = by_symbol[leg.symbol]
        assert m.age_ns <= MAX_BOOK_AGE, "a stale book was used"
        assert leg.quantity % m.lot == 0 and leg.price % m.tick == 0
        assert leg.quantity * leg.price >= m.min_notional
        u, v = path[k], path[(k + 1) % 3]
        qty = float(leg.quantity)
        if leg.side == "sell":
            assert (m.base, m.quote) == (u, v)
            got = take([(p, s) for p, s in m.bids if p >= float(leg.price)], qty)
            spent, received = qty, (got or 0.0) * (1 - m.fee)
        else:
            assert (m.base, m.quote) == (v, u)
            got = take([(p, s) for p, s in m.asks if p <= float(leg.price)], qty)
            spent, received = (got or 0.0), qty * (1 - m.fee)
        assert got is not None, "the limit price does not reach the quantity"
        if holding is not None:
            assert spent <= holding * (1 + 1e-12), "a leg spends more than the previous leg returned"
        else:
            spent_first = spent
        holding = received
    assert holding is not None and spent_first is not None
    value = start_value(case, path[0])
    assert value is not None
    assert spent_first * value <= case.max_notional * (1 + 1e-9)
    net = holding - spent_first
    assert abs(net * value - signal.expected_profit) <= 1e-9 * max(1.0, abs(net * value))
    return net / spent_first


# ------------------------------------------------------------------ driving the detector


def detector_for(case: Case) -> TriangularDetector:
    config = TriangularConfig(reference_currency="USDT", min_profit=case.threshold, max_notional=case.max_notional,
                              max_book_age_ns=MAX_BOOK_AGE, cooldown_ns=0, start_currencies=START)
    return TriangularDetector(config, InstrumentTable(FallbackRules({}), [
        Instrument(exchange="ex", symbol=m.symbol, native=m.symbol, base=m.base, quote=m.quote,
                   tick_size=m.tick, lot_size=m.lot, min_notional=m.min_notional, taker_fee=Decimal(repr(m.fee)))
        for m in case.markets
    ]))


def feed(det: TriangularDetector, case: Case) -> list[Signal]:
    signals = []
    for seq, m in enumerate(case.markets, 1):
        book = BookSnapshot(exchange="ex", symbol=m.symbol, seq=seq, bids=m.bids, asks=m.asks,
                            ts_exchange_ns=NOW - m.age_ns, ts_recv_ns=NOW - m.age_ns)
        emitted = det.on_book(book, NOW)
        # An update signals the best rounded cycle through its market, however it prunes the search.
        through = det.opportunities(NOW, market=("ex", m.symbol))
        if through:
            [signal] = emitted
            assert abs(signal.expected_profit - through[0].net_profit) <= 1e-12 * max(1.0, through[0].net_profit)
        else:
            assert emitted == []
        signals += emitted
    return signals


def check_signals(case: Case, signals: list[Signal]) -> None:
    for signal in signals:
        edge = revalue(case, signal)
        assert edge >= case.threshold - EDGE_TOLERANCE, f"false positive: {edge} < {case.threshold}"


def test_best_cycle_equals_brute_force_over_all_3_cycles() -> None:
    rng = random.Random(77)
    cases, found = 6_000, 0
    for i in range(cases):
        case = random_case(rng, fine_lots=True)
        det = detector_for(case)
        signals = feed(det, case)
        expected = oracle_best(case)
        opportunities = det.opportunities(NOW)
        best = max(opportunities, key=lambda o: o.unrounded_profit * o.start_value, default=None)
        try:
            check_signals(case, signals)
            if expected is None:
                assert best is None, f"detector found {best}, brute force nothing"
                continue
            assert best is not None, f"brute force found {expected}, detector nothing"
            got = best.unrounded_profit * best.start_value
            assert abs(got - expected[0]) <= 1e-9 * max(1.0, expected[0]), (got, expected)
            if best.cycle.currencies != expected[1]:
                assert abs(got - expected[0]) <= 1e-12 * max(1.0, expected[0])  # a tie
            found += 1
        except AssertionError as exc:
            raise AssertionError(f"case {i}: {exc}\n{case}") from exc
    print(f"\ntriangular brute force: {cases} exchanges, {found} with a profitable cycle, best equal in all")
    assert cases * 0.1 < found < cases * 0.9


def test_no_rounded_triangular_signal_falls_below_threshold() -> None:
    rng = random.Random(78)
    cases, signals = 6_000, 0
    for i in range(cases):
        case = random_case(rng, fine_lots=False)
        emitted = feed(detector_for(case), case)
        try:
            check_signals(case, emitted)
        except AssertionError as exc:
            raise AssertionError(f"case {i}: {exc}\n{case}") from exc
        signals += len(emitted)
    print(f"\ntriangular re-valued: {signals} rounded signals over {cases} exchanges, 0 below threshold")
    assert signals > cases * 0.1
