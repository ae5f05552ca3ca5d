"""The one place that names every stream, consumer group and Redis key.

Streams carry logical names (``md.BTC``, ``signals``); the bus adds an optional prefix
(empty in production, a unique one per test) when it talks to Redis, so operators see
exactly these names in ``redis-cli XINFO``.

Keys follow ``arbitrage:{env}:{session}:{domain}:{symbol}:{field}`` with one TTL per
domain. Keys that one Lua script touches together share a hash tag (``{risk:<env>:<session>}``)
so the layout keeps working on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# --------------------------------------------------------------------------- streams

MD_PREFIX = "md."
FX = "fx"
SIGNALS = "signals"
DECISIONS = "decisions"
ORDERS = "orders"
ORDER_UPDATES = "order_updates"
FILLS = "fills"
EXECUTIONS = "executions"
BALANCES = "balances"
TRANSFERS = "transfers"
ALERTS = "alerts"
SPREADS = "spreads"
DLQ_PREFIX = "dlq."


def md(base: str) -> str:
    """Market-data stream of one base asset: every venue's book of BTC goes to ``md.BTC``."""
    return f"{MD_PREFIX}{base.upper()}"


def dlq(stream: str) -> str:
    return f"{DLQ_PREFIX}{stream}"


def is_market_data(stream: str) -> bool:
    return stream.startswith(MD_PREFIX)


class Group:
    """Consumer groups, by what they do with a stream."""

    SPATIAL = "spatial"
    TRIANGULAR = "triangular"
    STATISTICAL = "statistical"
    RISK = "risk"
    EXECUTOR = "executor"
    REBALANCER = "rebalancer"
    RECORDER = "recorder"
    AUDIT = "audit"
    ALERTER = "alerter"
    CLICKHOUSE = "clickhouse"


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """How long a stream may grow.

    ``maxlen`` trims on every XADD (``MAXLEN ~``); streams that carry obligations
    (signals, orders, fills, ...) are never trimmed that way. ``keep_unacked`` streams are
    trimmed only below the oldest entry some group still owes (see ``runtime.trim``).
    """

    maxlen: int | None
    keep_unacked: bool = False


MARKET_DATA_POLICY = StreamPolicy(maxlen=20_000)
_POLICIES: dict[str, StreamPolicy] = {
    FX: StreamPolicy(maxlen=10_000),
    SIGNALS: StreamPolicy(maxlen=None, keep_unacked=True),
    DECISIONS: StreamPolicy(maxlen=200_000),
    ORDERS: StreamPolicy(maxlen=None, keep_unacked=True),
    ORDER_UPDATES: StreamPolicy(maxlen=200_000),
    FILLS: StreamPolicy(maxlen=None, keep_unacked=True),
    EXECUTIONS: StreamPolicy(maxlen=None, keep_unacked=True),
    BALANCES: StreamPolicy(maxlen=50_000),
    TRANSFERS: StreamPolicy(maxlen=None, keep_unacked=True),
    ALERTS: StreamPolicy(maxlen=50_000),
    SPREADS: StreamPolicy(maxlen=100_000),  # bounded: ~14 h of both directions of one pair, should its writer stop
}
DLQ_POLICY = StreamPolicy(maxlen=100_000)


def policy(stream: str) -> StreamPolicy:
    if stream.startswith(MD_PREFIX):
        return MARKET_DATA_POLICY
    if stream.startswith(DLQ_PREFIX):
        return DLQ_POLICY
    return _POLICIES.get(stream, StreamPolicy(maxlen=100_000))


# Who reads what: the launcher and `arb status` use this to show lag per group.
READERS: dict[str, tuple[str, ...]] = {
    FX: (Group.SPATIAL, Group.TRIANGULAR, Group.STATISTICAL, Group.RISK),
    SIGNALS: (Group.RISK,),
    DECISIONS: (Group.AUDIT,),
    ORDERS: (Group.EXECUTOR,),
    FILLS: (Group.RISK, Group.REBALANCER),
    EXECUTIONS: (Group.RISK, Group.REBALANCER),
    BALANCES: (Group.RISK, Group.REBALANCER),
    TRANSFERS: (Group.EXECUTOR, Group.REBALANCER),
    ALERTS: (Group.ALERTER,),
    SPREADS: (Group.CLICKHOUSE,),
}

# --------------------------------------------------------------------------- keys


class Domain(Enum):
    """Key domains of the key layout, each with its TTL in seconds."""

    STATE = ("state", 7 * 24 * 3600)
    METRICS = ("metrics", 24 * 3600)
    GUARD = ("guard", 24 * 3600)
    SNAPSHOT = ("snapshot", 30 * 24 * 3600)
    WS = ("ws", 3600)
    COOLDOWN = ("cooldown", 5 * 60)
    PORTFOLIO = ("portfolio", 7 * 24 * 3600)
    BOOK = ("book", 60)
    """Latest book per (exchange, symbol): short-lived so a dead collector's book vanishes."""
    LEASE = ("lease", 0)
    """Lease TTLs are set by the lease holder."""

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def ttl_s(self) -> int:
        return self.value[1]


ANY = "*"
"""The ``symbol`` segment for keys that are not about one symbol."""


@dataclass(frozen=True, slots=True)
class KeySpace:
    env: str
    session: str

    def key(self, domain: Domain, symbol: str = ANY, field: str = ANY) -> str:
        return f"arbitrage:{self.env}:{self.session}:{domain.label}:{symbol}:{field}"

    def tagged(self, domain: Domain, symbol: str = ANY, field: str = ANY) -> str:
        """Like ``key`` but with a hash tag shared by the domain, for multi-key Lua scripts."""
        return f"arbitrage:{{{domain.label}:{self.env}:{self.session}}}:{symbol}:{field}"

    def pattern(self, domain: Domain) -> str:
        return f"arbitrage:{self.env}:{self.session}:{domain.label}:*"

    # Named keys used by more than one service live here, not in the services.

    def latest_book(self, exchange: str, symbol: str) -> str:
        return self.key(Domain.BOOK, symbol, exchange)

    def heartbeats(self) -> str:
        return self.key(Domain.STATE, ANY, "heartbeats")

    def lease(self, group: str, resource: str) -> str:
        return self.key(Domain.LEASE, resource, group)

    def kill_switch(self) -> str:
        return self.tagged(Domain.GUARD, ANY, "halt")

    def instruments(self, exchange: str) -> str:
        return self.key(Domain.SNAPSHOT, ANY, f"instruments:{exchange}")

    def fx_latest(self, pair: str) -> str:
        return self.key(Domain.STATE, pair, "fx")

    def balances(self, exchange: str) -> str:
        return self.key(Domain.PORTFOLIO, ANY, f"balances:{exchange}")

    def transfers_in_flight(self, exchange: str) -> str:
        """Hash of one exchange's amounts tied up in open transfers, written by the rebalancer:
        ``outgoing:<ASSET>`` will leave in an open transfer (not yet debited), so it is not
        available to trade; ``incoming:<ASSET>`` is on its way and not yet credited.
        Hash-tagged so all exchanges' hashes are replaced in one MULTI, also on a cluster."""
        return self.tagged(Domain.PORTFOLIO, ANY, f"transfers_in_flight:{exchange}")
