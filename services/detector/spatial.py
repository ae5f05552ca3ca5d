"""Spatial arbitrage: buy an asset where it is cheapest, sell it where it is dearest, at the
same time, across every (exchange, quote) book of that asset.

All amounts are valued in the reference currency through ``FxTable`` (KRW books through the
published USDT/KRW rate, never a constant): what is paid at the side of the rate that makes it
dearer, what is received at the side that makes it cheaper, unless both books share their
quote (Upbit against Bithumb: no currency changes hands, so the mid values the profit).
For one buy book A and one sell book B the unit bought at ask ``a`` and sold at bid ``b``
earns, per unit of notional ``a * fx_a``::

    b * fx_b * (1 - fee_B) / (a * fx_a) - (1 + fee_A) - transfer_cost

Walking A's asks up and B's bids down this marginal edge only falls, so the size that makes
the most money while every unit still clears ``min_profit`` is "walk until the marginal edge
drops below it", capped by the notional limit and known balances. The quantity is then
floored to both markets' lots, the limit prices are the worst levels the rounded quantity
reaches (buy rounded up, sell down, to the tick) and the edge is recomputed on those rounded
figures, so the reported edge is what the books give for exactly the quantity sent.

Signal ``meta``: ``gross_profit``, ``fees``, ``transfer_cost`` (reference currency),
``buy_vwap``/``sell_vwap`` (each book's quote currency) and ``fx`` (pair -> rate used).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from decimal import Decimal

from services.detector.books import BookRegistry, InstrumentTable, MarketKey, book_problem
from services.detector.common import InvalidInput, signal_id
from services.detector.depth import snap, take
from services.detector.fx import Conversion, FxTable, fx_problem
from shared.config import Config
from shared.models import Balance, BookSnapshot, BookStatus, FxRate, Instrument, Level, Signal, SignalLeg
from shared.money import common_step, meets_minimums, round_price, round_to_step

_MS = 1_000_000
_EDGE_SLACK_BPS = 1e-6
"""Float slack when a bound must not fall below the edge it bounds (their arithmetic differs)."""


@dataclass(frozen=True, slots=True)
class SpatialConfig:
    reference_currency: str = "USDT"
    min_profit: float = 0.0005
    """Net edge (fraction of notional, after both taker fees) the marginal unit must keep."""
    max_notional: float = 1_000.0
    max_book_age_ns: int = 2_000 * _MS
    max_fx_age_ns: int = 60_000 * _MS
    cooldown_ns: int = 5_000 * _MS
    reemit_edge_step_bps: float = 1.0
    transfer_cost: float = 0.0
    """Amortised transfer cost as a fraction of notional."""

    @classmethod
    def from_config(cls, cfg: Config) -> SpatialConfig:
        d = cfg.detector
        return cls(
            reference_currency=cfg.trading.reference_currency,
            min_profit=cfg.trading.min_profit_threshold,
            max_notional=cfg.trading.max_notional,
            max_book_age_ns=d.max_book_age_ms * _MS,
            max_fx_age_ns=d.max_fx_age_ms * _MS,
            cooldown_ns=d.cooldown_ms * _MS,
            reemit_edge_step_bps=d.reemit_edge_step_bps,
            transfer_cost=d.transfer_cost_bps / 10_000,
        )


@dataclass(frozen=True, slots=True)
class SpatialOpportunity:
    """One (buy book, sell book) trade with its rounded figures; amounts in the reference currency
    unless named after a book's quote."""

    asset: str
    buy: BookSnapshot
    sell: BookSnapshot
    quantity: Decimal
    buy_price: Decimal
    sell_price: Decimal
    cost: float
    """Paid on the buy book for ``quantity`` at its levels, before fees, in its quote."""
    proceeds: float
    """Received on the sell book, before fees, in its quote."""
    notional: float
    gross_profit: float
    fees: float
    transfer_cost: float
    net_profit: float
    buy_fx: Conversion
    sell_fx: Conversion

    @property
    def net_edge_bps(self) -> float:
        return self.net_profit / self.notional * 10_000

    @property
    def gross_edge_bps(self) -> float:
        return self.gross_profit / self.notional * 10_000

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.asset, self.buy.exchange, self.buy.symbol, self.sell.exchange, self.sell.symbol)


@dataclass(frozen=True, slots=True)
class RouteEdge:
    """What one route (buy book, sell book) offers at the top of its books now, profitable or not:
    the marginal edge of the first unit, valued as the signals value it."""

    asset: str
    buy_exchange: str
    buy_symbol: str
    sell_exchange: str
    sell_symbol: str
    gross_edge_bps: float
    net_edge_bps: float
    fx_rate: float
    """The FX rate that valued a leg in the reference currency (1.0 when none was needed)."""
    notional: float
    """Reference value of the quantity both best levels carry, at the best ask."""

    @property
    def route(self) -> tuple[str, str, str, str, str]:
        return (self.asset, self.buy_exchange, self.buy_symbol, self.sell_exchange, self.sell_symbol)


@dataclass(frozen=True, slots=True)
class _SizedPair:
    """One pair walked to its best continuous size, not yet rounded."""

    asset: str
    buy: BookSnapshot
    sell: BookSnapshot
    buy_fx: Conversion
    sell_fx: Conversion
    buy_fee: float
    sell_fee: float
    pay: float
    """Reference value of one unit of the buy book's quote paid."""
    receive: float
    """Reference value of one unit of the sell book's quote received."""
    quote_free: float | None
    quantity: float
    bound: float
    """Net profit of the continuous size: no rounding of it can do better."""


# (book, fx route, taker fee, hurdle of its best ask, value of its best bid, fx version): what one
# evaluation needs of a book, derived once per book and FX change.
_Live = tuple[BookSnapshot, Conversion | None, float, float, float, int]


class SpatialDetector:
    """Pure core: books, FX rates and balances in, signals out; time is an argument."""

    def __init__(self, config: SpatialConfig, instruments: InstrumentTable, fx: FxTable | None = None) -> None:
        self.config = config
        self.instruments = instruments
        self.fx = fx if fx is not None else FxTable(config.max_fx_age_ns)
        self.books = BookRegistry()
        self._derived: dict[MarketKey, _Live] = {}
        self._balances: dict[tuple[str, str], float] = {}
        self._cooldown: dict[tuple[str, str, str, str, str], tuple[int, float]] = {}
        self._hurdle_extra = config.transfer_cost + config.min_profit

    # ------------------------------------------------------------------ inputs

    def on_book(self, book: BookSnapshot, now_ns: int, *, evaluate: bool = True) -> list[Signal]:
        """Take a book update; returns the signals it triggers (none if ``evaluate`` is False:
        only store it). Raises ``InvalidInput`` for a book no exchange could have sent (it is
        not used)."""
        if book.status == "synced":
            problem = book_problem(book)
            if problem is not None:
                raise InvalidInput(problem, f"{book.exchange} {book.symbol} seq {book.seq}")
        if not self.books.apply(book) or book.status != "synced" or not evaluate:
            return []
        return self._signals(book.symbol.partition("/")[0], book, now_ns)

    def on_status(self, status: BookStatus, now_ns: int) -> None:
        self.books.apply_status(status)

    def on_fx(self, rate: FxRate, now_ns: int) -> None:
        problem = fx_problem(rate)
        if problem is not None:
            raise InvalidInput(problem, rate.pair)
        self.fx.update(rate)

    def on_balance(self, balance: Balance) -> None:
        self._balances[(balance.exchange, balance.asset)] = float(balance.free)

    def set_instrument(self, instrument: Instrument) -> None:
        self.instruments.set(instrument)
        self._derived.pop((instrument.exchange, instrument.symbol), None)

    def drop_asset(self, base: str) -> None:
        """Forget an asset's books (its stream went to another replica)."""
        self.books.drop_base(base)

    def premiums(self, base: str, now_ns: int) -> dict[str, float]:
        """Each fresh venue's mid, valued in the reference currency at the FX mid, over the median
        mid of the venues quoting the reference currency itself, minus one (the kimchi premium of
        a KRW venue). Empty when no venue quotes the reference currency."""
        ref = self.config.reference_currency
        oldest = now_ns - self.config.max_book_age_ns
        mids: dict[tuple[str, str], float] = {}
        for (exchange, symbol), book in self.books.of_base(base).items():
            if book.status != "synced" or book.ts_recv_ns < oldest or not book.bids or not book.asks:
                continue
            conv = self.fx.conversion(symbol.partition("/")[2], ref, now_ns)
            if conv is not None:
                mids[(exchange, symbol)] = (book.bids[0][0] + book.asks[0][0]) / 2 * conv.mid
        local = sorted(mid for (_, symbol), mid in mids.items() if symbol.endswith("/" + ref))
        if not local:
            return {}
        n = len(local)
        median = local[n // 2] if n % 2 else (local[n // 2 - 1] + local[n // 2]) / 2
        return {exchange: mid / median - 1.0 for (exchange, _), mid in mids.items()}

    # ------------------------------------------------------------------ evaluation

    def opportunities(self, base: str, now_ns: int) -> list[SpatialOpportunity]:
        """Every profitable (buy, sell) pair of ``base`` now, best net profit first (no cooldown)."""
        found = []
        for buy, sell in self._crossing(base, now_ns):
            sized = self._size(base, buy, sell)
            opp = self._round(sized) if sized is not None else None
            if opp is not None:
                found.append(opp)
        found.sort(key=lambda o: o.net_profit, reverse=True)
        return found

    def _crossing(self, base: str, now_ns: int) -> list[tuple[_Live, _Live]]:
        """(buy, sell) pairs of fresh books whose best prices cross after fees and threshold."""
        live = self._live(base, now_ns)
        if len(live) < 2:
            return []
        best_bid = max(venue[4] for venue in live)
        best_ask = min(venue[3] for venue in live)
        if best_bid < best_ask:  # the usual case: no book's best bid clears another's best ask
            return []
        return [(buy, sell) for sell in live for buy in live if buy is not sell and sell[4] >= buy[3]]

    def _live(self, base: str, now_ns: int) -> list[_Live]:
        """The fresh books of ``base`` with a fresh FX route to the reference currency."""
        books = self.books.of_base(base)
        if len(books) < 2:
            return []
        oldest = now_ns - self.config.max_book_age_ns
        fx_oldest = now_ns - self.fx.max_age_ns
        version = self.fx.version
        derived = self._derived
        live: list[_Live] = []
        for key, book in books.items():
            if book.ts_recv_ns < oldest:
                continue
            venue = derived.get(key)
            if venue is None or venue[0] is not book or venue[5] != version:
                venue = self._derive(key, book)
            conv = venue[1]
            if conv is None or (conv.ts_ns and conv.ts_ns < fx_oldest):
                continue
            live.append(venue)
        return live

    def route_edges(self, base: str, now_ns: int) -> list[RouteEdge]:
        """Every (buy, sell) pair of fresh books of ``base`` with the edge of its first unit at the
        best levels, valued as ``_size`` values it (the FX side that makes a payment dearer and
        receipts cheaper, the mid when both books share their quote), whether or not it pays."""
        live = self._live(base, now_ns)
        out: list[RouteEdge] = []
        for bbook, bfx, bfee, _, _, _ in live:
            for sbook, sfx, sfee, _, _, _ in live:
                if bbook is sbook:
                    continue
                assert bfx is not None and sfx is not None  # _live keeps routed books only
                if bbook.symbol.partition("/")[2] == sbook.symbol.partition("/")[2]:
                    pay = receive = bfx.mid
                else:
                    pay, receive = bfx.cost, sfx.proceeds
                (ask, ask_size), (bid, bid_size) = bbook.asks[0], sbook.bids[0]
                paid = ask * pay
                ratio = bid * receive / paid
                net = ratio * (1.0 - sfee) - (1.0 + bfee) - self.config.transfer_cost
                rates = bfx.rates + sfx.rates
                out.append(RouteEdge(
                    asset=base, buy_exchange=bbook.exchange, buy_symbol=bbook.symbol,
                    sell_exchange=sbook.exchange, sell_symbol=sbook.symbol,
                    gross_edge_bps=(ratio - 1.0) * 10_000, net_edge_bps=net * 10_000,
                    fx_rate=rates[0][1] if rates else 1.0, notional=min(ask_size, bid_size) * paid,
                ))
        return out

    def _derive(self, key: MarketKey, book: BookSnapshot) -> _Live:
        """What the evaluation needs of one book, cached until the book or the FX rates change."""
        quote = key[1].partition("/")[2]
        fee = self.instruments.taker_fee(*key)
        conv = self.fx.route(quote, self.config.reference_currency)
        if conv is None:
            hurdle, top = math.inf, 0.0
        else:  # at the mid: a screen that lets through every pair the exact test could accept
            hurdle = book.asks[0][0] * conv.mid * (1.0 + fee + self._hurdle_extra)
            top = book.bids[0][0] * conv.mid * (1.0 - fee)
        venue = (book, conv, fee, hurdle, top, self.fx.version)
        self._derived[key] = venue
        return venue

    def _size(self, base: str, buy: _Live, sell: _Live) -> _SizedPair | None:
        """Walk one pair to its best continuous size, before any rounding."""
        cfg = self.config
        bbook, bfx, bfee, _, _, _ = buy
        sbook, sfx, sfee, _, _, _ = sell
        assert bfx is not None and sfx is not None  # venues without a route never get here
        bquote = bbook.symbol.partition("/")[2]
        if bquote == sbook.symbol.partition("/")[2]:
            pay = receive = bfx.mid  # no currency changes hands: the profit is in one quote, valued at the mid
        else:
            pay, receive = bfx.cost, sfx.proceeds
        quote_free = self._balances.get((bbook.exchange, bquote))
        q, gain = _max_quantity(
            bbook.asks, sbook.bids,
            ask_unit=pay,
            bid_unit=receive * (1.0 - sfee),
            hurdle=1.0 + bfee + self._hurdle_extra,
            cost_mult=1.0 + bfee + cfg.transfer_cost,
            max_notional=cfg.max_notional,
            base_cap=self._balances.get((sbook.exchange, base)),
            quote_cap=quote_free,
            lock_mult=1.0 + bfee,
        )
        if q <= 0.0:
            return None
        return _SizedPair(base, bbook, sbook, bfx, sfx, bfee, sfee, pay, receive, quote_free, q, gain)

    def _round(self, sized: _SizedPair) -> SpatialOpportunity | None:
        """Floor the size to both lots, put the limits on the tick, and value what is left."""
        cfg = self.config
        bbook, sbook, bfee = sized.buy, sized.sell, sized.buy_fee
        quote_free = sized.quote_free
        binst = self.instruments.get(bbook.exchange, bbook.symbol)
        sinst = self.instruments.get(sbook.exchange, sbook.symbol)
        lot = common_step(binst.lot_size, sinst.lot_size)
        qty = round_to_step(snap(sized.quantity), lot, up=False)
        while True:
            if qty <= 0:
                return None
            qf = float(qty)
            bought = take(bbook.asks, qf, paying=True)
            sold = take(sbook.bids, qf, paying=False)
            if bought is None or sold is None:
                return None
            cost, worst_ask = bought
            proceeds, worst_bid = sold
            buy_price = round_price(binst, worst_ask, "buy")
            sell_price = round_price(sinst, worst_bid, "sell")
            # The exchange locks quantity x limit price (+ fee) of quote for a limit buy.
            if quote_free is None or float(qty * buy_price) * (1.0 + bfee) <= quote_free:
                break
            smaller = round_to_step(snap(quote_free / (float(buy_price) * (1.0 + bfee))), lot, up=False)
            qty = smaller if smaller < qty else qty - lot
        if not (meets_minimums(binst, buy_price, qty) and meets_minimums(sinst, sell_price, qty)):
            return None
        notional = cost * sized.pay
        received = proceeds * sized.receive
        gross = received - notional
        fees = notional * bfee + received * sized.sell_fee
        transfer = notional * cfg.transfer_cost
        net = gross - fees - transfer
        if net <= 0.0 or net < notional * cfg.min_profit:
            return None
        return SpatialOpportunity(
            asset=sized.asset, buy=bbook, sell=sbook, quantity=qty, buy_price=buy_price, sell_price=sell_price,
            cost=cost, proceeds=proceeds, notional=notional, gross_profit=gross, fees=fees,
            transfer_cost=transfer, net_profit=net, buy_fx=sized.buy_fx, sell_fx=sized.sell_fx,
        )

    # ------------------------------------------------------------------ output

    def _signals(self, base: str, trigger: BookSnapshot, now_ns: int) -> list[Signal]:
        """The best opportunity, then the best among the books it leaves unused, and so on (two
        signals sharing a book would both count its depth).

        Rounding only loses profit, so a pair's continuous profit bounds its rounded one: pairs
        are rounded lazily, best bound first, and one is taken once its rounded profit is at
        least every remaining bound. This picks what rounding them all would, for a fraction
        of the Decimal work.
        """
        pairs = self._crossing(base, now_ns)
        if not pairs or self._all_cooling(base, pairs, now_ns):
            return []
        heap: list[tuple[float, int, _SizedPair, SpatialOpportunity | None]] = []
        for i, (buy, sell) in enumerate(pairs):
            sized = self._size(base, buy, sell)
            if sized is not None:
                heap.append((-sized.bound * (1 + 1e-9), i, sized, None))
        heapq.heapify(heap)
        out: list[Signal] = []
        used: set[MarketKey] = set()
        while heap:
            _, i, sized, opp = heapq.heappop(heap)
            buy_key = (sized.buy.exchange, sized.buy.symbol)
            sell_key = (sized.sell.exchange, sized.sell.symbol)
            if buy_key in used or sell_key in used:
                continue
            if opp is None:
                opp = self._round(sized)
                if opp is not None:
                    heapq.heappush(heap, (-opp.net_profit, i, sized, opp))
                continue
            used.add(buy_key)
            used.add(sell_key)
            if not self._cooling(opp, now_ns):
                out.append(self._signal(opp, trigger, now_ns))
        return out

    def _all_cooling(self, base: str, pairs: list[tuple[_Live, _Live]], now_ns: int) -> bool:
        """True when every crossing pair is cooling down with no room to beat its last edge by the
        re-emit step: then whatever sizing and rounding find, nothing is signalled and no state
        changes, so neither is done (most updates while a premium lasts).

        The edge of the first unit (best bid against best ask) bounds the edge of any quantity:
        deeper levels only sell lower and buy higher, and rounding only walks fewer of them.
        """
        cooldown = self._cooldown
        step = self.config.reemit_edge_step_bps
        extra = 1.0 + self.config.transfer_cost
        for buy, sell in pairs:
            bbook, bfx, bfee = buy[0], buy[1], buy[2]
            sbook, sfx, sfee = sell[0], sell[1], sell[2]
            held = cooldown.get((base, bbook.exchange, bbook.symbol, sbook.exchange, sbook.symbol))
            if held is None or now_ns >= held[0]:
                return False
            assert bfx is not None and sfx is not None  # venues without a route never cross
            if bbook.symbol.partition("/")[2] == sbook.symbol.partition("/")[2]:
                pay = receive = bfx.mid  # as _size values a pair in one quote
            else:
                pay, receive = bfx.cost, sfx.proceeds
            first = (sbook.bids[0][0] * receive * (1.0 - sfee) / (bbook.asks[0][0] * pay) - extra - bfee) * 10_000
            if first + _EDGE_SLACK_BPS >= held[1] + step:
                return False
        return True

    def _cooling(self, opp: SpatialOpportunity, now_ns: int) -> bool:
        """True if this opportunity was signalled recently and its edge has not grown enough."""
        key = opp.key
        edge = opp.net_edge_bps
        held = self._cooldown.get(key)
        if held is not None:
            until, last_edge = held
            if now_ns < until and edge < last_edge + self.config.reemit_edge_step_bps:
                return True
        self._cooldown[key] = (now_ns + self.config.cooldown_ns, edge)
        return False

    def _signal(self, opp: SpatialOpportunity, trigger: BookSnapshot, now_ns: int) -> Signal:
        legs = [
            SignalLeg(exchange=opp.buy.exchange, symbol=opp.buy.symbol, side="buy", price=opp.buy_price,
                      quantity=opp.quantity, book_seq=opp.buy.seq, book_age_ns=now_ns - opp.buy.ts_recv_ns),
            SignalLeg(exchange=opp.sell.exchange, symbol=opp.sell.symbol, side="sell", price=opp.sell_price,
                      quantity=opp.quantity, book_seq=opp.sell.seq, book_age_ns=now_ns - opp.sell.ts_recv_ns),
        ]
        rates = opp.buy_fx.rates + opp.sell_fx.rates
        fx_ts = [c.ts_ns for c in (opp.buy_fx, opp.sell_fx) if c.ts_ns]
        qf = float(opp.quantity)
        return Signal(
            signal_id=signal_id("spatial", opp.asset, legs,
                                (opp.buy.ts_recv_ns, opp.sell.ts_recv_ns, *rates, *fx_ts)),
            strategy="spatial",
            asset=opp.asset,
            legs=legs,
            gross_edge_bps=opp.gross_edge_bps,
            net_edge_bps=opp.net_edge_bps,
            expected_profit=opp.net_profit,
            profit_currency=self.config.reference_currency,
            notional=opp.notional,
            ts_ns=now_ns,
            ts_origin_ns=trigger.ts_recv_ns,
            fx_rate=rates[0][1] if rates else None,
            fx_age_ns=now_ns - min(fx_ts) if fx_ts else None,
            meta={
                "gross_profit": opp.gross_profit,
                "fees": opp.fees,
                "transfer_cost": opp.transfer_cost,
                "buy_vwap": opp.cost / qf,
                "sell_vwap": opp.proceeds / qf,
                "fx": dict(rates),
            },
        )


def _max_quantity(
    asks: list[Level],
    bids: list[Level],
    *,
    ask_unit: float,
    bid_unit: float,
    hurdle: float,
    cost_mult: float,
    max_notional: float,
    base_cap: float | None,
    quote_cap: float | None,
    lock_mult: float,
) -> tuple[float, float]:
    """Walk asks up and bids down together while the marginal unit clears the hurdle
    (``bid * bid_unit >= ask * ask_unit * hurdle``); returns the quantity walked and its net
    profit (each unit earning ``bid * bid_unit - ask * ask_unit * cost_mult``).

    Stops early at the notional limit (``ask * ask_unit`` per unit), at the seller's base
    balance and where the buyer's quote balance no longer covers quantity x ask x lock_mult.
    """
    n_asks, n_bids = len(asks), len(bids)
    i = j = 0
    a, left_a = asks[0]
    b, left_b = bids[0]
    q = 0.0
    notional = 0.0
    gain = 0.0
    q_limit = math.inf if base_cap is None else base_cap
    while b * bid_unit >= a * ask_unit * hurdle:
        step = left_a if left_a < left_b else left_b
        room = (max_notional - notional) / (a * ask_unit)
        if quote_cap is not None:
            room = min(room, quote_cap / (a * lock_mult) - q)
        room = min(room, q_limit - q)
        if room <= step:
            if room > 0.0:
                return q + room, gain + room * (b * bid_unit - a * ask_unit * cost_mult)
            return q, gain
        q += step
        notional += step * a * ask_unit
        gain += step * (b * bid_unit - a * ask_unit * cost_mult)
        left_a -= step
        left_b -= step
        if left_a <= 0.0:
            i += 1
            if i == n_asks:
                break
            a, left_a = asks[i]
        if left_b <= 0.0:
            j += 1
            if j == n_bids:
                break
            b, left_b = bids[j]
    return q, gain
