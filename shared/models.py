"""Everything that travels on the bus, as msgspec Structs.

Every message is one JSON object with a ``type`` tag, so ``XRANGE`` stays readable
for operators and one decoder handles any stream. Money that must be exact (order
prices and sizes, fills, fees, balances, PnL) is ``Decimal`` and travels as a string;
market data is ``float`` because detection math needs speed (see docs/architecture.md).

Times are integers in nanoseconds since the epoch (``*_ns``). Market data carries three:
the exchange's event time, the collector's receive time and the publish time, so every
hop can measure its own latency and staleness. ``ts_origin_ns`` on signals, decisions,
orders and fills is the collector receive time of the frame that started the chain.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal, TypeAlias, TypeVar

import msgspec

Side: TypeAlias = Literal["buy", "sell"]
Strategy: TypeAlias = Literal["spatial", "triangular", "statistical"]
BookState: TypeAlias = Literal["synced", "stale"]
Level: TypeAlias = tuple[float, float]
"""One price level: (price, size)."""


class Message(msgspec.Struct, tag_field="type", omit_defaults=True, kw_only=True):
    """Base of every bus message; the subclass's tag names it on the wire."""


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTC/KRW"`` -> ``("BTC", "KRW")``. Only for our unified symbols."""
    base, _, quote = symbol.partition("/")
    if not base or not quote:
        raise ValueError(f"not a unified BASE/QUOTE symbol: {symbol!r}")
    return base, quote


# --------------------------------------------------------------------------- market data


class BookSnapshot(Message, tag="book", kw_only=True):
    """Top-N of one (exchange, symbol) book after a change, best level first."""

    exchange: str
    symbol: str
    seq: int
    bids: list[Level]
    asks: list[Level]
    ts_exchange_ns: int
    ts_recv_ns: int
    ts_pub_ns: int = 0
    status: BookState = "synced"

    @property
    def base(self) -> str:
        return split_symbol(self.symbol)[0]

    @property
    def quote(self) -> str:
        return split_symbol(self.symbol)[1]


class BookStatus(Message, tag="book_status", kw_only=True):
    """A book turned stale (gap, checksum, disconnect, silence) or synced again."""

    exchange: str
    symbol: str
    status: BookState
    reason: str
    seq: int = 0
    ts_ns: int


class TopOfBook(Message, tag="bbo", kw_only=True):
    """Best bid/offer from a faster channel than the L2 book (e.g. Binance bookTicker)."""

    exchange: str
    symbol: str
    seq: int
    bid: float
    bid_size: float
    ask: float
    ask_size: float
    ts_exchange_ns: int
    ts_recv_ns: int
    ts_pub_ns: int = 0


class Trade(Message, tag="trade", kw_only=True):
    exchange: str
    symbol: str
    trade_id: str
    price: float
    size: float
    side: Side
    """The taker's side."""
    ts_exchange_ns: int
    ts_recv_ns: int
    ts_pub_ns: int = 0


class FxRate(Message, tag="fx", kw_only=True):
    """How many units of the pair's quote one unit of its base buys: ``USDT/KRW`` ~ 1380."""

    pair: str
    rate: float
    source: str
    ts_source_ns: int
    ts_pub_ns: int = 0
    bid: float | None = None
    ask: float | None = None


class Instrument(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Trading rules of one market, read from the exchange at start-up (collector) and
    shared through Redis (``KeySpace.instruments``)."""

    exchange: str
    symbol: str
    """Unified ``BASE/QUOTE``."""
    native: str
    """The exchange's own symbol (``BTCUSDT``, ``KRW-BTC``, ``BTC-USDT``)."""
    base: str
    quote: str
    tick_size: Decimal
    lot_size: Decimal
    min_qty: Decimal = Decimal(0)
    min_notional: Decimal = Decimal(0)
    taker_fee: Decimal = Decimal("0.001")
    maker_fee: Decimal = Decimal("0.001")
    tick_table: list[tuple[Decimal, Decimal]] = []
    """Price-dependent ticks (Upbit KRW): (price at or above, tick), highest first."""


# --------------------------------------------------------------------------- trading


class SignalLeg(msgspec.Struct, kw_only=True, omit_defaults=True):
    exchange: str
    symbol: str
    side: Side
    price: Decimal
    """Limit price: the worst level walked, on the instrument's tick."""
    quantity: Decimal
    """On the instrument's lot."""
    book_seq: int = 0
    book_age_ns: int = 0


class Signal(Message, tag="signal", kw_only=True):
    """An opportunity found by a detector, net of fees and depth."""

    signal_id: str
    strategy: Strategy
    asset: str
    legs: list[SignalLeg]
    gross_edge_bps: float
    net_edge_bps: float
    expected_profit: float
    """Expected net profit in ``profit_currency``."""
    profit_currency: str
    notional: float
    """Size of the trade in the reference currency."""
    ts_ns: int
    ts_origin_ns: int = 0
    fx_rate: float | None = None
    fx_age_ns: int | None = None
    action: Literal["open", "close"] = "open"
    meta: dict[str, Any] = {}


class SpreadSample(Message, tag="spread", kw_only=True):
    """The best top-of-book edge of one route (buy book, sell book) over one interval, for the
    ``spread_history`` table: what the route offered, whether or not it crossed."""

    asset: str
    strategy: Strategy
    buy_exchange: str
    buy_symbol: str
    sell_exchange: str
    sell_symbol: str
    ts_ns: int
    """When the route showed this edge."""
    gross_edge_bps: float
    """Best bid valued as received over best ask valued as paid, minus one."""
    net_edge_bps: float
    """The same after both taker fees and the amortised transfer cost."""
    fx_rate: float
    """The FX rate that valued a leg in the reference currency (1.0 when none was needed)."""
    notional: float
    """Reference value of the quantity both best levels carry."""


class RiskReservation(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What risk reserved for an approved arbitrage, exactly as it reserved it.

    Carried on the approving ``Decision`` so the risk state can be rebuilt from the
    ``decisions`` stream after Redis lost it. Amounts are fixed-point integers (1e-8 units
    of the reference currency or of the asset), so the rebuilt state is exact.
    """

    arb_id: str
    expires_ms: int
    """When the reservation lapses if no execution released it (intent expiry + grace)."""
    counters: dict[str, int] = {}
    """Guard counter -> amount reserved (``open``, ``x:total``, ``x:coin:BTC``, ``rb:binance:USDT``, ...)."""
    cooldowns: dict[str, int] = {}
    """Cooldown -> until (ms since the epoch)."""
    orders: dict[str, int] = {}
    """Exchange -> orders counted by the order-rate limit at the decision time."""


class Decision(Message, tag="decision", kw_only=True):
    """Risk's verdict on one signal; every verdict is published for audit."""

    decision_id: str
    signal_id: str
    strategy: Strategy
    approved: bool
    reason: str
    """``approved`` or a reject code such as ``max_notional``, ``stale_book``, ``invalid``."""
    detail: str = ""
    notional: float = 0.0
    ts_ns: int
    ts_origin_ns: int = 0
    reservation: RiskReservation | None = None
    """Set on approvals only."""


class OrderLeg(msgspec.Struct, kw_only=True, omit_defaults=True):
    client_order_id: str
    exchange: str
    symbol: str
    side: Side
    price: Decimal
    quantity: Decimal
    order_type: Literal["limit", "market"] = "limit"
    time_in_force: Literal["IOC", "FOK", "GTC"] = "IOC"


class OrderIntent(Message, tag="order", kw_only=True):
    """An approved arbitrage: all its legs, sent at once by the executor."""

    arb_id: str
    signal_id: str
    strategy: Strategy
    legs: list[OrderLeg]
    notional: float
    ts_ns: int
    ts_origin_ns: int = 0
    expires_ns: int = 0
    expected_profit: float = 0.0
    profit_currency: str = ""


OrderStatus: TypeAlias = Literal[
    "NEW", "PARTIALLY_FILLED", "FILLED", "CANCELED", "REJECTED", "EXPIRED", "UNKNOWN"
]


class OrderUpdate(Message, tag="order_update", kw_only=True):
    """One transition of one leg's order state machine."""

    client_order_id: str
    arb_id: str
    exchange: str
    symbol: str
    side: Side
    status: OrderStatus
    filled_quantity: Decimal = Decimal(0)
    average_price: Decimal | None = None
    exchange_order_id: str = ""
    reason: str = ""
    ts_ns: int


class Fill(Message, tag="fill", kw_only=True):
    fill_id: str
    """The exchange's trade id (paper: derived from the client order id and the level)."""
    client_order_id: str
    arb_id: str
    exchange: str
    symbol: str
    side: Side
    price: Decimal
    quantity: Decimal
    fee: Decimal
    fee_asset: str
    liquidity: Literal["taker", "maker"] = "taker"
    mode: Literal["paper", "live", "backtest"] = "paper"
    ts_ns: int
    ts_origin_ns: int = 0


class ExecutionLeg(msgspec.Struct, kw_only=True, omit_defaults=True):
    client_order_id: str
    exchange: str
    symbol: str
    side: Side
    status: OrderStatus
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    fee_asset: str = ""
    role: Literal["entry", "hedge", "unwind"] = "entry"


class Residual(msgspec.Struct, kw_only=True):
    """Exposure left behind by a broken arbitrage: signed quantity of ``asset`` on ``exchange``."""

    exchange: str
    asset: str
    quantity: Decimal


ExecutionStatus: TypeAlias = Literal["completed", "partial", "hedged", "unwound", "failed", "expired"]


class Execution(Message, tag="execution", kw_only=True):
    """A finished arbitrage with its realised PnL."""

    arb_id: str
    signal_id: str
    strategy: Strategy
    status: ExecutionStatus
    legs: list[ExecutionLeg]
    realised_pnl: Decimal
    """In ``pnl_currency`` (the reference currency), fees included."""
    pnl_currency: str
    fees: Decimal = Decimal(0)
    notional: Decimal = Decimal(0)
    residuals: list[Residual] = []
    ts_ns: int
    ts_origin_ns: int = 0
    pnl_by_currency: dict[str, Decimal] = {}
    """Realised PnL per currency before conversion, exact; ``realised_pnl`` converts these."""
    fx_rates: dict[str, Decimal] = {}
    """The rates (pair -> rate) used to convert ``pnl_by_currency`` into ``pnl_currency``."""


class Balance(Message, tag="balance", kw_only=True):
    exchange: str
    asset: str
    free: Decimal
    locked: Decimal = Decimal(0)
    mode: Literal["paper", "live", "backtest"] = "paper"
    ts_ns: int


TransferState: TypeAlias = Literal[
    "planned", "awaiting_approval", "approved", "sent", "completed", "cancelled", "failed"
]


class TransferStep(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One edge of a rebalancing route: a withdrawal between venues or a same-venue conversion.

    Withdrawal: ``amount`` arrives at the destination; ``fee`` (in the asset) is charged on
    top at the source, which is debited ``amount + fee``. Conversion: ``amount`` of
    ``from_asset`` is sold at the book for ``amount_out`` of ``to_asset``, net of the taker
    ``fee`` (in ``to_asset``). ``network`` is the chain of a withdrawal and the market
    (``USDT/KRW``) of a conversion.
    """

    kind: Literal["withdrawal", "conversion"]
    from_exchange: str
    to_exchange: str
    from_asset: str
    to_asset: str
    amount: Decimal
    fee: Decimal = Decimal(0)
    network: str = ""
    expected_seconds: float = 0.0
    amount_out: Decimal = Decimal(0)
    """What the step delivers at ``to_exchange`` in ``to_asset`` (expected, for conversions)."""
    network_label: str = ""
    """The source exchange's own name for ``network`` (what its withdrawal endpoint expects)."""
    address: str = ""
    """Withdrawal destination, taken only from the whitelist (``rebalancer.addresses``)."""
    memo: str = ""


class Transfer(Message, tag="transfer", kw_only=True):
    transfer_id: str
    asset: str
    """The asset being restored at the destination."""
    steps: list[TransferStep]
    state: TransferState
    expected_cost: float
    """In the reference currency, fees plus the cost of capital in flight."""
    expected_seconds: float
    ts_ns: int
    reason: str = ""
    mode: Literal["paper", "live", "backtest"] = "paper"
    """Only ``live`` transfers may ever reach an exchange's withdrawal endpoint."""


class Alert(Message, tag="alert", kw_only=True):
    alert_id: str
    severity: Literal["info", "warning", "critical"]
    source: str
    kind: str
    message: str
    ts_ns: int
    labels: dict[str, str] = {}


class Heartbeat(Message, tag="heartbeat", kw_only=True):
    service: str
    instance: str
    pid: int
    ts_ns: int
    started_ns: int
    status: Literal["ok", "degraded", "stopping"] = "ok"
    http_port: int = 0
    host: str = "127.0.0.1"


AnyMessage: TypeAlias = (
    BookSnapshot
    | BookStatus
    | TopOfBook
    | Trade
    | FxRate
    | Signal
    | SpreadSample
    | Decision
    | OrderIntent
    | OrderUpdate
    | Fill
    | Execution
    | Balance
    | Transfer
    | Alert
    | Heartbeat
)

# --------------------------------------------------------------------------- codec

_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder: msgspec.json.Decoder[AnyMessage] = msgspec.json.Decoder(AnyMessage)

M = TypeVar("M", bound=Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | str) -> AnyMessage:
    """Decode any bus message; raises ``msgspec.DecodeError`` / ``ValidationError`` on bad input."""
    return _decoder.decode(data)


def decoder_for(*types: type[M]) -> msgspec.json.Decoder[Any]:
    """A decoder that accepts only the given message types (faster, and rejects strays)."""
    if len(types) == 1:
        return msgspec.json.Decoder(types[0])
    union = types[0]
    for t in types[1:]:
        union = union | t  # type: ignore[assignment]
    return msgspec.json.Decoder(union)
