"""The risk core: pure, synchronous, deterministic; time is an argument.

``RiskBook`` turns a signal into either a stateless rejection or a ``DecideRequest`` (what
to check and reserve in the shared state), and the state's outcome into the verdict: the
``Decision`` (always), the ``OrderIntent`` (approvals) and ``Alert``s. It also turns an
``Execution`` into a ``SettleRequest`` and its outcome into alerts. It never does I/O.

``RiskEngine`` binds a book to a ``MemoryRiskState`` for the backtest: the same decisions
as the service (which binds the book to ``RedisRiskState``), without Redis.

Checks, in order (the first that fails names the verdict, see ``reasons.py``):
stateless: invalid, stale signal, stale FX, stale book, max notional per trade, anomaly
(price off its venue's rolling median, or venues of one asset too far apart); then, in
the state and atomically: kill switch, circuit breaker, daily loss, drawdown, cooldowns,
order rate, open arbitrages, exposure (total, coin, exchange), balances.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast, get_args

import msgspec

from services.risk import ids, reasons
from services.risk.limits import RiskLimits
from services.risk.market import MarketView
from services.risk.state import (
    BalanceClaim,
    Claim,
    CooldownClaim,
    DecideOutcome,
    DecideRequest,
    MemoryRiskState,
    RateClaim,
    SettleOutcome,
    SettleRequest,
    make_record,
)
from services.risk.units import to_float, units_nearest, units_of_float, units_up
from shared.models import (
    Alert,
    Balance,
    Decision,
    Execution,
    FxRate,
    Instrument,
    OrderIntent,
    OrderLeg,
    RiskReservation,
    Signal,
    SignalLeg,
    Strategy,
    split_symbol,
)
from shared.money import meets_minimums, tick_for

SOURCE = "risk"
MAX_AMOUNT_UNITS = 10**17
"""1e9 of any asset: larger is a bug upstream, and Redis's 64-bit counters must never overflow."""
_ASSET = re.compile(r"^[A-Z0-9]{1,20}$")
MAX_SIGNAL_ID = 128
_STRATEGIES = frozenset(get_args(Strategy))
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A stateless verdict: the shared state is not consulted."""

    reason: str
    detail: str
    notional: int = 0


@dataclass(frozen=True, slots=True)
class Assessment:
    """A signal that passed the stateless checks, and what approving it reserves."""

    request: DecideRequest
    reservation: RiskReservation


@dataclass(slots=True)
class Verdict:
    decision: Decision
    intent: OrderIntent | None = None
    alerts: list[Alert] = field(default_factory=list)


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def day_label(now_ns: int, limits: RiskLimits) -> str:
    """The trading day of ``now_ns``: the date in the configured time zone (resets at its midnight)."""
    return datetime.fromtimestamp(now_ns // 1_000_000_000, limits.timezone).date().isoformat()


@functools.lru_cache(maxsize=4096)
def _parts(symbol: str) -> tuple[str, str]:
    """``split_symbol``, cached: a handful of symbols are parsed on every signal."""
    return split_symbol(symbol)


class _DayClock:
    """``day_label`` without a time-zone conversion per signal: the label holds until the next midnight."""

    __slots__ = ("_end_s", "_label", "_limits", "_start_s")

    def __init__(self, limits: RiskLimits) -> None:
        self._limits = limits
        self._start_s = self._end_s = 0
        self._label = ""

    def label(self, now_ns: int) -> str:
        s = now_ns // 1_000_000_000
        if not self._start_s <= s < self._end_s:
            tz = self._limits.timezone
            local = datetime.fromtimestamp(s, tz)
            midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
            self._label = local.date().isoformat()
            self._start_s = int(midnight.timestamp())
            self._end_s = int((midnight + timedelta(days=1)).replace(tzinfo=None).replace(tzinfo=tz).timestamp())
            if not self._start_s <= s < self._end_s:  # a day that is not 24 h long: no caching
                self._start_s = self._end_s = 0
        return self._label


def _finite_positive(value: Decimal) -> bool:
    return value.is_finite() and value > 0


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity: a cache key
class _Shape:
    """What approving a signal reserves, but for the amounts and times: every counter and cooldown
    name, cap, reason and order count. It depends only on the signal's asset and legs (exchange,
    symbol, side), the limits and the taker fees, so it is made once per such shape."""

    symbol_cooldown: str
    symbol_cooldown_ms: int
    venue_cooldown: str
    coin: str
    coin_cap: int
    exchanges: tuple[tuple[str, int], ...]
    """(``x:ex:<exchange>``, cap) per exchange, in the order the legs name them."""
    leg_exchange: tuple[int, ...]
    """Each leg's index in ``exchanges``."""
    balances: tuple[tuple[str, str, str], ...]
    """(exchange, asset, ``rb:<exchange>:<asset>``) per balance the legs draw on, in leg order."""
    leg_balance: tuple[int, ...]
    """Each leg's index in ``balances``."""
    buy_factor: tuple[Decimal | None, ...]
    """Per leg: 1 + taker fee for a buy (it pays price x quantity x that in the quote), None for a sell."""
    rates: tuple[RateClaim, ...]
    orders: tuple[tuple[str, int], ...]


class _Shapes:
    """``_Shape``s by (asset, legs), for one ``RiskLimits`` and one set of instruments."""

    MAX = 4096
    """Shapes are bounded by the configured markets; a flood of odd ones only empties the cache."""

    __slots__ = ("_shapes", "limits", "open_claim")

    def __init__(self, limits: RiskLimits) -> None:
        self.limits = limits
        self.open_claim = Claim("open", 1, limits.max_open_arbitrages, reasons.MAX_OPEN)
        self._shapes: dict[tuple[str, tuple[tuple[str, str, str], ...]], _Shape] = {}

    def get(self, book: RiskBook, signal: Signal, parts: list[tuple[str, str]]) -> _Shape:
        key = (signal.asset, tuple([(leg.exchange, leg.symbol, leg.side) for leg in signal.legs]))
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= self.MAX:
                self._shapes.clear()
            shape = self._shapes[key] = self._make(book, signal, parts)
        return shape

    def _make(self, book: RiskBook, signal: Signal, parts: list[tuple[str, str]]) -> _Shape:
        lim = self.limits
        sym = lim.for_asset(signal.asset)
        exchanges: dict[str, int] = {}
        orders: dict[str, int] = {}
        balances: dict[tuple[str, str], int] = {}
        leg_exchange: list[int] = []
        leg_balance: list[int] = []
        buy_factor: list[Decimal | None] = []
        for leg, (base, quote) in zip(signal.legs, parts, strict=True):
            leg_exchange.append(exchanges.setdefault(leg.exchange, len(exchanges)))
            orders[leg.exchange] = orders.get(leg.exchange, 0) + 1
            key = (leg.exchange, quote if leg.side == "buy" else base)
            leg_balance.append(balances.setdefault(key, len(balances)))
            buy_factor.append(_ONE + book._taker_fee(leg) if leg.side == "buy" else None)
        return _Shape(
            symbol_cooldown=f"s:{signal.asset}", symbol_cooldown_ms=sym.cooldown_ms,
            venue_cooldown="v:" + "|".join(sorted(exchanges)),
            coin=f"x:coin:{signal.asset}", coin_cap=sym.max_exposure,
            exchanges=tuple((f"x:ex:{ex}", lim.exchange_cap(ex)) for ex in exchanges),
            leg_exchange=tuple(leg_exchange),
            balances=tuple((ex, asset, f"rb:{ex}:{asset}") for ex, asset in balances),
            leg_balance=tuple(leg_balance), buy_factor=tuple(buy_factor),
            rates=tuple(RateClaim(ex, n, lim.order_rate_limit) for ex, n in orders.items()),
            orders=tuple(orders.items()),
        )


class RiskBook:
    def __init__(self, limits: RiskLimits, *, env: str, session: str) -> None:
        self.limits = limits
        self.env = env
        self.session = session
        self.market = MarketView(limits.reference_currency, limits.price_window_ns)
        self._day = _DayClock(limits)
        self.instruments: dict[str, dict[str, Instrument]] = {}
        self._alerted: dict[str, tuple[int, int]] = {}
        """Reject reason -> (last alert time, rejections since): per-signal alerts are throttled."""
        self._shapes_cache: _Shapes | None = None

    # ------------------------------------------------------------------ inputs

    def set_limits(self, limits: RiskLimits) -> None:
        self.limits = limits
        self._day = _DayClock(limits)
        self.market.reference = limits.reference_currency
        self.market.set_window(limits.price_window_ns)

    def set_instruments(self, exchange: str, instruments: Iterable[Instrument]) -> None:
        self.instruments[exchange] = {i.symbol: i for i in instruments}
        self._shapes_cache = None  # their taker fees are in the shapes

    def on_fx(self, fx: FxRate) -> None:
        self.market.on_fx(fx)

    def arb_id(self, signal_id: str) -> str:
        return ids.arb_id(self.env, self.session, signal_id)

    # ------------------------------------------------------------------ signals

    def assess(self, signal: Signal, now_ns: int) -> Assessment | Rejection:
        try:
            return self._assess(signal, now_ns)
        except _Reject as r:
            return Rejection(r.reason, r.detail)

    def _assess(self, signal: Signal, now_ns: int) -> Assessment:
        lim = self.limits
        parts = self._validate(signal, now_ns)
        age = now_ns - signal.ts_ns
        if age > lim.max_signal_age_ns:
            raise _Reject(reasons.STALE_SIGNAL,
                          f"signal is {age / 1e6:.0f} ms old > {lim.max_signal_age_ns / 1e6:.0f} ms")
        rates = self._rates(signal, now_ns, parts)
        sym = lim.for_asset(signal.asset)
        legs = signal.legs
        waited = max(0, age)
        for leg in legs:
            book_age = leg.book_age_ns + waited
            if book_age > sym.max_book_age_ns:
                raise _Reject(reasons.STALE_BOOK, f"{leg.exchange} {leg.symbol} book is {book_age / 1e6:.0f} ms old "
                                                  f"> {sym.max_book_age_ns / 1e6:.0f} ms")
        # legs quoted in the reference currency (the sentinel rate) need no division: x / 1 is x exactly
        values = [leg.price * leg.quantity for leg in legs]
        quoted = [rates[quote] for _, quote in parts]
        leg_units = [units_up(v if r is _ONE else v / r) for v, r in zip(values, quoted, strict=True)]
        notional = max(max(leg_units), units_of_float(signal.notional))
        if notional > sym.max_notional_per_trade:
            raise _Reject(reasons.MAX_NOTIONAL, f"notional {to_float(notional):.2f} > "
                                                f"{to_float(sym.max_notional_per_trade):.2f} {lim.reference_currency}")
        try:
            self._anomaly(signal, parts, quoted, now_ns, sym.max_price_deviation, sym.max_venue_deviation)
        finally:
            market = self.market
            for leg, (base, quote) in zip(legs, parts, strict=True):
                market.observe_parts(leg.exchange, leg.symbol, base, quote, leg.price, signal.ts_ns)
        return self._request(signal, now_ns, notional, leg_units, parts, values)

    def _validate(self, signal: Signal, now_ns: int) -> list[tuple[str, str]]:
        """Raises ``_Reject`` (invalid); returns each leg's (base, quote)."""
        def bad(detail: str) -> _Reject:
            return _Reject(reasons.INVALID, detail)

        if not signal.signal_id or len(signal.signal_id) > MAX_SIGNAL_ID or not signal.signal_id.isprintable():
            raise bad("signal_id must be 1-128 printable characters")
        if len(signal.legs) < 2:
            raise bad(f"an arbitrage needs at least 2 legs, got {len(signal.legs)}")
        if len(signal.legs) > ids.MAX_LEGS:
            raise bad(f"too many legs ({len(signal.legs)})")
        seen: set[tuple[str, str, str]] = set()
        parts: list[tuple[str, str]] = []
        for i, leg in enumerate(signal.legs):
            if not _finite_positive(leg.quantity):
                raise bad(f"leg {i}: quantity must be positive, got {leg.quantity}")
            if not _finite_positive(leg.price):
                raise bad(f"leg {i}: price must be positive, got {leg.price}")
            if leg.book_age_ns < 0:
                raise bad(f"leg {i}: negative book age")
            try:
                parts.append(_parts(leg.symbol))
            except ValueError:
                raise bad(f"leg {i}: {leg.symbol!r} is not a BASE/QUOTE symbol") from None
            markets = self.limits.exchanges.get(leg.exchange)
            if markets is None:
                raise bad(f"leg {i}: unknown or disabled exchange {leg.exchange!r}")
            if leg.symbol not in markets.symbols:
                raise bad(f"leg {i}: unknown symbol {leg.symbol} on {leg.exchange}")
            known = self.instruments.get(leg.exchange)
            if known:
                instrument = known.get(leg.symbol)
                if instrument is None:
                    raise bad(f"leg {i}: {leg.symbol} is not listed on {leg.exchange}")
                self._check_instrument(i, leg, instrument)
            key = (leg.exchange, leg.symbol, leg.side)
            if key in seen:
                raise bad(f"leg {i}: duplicate leg {leg.side} {leg.symbol} on {leg.exchange}")
            seen.add(key)
        # The asset names the per-coin exposure: it must be one the legs trade.
        if not _ASSET.match(signal.asset) or all(signal.asset not in p for p in parts):
            raise bad(f"asset {signal.asset!r} is not traded by the legs")
        if not (math.isfinite(signal.notional) and signal.notional > 0):
            raise bad(f"notional must be a positive number, got {signal.notional!r}")
        if signal.ts_ns - now_ns > self.limits.max_clock_skew_ns:
            raise bad(f"signal time is {(signal.ts_ns - now_ns) / 1e6:.0f} ms in the future")
        return parts

    @staticmethod
    def _check_instrument(i: int, leg: SignalLeg, instrument: Instrument) -> None:
        tick = tick_for(instrument, leg.price)
        if tick > 0 and leg.price % tick != 0:
            raise _Reject(reasons.INVALID, f"leg {i}: price {leg.price} is off the {tick} tick")
        if instrument.lot_size > 0 and leg.quantity % instrument.lot_size != 0:
            raise _Reject(reasons.INVALID, f"leg {i}: quantity {leg.quantity} is off the {instrument.lot_size} lot")
        if not meets_minimums(instrument, leg.price, leg.quantity):
            raise _Reject(reasons.INVALID, f"leg {i}: below the minimum size of {leg.exchange} {leg.symbol}")

    def _rates(self, signal: Signal, now_ns: int, parts: list[tuple[str, str]]) -> dict[str, Decimal]:
        """Units of each quote currency per reference unit, checking FX age. The reference's own
        rate is the ``_ONE`` sentinel (callers skip dividing by it)."""
        lim = self.limits
        ref = lim.reference_currency
        rates: dict[str, Decimal] = {ref: _ONE}
        if all(quote == ref for _, quote in parts):
            return rates
        in_signal = {base: leg.price for leg, (base, quote) in zip(signal.legs, parts, strict=True) if quote == ref}
        for leg, (_, quote) in zip(signal.legs, parts, strict=True):
            if quote in rates:
                continue
            fx = self.market.fx_quote(quote)
            if fx is not None:
                fx_age = now_ns - fx.ts_ns
                if fx_age > lim.max_fx_age_ns:
                    raise _Reject(reasons.STALE_FX, f"{ref}/{quote} rate is {fx_age / 1e6:.0f} ms old "
                                                    f"> {lim.max_fx_age_ns / 1e6:.0f} ms")
                if signal.fx_age_ns is not None and signal.fx_age_ns > lim.max_fx_age_ns:
                    raise _Reject(reasons.STALE_FX, f"the detector's FX rate was {signal.fx_age_ns / 1e6:.0f} ms old")
                rates[quote] = fx.rate
            elif quote in in_signal:
                rates[quote] = _ONE / in_signal[quote]
            elif quote in self.market.last_price:
                rates[quote] = _ONE / self.market.last_price[quote][0]
            else:  # no rate at all is the stalest rate there is
                raise _Reject(reasons.STALE_FX, f"no {ref}/{quote} rate to value the {leg.symbol} leg")
        return rates

    def _anomaly(self, signal: Signal, parts: list[tuple[str, str]], quoted: list[Decimal], now_ns: int,
                 max_price_deviation: float, max_venue_deviation: float) -> None:
        lim = self.limits
        by_base: dict[str, list[tuple[float, SignalLeg]]] = {}
        for leg, (base, _), rate in zip(signal.legs, parts, quoted, strict=True):
            price = float(leg.price)
            by_base.setdefault(base, []).append((price if rate is _ONE else float(leg.price / rate), leg))
            median = self.market.median(leg.exchange, leg.symbol, now_ns, lim.price_window_min_samples)
            if median is not None and median > 0:
                off = abs(price / median - 1)
                if off > max_price_deviation:
                    raise _Reject(reasons.ANOMALY, f"{leg.exchange} {leg.symbol} price {leg.price} is {off:.2%} off "
                                                   f"its {lim.price_window_ns / 1e9:.0f} s median {median:g} "
                                                   f"(max {max_price_deviation:.2%})")
        for base, priced in by_base.items():
            if len({leg.exchange for _, leg in priced}) < 2:
                continue
            lo = min(priced, key=lambda p: p[0])
            hi = max(priced, key=lambda p: p[0])
            spread = hi[0] / lo[0] - 1
            if spread > max_venue_deviation:
                raise _Reject(reasons.ANOMALY, f"{base} is {spread:.2%} apart between {lo[1].exchange} and "
                                               f"{hi[1].exchange} (max {max_venue_deviation:.2%})")

    def _request(self, signal: Signal, now_ns: int, notional: int, leg_units: list[int],
                 parts: list[tuple[str, str]], values: list[Decimal]) -> Assessment:
        """What approving the signal reserves. ``values`` are the legs' price x quantity."""
        lim = self.limits
        shapes = self._shapes()
        shape = shapes.get(self, signal, parts)
        arb = self.arb_id(signal.signal_id)
        now_ms = now_ns // 1_000_000
        intent_expires_ns = now_ns + lim.intent_ttl_ns
        expires_ms = -(-intent_expires_ns // 1_000_000) + lim.reservation_grace_ms
        per_exchange = [0] * len(shape.exchanges)
        for i, units in zip(shape.leg_exchange, leg_units, strict=True):
            per_exchange[i] += units
        needs = [0] * len(shape.balances)
        for i, leg, value, factor in zip(shape.leg_balance, signal.legs, values, shape.buy_factor, strict=True):
            needs[i] += units_up(leg.quantity if factor is None else value * factor)
        cooldowns = (
            CooldownClaim(shape.symbol_cooldown, now_ms + shape.symbol_cooldown_ms if shape.symbol_cooldown_ms else 0,
                          reasons.COOLDOWN_SYMBOL),
            CooldownClaim(shape.venue_cooldown,
                          now_ms + lim.venue_pair_cooldown_ms if lim.venue_pair_cooldown_ms else 0,
                          reasons.COOLDOWN_VENUE),
        )
        claims = (
            shapes.open_claim,
            Claim("x:total", notional, lim.max_total_exposure, reasons.EXPOSURE_TOTAL),
            Claim(shape.coin, notional, shape.coin_cap, reasons.EXPOSURE_COIN),
            *[Claim(name, units, cap, reasons.EXPOSURE_EXCHANGE)
              for (name, cap), units in zip(shape.exchanges, per_exchange, strict=True)],
        )
        counters = [(c.field, c.units) for c in claims]
        counters += [(name, units) for (_, _, name), units in zip(shape.balances, needs, strict=True)]
        if max(units for _, units in counters) > MAX_AMOUNT_UNITS:
            raise _Reject(reasons.INVALID, "an amount exceeds 1e9 units of its asset")
        request = DecideRequest(
            signal_id=signal.signal_id, arb_id=arb, ts_ns=now_ns, now_ms=now_ms,
            intent_expires_ns=intent_expires_ns, expires_ms=expires_ms, notional=notional,
            day=self._day.label(now_ns), daily_loss_limit=lim.daily_loss_limit, starting_equity=lim.starting_equity,
            max_drawdown=lim.max_drawdown, require_balances=lim.require_balances,
            verdict_retention_ms=lim.verdict_retention_ms, rate_window_ms=lim.order_rate_window_ms,
            cooldowns=cooldowns, rates=shape.rates, claims=claims,
            balances=tuple([BalanceClaim(ex, asset, units)
                            for (ex, asset, _), units in zip(shape.balances, needs, strict=True)]),
            record=make_record(counters), template=shape,
        )
        reservation = RiskReservation(
            arb_id=arb, expires_ms=expires_ms, counters={name: units for name, units in counters if units},
            cooldowns={c.field: c.until_ms for c in cooldowns if c.until_ms > now_ms}, orders=dict(shape.orders),
        )
        return Assessment(request, reservation)

    def _shapes(self) -> _Shapes:
        shapes = self._shapes_cache
        if shapes is None or shapes.limits is not self.limits:
            shapes = self._shapes_cache = _Shapes(self.limits)
        return shapes

    def _taker_fee(self, leg: SignalLeg) -> Decimal:
        instrument = self.instruments.get(leg.exchange, {}).get(leg.symbol)
        if instrument is not None:
            return instrument.taker_fee
        return self.limits.exchanges[leg.exchange].taker_fee

    # ------------------------------------------------------------------ verdicts

    def rejected(self, signal: Signal, rejection: Rejection, now_ns: int) -> Verdict:
        """The published result of a stateless rejection."""
        notional = to_float(rejection.notional) if rejection.notional else _safe_float(signal.notional)
        decision = Decision(
            decision_id=ids.decision_id(self.arb_id(signal.signal_id)), signal_id=signal.signal_id,
            strategy=signal.strategy, approved=False, reason=rejection.reason, detail=rejection.detail,
            notional=notional, ts_ns=now_ns, ts_origin_ns=signal.ts_origin_ns,
        )
        return Verdict(decision, None, self._reject_alerts(decision, now_ns))

    def approval(self, signal: Signal, assessed: Assessment, now_ns: int) -> Verdict:
        """What approving ``assessed`` publishes, as ``decided`` would build it for a first approval: made
        before the state answers, so the state can publish it in the same atomic step as the reservation."""
        req = assessed.request
        outcome = DecideOutcome(reasons.APPROVED, req.ts_ns, req.notional, req.intent_expires_ns)
        return self.decided(signal, assessed, outcome, now_ns)

    def decided(self, signal: Signal, assessed: Assessment, outcome: DecideOutcome, now_ns: int) -> Verdict:
        """The published result of a signal the state decided: the decision, and the intent if approved."""
        arb = assessed.request.arb_id
        detail = self.describe(outcome)
        decision = Decision(
            decision_id=ids.decision_id(arb), signal_id=signal.signal_id, strategy=signal.strategy,
            approved=outcome.approved, reason=outcome.reason, detail=detail, notional=to_float(outcome.notional),
            ts_ns=outcome.ts_ns, ts_origin_ns=signal.ts_origin_ns,
            reservation=assessed.reservation if outcome.approved and not outcome.duplicate else None,
        )
        if not outcome.approved:
            return Verdict(decision, None, [] if outcome.duplicate else self._reject_alerts(decision, now_ns))
        if outcome.finished:
            return Verdict(decision)
        intent = OrderIntent(
            arb_id=arb, signal_id=signal.signal_id, strategy=signal.strategy,
            legs=[OrderLeg(client_order_id=ids.client_order_id(arb, i), exchange=leg.exchange, symbol=leg.symbol,
                           side=leg.side, price=leg.price, quantity=leg.quantity, order_type="limit",
                           time_in_force="IOC")
                  for i, leg in enumerate(signal.legs)],
            notional=to_float(outcome.notional), ts_ns=outcome.ts_ns, ts_origin_ns=signal.ts_origin_ns,
            expires_ns=outcome.expires_ns, expected_profit=_safe_float(signal.expected_profit),
            profit_currency=signal.profit_currency,
        )
        return Verdict(decision, intent, [])

    def describe(self, o: DecideOutcome) -> str:
        """The human detail of a state verdict, from the exact values the state compared."""
        ref = self.limits.reference_currency
        if o.reason == reasons.APPROVED:
            return "redelivered: same verdict as first decided" if o.duplicate else ""
        if o.reason == reasons.HALTED:
            try:
                payload = json.loads(o.subject)
                text = f"kill switch set ({payload.get('source', '?')}): {payload.get('reason', '')}"
            except (ValueError, AttributeError):
                text = f"kill switch set: {o.subject}"
        elif o.reason == reasons.CIRCUIT_BREAKER:
            text = f"circuit breaker open until {_iso_ms(o.current)}"
        elif o.reason == reasons.DAILY_LOSS:
            text = (f"realised PnL of {o.subject} {to_float(int(o.current)):.2f} <= "
                    f"-{to_float(int(o.cap)):.2f} {ref}")
        elif o.reason == reasons.DRAWDOWN:
            start = to_float(self.limits.starting_equity)
            peak, equity = start + to_float(int(o.amount)), start + to_float(int(o.current))
            text = (f"equity {equity:.2f} is {(peak - equity) / peak:.2%} below its peak {peak:.2f} "
                    f"(max {float(o.cap):.2%})")
        elif o.reason in (reasons.COOLDOWN_SYMBOL, reasons.COOLDOWN_VENUE):
            text = f"{o.subject[2:]} cooling down until {_iso_ms(o.current)}"
        elif o.reason == reasons.ORDER_RATE:
            text = f"{o.subject}: {o.current} orders in the window + {o.amount} > {o.cap}"
        elif o.reason == reasons.MAX_OPEN:
            text = f"{o.current} open arbitrages + 1 > {o.cap}"
        elif o.reason == reasons.BALANCE:
            asset = o.subject.split(":")[-1]
            if not o.current:
                text = f"{o.subject}: no balance known (require_balances)"
            else:
                text = (f"{o.subject}: free {to_float(int(o.current)):g} - reserved {to_float(int(o.cap)):g} "
                        f"< {to_float(int(o.amount)):g} {asset}")
        else:  # exposure limits
            text = (f"{o.subject} {to_float(int(o.current)):.2f} + {to_float(int(o.amount)):.2f} > "
                    f"{to_float(int(o.cap)):.2f} {ref}")
        return f"{text} (redelivered)" if o.duplicate else text

    def reject_undecodable(self, raw: bytes, error: str, entry_id: str, now_ns: int) -> Verdict:
        """A signal that does not even decode: rejected ``invalid`` all the same, with what can be read of it."""
        loose: Any
        try:
            loose = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            loose = None
        fields: dict[str, Any] = loose if isinstance(loose, dict) else {}
        signal_id = fields.get("signal_id")
        if not isinstance(signal_id, str) or not signal_id:
            signal_id = f"entry:{entry_id}"
        strategy = fields.get("strategy")
        origin = fields.get("ts_origin_ns")
        decision = Decision(
            decision_id=ids.decision_id(self.arb_id(signal_id)), signal_id=signal_id[:MAX_SIGNAL_ID],
            strategy=cast(Strategy, strategy if strategy in _STRATEGIES else "spatial"), approved=False,
            reason=reasons.INVALID, detail=f"undecodable signal: {error}"[:500], ts_ns=now_ns,
            ts_origin_ns=origin if isinstance(origin, int) and not isinstance(origin, bool) else 0,
        )
        return Verdict(decision, None, self._reject_alerts(decision, now_ns))

    def _reject_alerts(self, decision: Decision, now_ns: int) -> list[Alert]:
        """One alert per reject reason per ``alert_interval``, counting the ones in between."""
        last = self._alerted.get(decision.reason)
        interval = self.limits.alert_interval_ns
        if last is not None and now_ns - last[0] < interval:
            self._alerted[decision.reason] = (last[0], last[1] + 1)
            return []
        since = last[1] if last is not None else 0
        self._alerted[decision.reason] = (now_ns, 0)
        severity: Literal["info", "warning", "critical"] = (
            "warning" if decision.reason in _WARNING_REASONS else "info")
        more = f" ({since} more since the last alert)" if since else ""
        return [Alert(
            alert_id=f"risk:{decision.reason}:{decision.decision_id}", severity=severity, source=SOURCE,
            kind=f"guard_{decision.reason}", ts_ns=now_ns,
            message=f"signal {decision.signal_id} rejected ({decision.reason}): {decision.detail}{more}",
            labels={"reason": decision.reason, "strategy": decision.strategy},
        )]

    # ------------------------------------------------------------------ executions

    def settlement(self, execution: Execution) -> SettleRequest:
        """What a finished arbitrage changes; raises ``ValueError`` on a PnL that is not a number."""
        lim = self.limits
        pnl = execution.realised_pnl
        if not pnl.is_finite():
            raise ValueError(f"execution {execution.arb_id}: realised_pnl {pnl} is not a number")
        currency = execution.pnl_currency or lim.reference_currency
        if currency != lim.reference_currency:
            fx = self.market.fx_quote(currency)
            if fx is None:
                raise ValueError(f"execution {execution.arb_id}: cannot value PnL in {currency}")
            pnl = pnl / fx.rate
        ts_ms = execution.ts_ns // 1_000_000
        cooldowns: tuple[tuple[str, int], ...] = ()
        entries = [leg for leg in execution.legs if leg.role == "entry"] or execution.legs
        if lim.loss_cooldown_ms and entries:
            until = ts_ms + lim.loss_cooldown_ms
            bases = dict.fromkeys(_parts(leg.symbol)[0] for leg in entries)
            venue = "|".join(sorted({leg.exchange for leg in entries}))
            cooldowns = (*((f"s:{b}", until) for b in bases), (f"v:{venue}", until))
        return SettleRequest(
            arb_id=execution.arb_id, ts_ms=ts_ms, pnl=units_nearest(pnl), day=day_label(execution.ts_ns, lim),
            daily_loss_limit=lim.daily_loss_limit, starting_equity=lim.starting_equity,
            max_drawdown=lim.max_drawdown, breaker_losses=lim.breaker_losses,
            breaker_until_ms=ts_ms + lim.breaker_halt_ms, cooldowns=cooldowns,
            halt_payload=self._residual_halt(execution), settled_retention_ms=lim.settled_retention_ms,
        )

    def _residual_halt(self, execution: Execution) -> str:
        lim = self.limits
        if not lim.halt_on_residuals:
            return ""
        worst: tuple[str, str] | None = None
        for r in execution.residuals:
            if r.quantity == 0 or not r.quantity.is_finite():
                continue
            value = self._value(r.asset, abs(r.quantity))
            if value is None or value >= lim.residual_halt_notional:
                shown = "unknown value" if value is None else f"{to_float(value):.2f} {lim.reference_currency}"
                worst = (f"{r.quantity} {r.asset} on {r.exchange}", shown)
                break
        if worst is None:
            return ""
        return json.dumps({
            "source": "auto", "ts_ns": execution.ts_ns, "arb_id": execution.arb_id,
            "reason": f"residual exposure after arbitrage {execution.arb_id} ({execution.status}): "
                      f"{worst[0]}, {worst[1]}",
        }, sort_keys=True)

    def _value(self, asset: str, quantity: Decimal) -> int | None:
        ref = self.limits.reference_currency
        if asset == ref:
            return units_up(quantity)
        fx = self.market.fx_quote(asset)
        if fx is not None:
            return units_up(quantity / fx.rate)
        last = self.market.last_price.get(asset)
        return units_up(quantity * last[0]) if last is not None else None

    def settled_alerts(self, execution: Execution, outcome: SettleOutcome) -> list[Alert]:
        lim = self.limits
        ref = lim.reference_currency
        out: list[Alert] = []
        for trigger in outcome.triggers:
            if trigger == reasons.TRIGGER_DAILY_LOSS:
                message = (f"daily loss limit reached: realised {to_float(outcome.daily_pnl):.2f} <= "
                           f"-{to_float(lim.daily_loss_limit):.2f} {ref}; approvals stop until midnight "
                           f"{lim.timezone.key}")
            elif trigger == reasons.TRIGGER_DRAWDOWN:
                start = to_float(lim.starting_equity)
                peak, equity = start + to_float(outcome.peak_pnl), start + to_float(outcome.total_pnl)
                message = (f"max drawdown reached: equity {equity:.2f} is {(peak - equity) / peak:.2%} below its "
                           f"peak {peak:.2f} {ref}; approvals stop until `arb resume --guards`")
            elif trigger == reasons.TRIGGER_CIRCUIT_BREAKER:
                message = (f"circuit breaker: {lim.breaker_losses} losing arbitrages in a row; approvals halted "
                           f"for {lim.breaker_halt_ms / 1000:.0f} s")
            else:
                message = f"automatic kill switch: {json.loads(self._residual_halt(execution))['reason']}"
            out.append(Alert(
                alert_id=f"risk:{trigger}:{execution.arb_id}", severity="critical", source=SOURCE, kind=trigger,
                message=message, ts_ns=execution.ts_ns,
                labels={"arb_id": execution.arb_id, "guard": trigger},
            ))
        return out

    # ------------------------------------------------------------------ balances

    @staticmethod
    def balance_units(balance: Balance) -> int | None:
        """Free balance in units, rounded down (never more than there is); None if not a number."""
        if not balance.free.is_finite():
            return None
        return -units_up(-balance.free) if balance.free >= 0 else 0


_WARNING_REASONS = frozenset({reasons.INVALID, reasons.ERROR, reasons.ANOMALY, reasons.HALTED, reasons.CIRCUIT_BREAKER,
                              reasons.DAILY_LOSS, reasons.DRAWDOWN, reasons.BALANCE})


def _iso_ms(ms: str) -> str:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return ms


def _safe_float(value: float) -> float:
    return value if math.isfinite(value) else 0.0


class RiskEngine:
    """The core bound to an in-memory state: what the backtest drives (one process, simulated clock)."""

    def __init__(self, limits: RiskLimits, *, env: str = "backtest", session: str = "backtest",
                 state: MemoryRiskState | None = None) -> None:
        self.book = RiskBook(limits, env=env, session=session)
        self.state = state or MemoryRiskState()

    def check(self, signal: Signal, now_ns: int) -> Verdict:
        assessed = self.book.assess(signal, now_ns)
        if isinstance(assessed, Rejection):
            return self.book.rejected(signal, assessed, now_ns)
        return self.book.decided(signal, assessed, self.state.decide(assessed.request), now_ns)

    def on_execution(self, execution: Execution) -> list[Alert]:
        outcome = self.state.settle(self.book.settlement(execution))
        return [] if outcome.duplicate else self.book.settled_alerts(execution, outcome)

    def on_balance(self, balance: Balance) -> bool:
        units = self.book.balance_units(balance)
        return units is not None and self.state.set_balance(balance.exchange, balance.asset, units, balance.ts_ns)

    def on_fx(self, fx: FxRate) -> None:
        self.book.on_fx(fx)

    def expire(self, now_ns: int) -> list[str]:
        return self.state.expire(now_ns // 1_000_000)
