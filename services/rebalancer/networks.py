"""The transfer-network table: how each asset can leave and enter each exchange.

One row per (exchange, asset, network): withdrawal fee and minimum, typical time to credit,
and whether withdrawals and deposits are open. Rows come from the configuration
(``rebalancer.networks``) and are refreshed from the exchanges' wallet endpoints
(``services.rebalancer.wallets``); a refresh never adds a network the operator did not list,
it only updates fees, minimums and wallet status.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal

from shared.config import RebalancerSettings

ZERO = Decimal(0)


class NetworkTableError(ValueError):
    """A network row that cannot be used (negative fee, unknown network, ...)."""


# Exchanges name the same chain differently (TRX / TRC20 / TRON); refreshed rows are matched
# to configured ones through this table when the row has no exchange ``label``.
_ALIASES: dict[str, str] = {
    "TRX": "TRON", "TRC20": "TRON", "TRON": "TRON",
    "ETH": "ETH", "ERC20": "ETH", "ETHEREUM": "ETH",
    "BSC": "BSC", "BEP20": "BSC", "BNB": "BSC", "BEP20(BSC)": "BSC",
    "SOL": "SOL", "SOLANA": "SOL", "SPL": "SOL",
    "BTC": "BTC", "BITCOIN": "BTC",
    "ARBITRUM": "ARBITRUM", "ARBI": "ARBITRUM", "ARB": "ARBITRUM", "ARBONE": "ARBITRUM",
    "ARBITRUMONE": "ARBITRUM", "ARBITRUM ONE": "ARBITRUM", "ARBEVM": "ARBITRUM",
    "OPTIMISM": "OPTIMISM", "OP": "OPTIMISM", "OPETH": "OPTIMISM",
    "POLYGON": "POLYGON", "MATIC": "POLYGON", "POL": "POLYGON",
    "TON": "TON", "AVAXC": "AVAXC", "AVAX C-CHAIN": "AVAXC", "CAVAX": "AVAXC",
}


def canonical_network(label: str) -> str:
    """Our name for an exchange's network label: ``"TRC20"`` and OKX's ``"USDT-TRC20"`` -> ``"TRON"``."""
    key = label.strip().upper()
    for candidate in (key, key.replace(" ", ""), key.partition("-")[2], key.partition("-")[2].replace(" ", "")):
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    return key


@dataclass(frozen=True, slots=True)
class TransferNetwork:
    exchange: str
    asset: str
    network: str
    label: str
    """The exchange's own name for the network (sent to its withdrawal endpoint)."""
    withdraw_fee: Decimal
    withdraw_fee_rate: Decimal
    withdraw_min: Decimal
    confirm_seconds: float
    withdraw_enabled: bool
    deposit_enabled: bool

    def __post_init__(self) -> None:
        where = f"{self.exchange} {self.asset} {self.network}"
        for name in ("withdraw_fee", "withdraw_fee_rate", "withdraw_min"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise NetworkTableError(f"{where}: {name} {value} must be a non-negative number")
        if self.withdraw_fee_rate >= 1:
            raise NetworkTableError(f"{where}: withdraw_fee_rate {self.withdraw_fee_rate} must be below 1")
        if not self.confirm_seconds >= 0:
            raise NetworkTableError(f"{where}: confirm_seconds {self.confirm_seconds} must not be negative")
        if not self.network:
            raise NetworkTableError(f"{self.exchange} {self.asset}: network name is empty")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.exchange, self.asset, self.network)

    def fee_for(self, amount: Decimal) -> Decimal:
        """Fee charged on top of ``amount`` (the amount that arrives)."""
        return self.withdraw_fee + self.withdraw_fee_rate * amount


@dataclass(frozen=True, slots=True)
class NetworkUpdate:
    """What an exchange's wallet endpoint says about one of its networks for one asset."""

    exchange: str
    asset: str
    label: str
    withdraw_fee: Decimal | None = None
    withdraw_fee_rate: Decimal | None = None
    withdraw_min: Decimal | None = None
    withdraw_enabled: bool | None = None
    deposit_enabled: bool | None = None

    @property
    def network(self) -> str:
        return canonical_network(self.label)


@dataclass(frozen=True, slots=True)
class RefreshReport:
    updated: int
    """Configured rows the exchange reported on."""
    missing: list[tuple[str, str, str]]
    """Configured rows the exchange no longer lists: closed until it lists them again."""
    ignored: int
    """Networks the exchange lists that are not configured."""


class TransferNetworkTable:
    """Immutable set of ``TransferNetwork`` rows; ``refreshed`` returns a new table."""

    def __init__(self, rows: Iterable[TransferNetwork]) -> None:
        self._rows: dict[tuple[str, str, str], TransferNetwork] = {}
        for row in rows:
            if row.key in self._rows:
                raise NetworkTableError(f"{row.exchange} {row.asset} {row.network}: listed twice")
            self._rows[row.key] = row

    @classmethod
    def from_settings(cls, settings: RebalancerSettings) -> TransferNetworkTable:
        return cls(
            TransferNetwork(
                exchange=n.exchange,
                asset=n.asset,
                network=n.network,
                label=n.label or n.network,
                withdraw_fee=n.withdraw_fee,
                withdraw_fee_rate=n.withdraw_fee_rate,
                withdraw_min=n.withdraw_min,
                confirm_seconds=n.confirm_seconds,
                withdraw_enabled=n.withdraw_enabled,
                deposit_enabled=n.deposit_enabled,
            )
            for n in settings.networks
        )

    def __iter__(self) -> Iterator[TransferNetwork]:
        return iter(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, exchange: str, asset: str, network: str) -> TransferNetwork:
        try:
            return self._rows[(exchange, asset, network)]
        except KeyError:
            known = sorted(n for (ex, a, n) in self._rows if (ex, a) == (exchange, asset))
            listed = ", ".join(known) or "none configured"
            raise NetworkTableError(f"unknown network {network!r} for {exchange} {asset} (known: {listed})") from None

    def exchanges(self) -> list[str]:
        return sorted({ex for ex, _, _ in self._rows})

    def assets(self, exchange: str | None = None) -> list[str]:
        return sorted({a for ex, a, _ in self._rows if exchange is None or ex == exchange})

    def withdrawals(self, asset: str) -> list[tuple[TransferNetwork, TransferNetwork]]:
        """Every (source row, destination row) pair that can move ``asset`` between two exchanges."""
        rows = [r for r in self._rows.values() if r.asset == asset]
        return [
            (src, dst)
            for src in rows
            if src.withdraw_enabled
            for dst in rows
            if dst.deposit_enabled and dst.network == src.network and dst.exchange != src.exchange
        ]

    def refreshed(self, updates: Iterable[NetworkUpdate], exchanges: Iterable[str]) -> tuple[
        TransferNetworkTable, RefreshReport
    ]:
        """A new table with the exchanges' reports applied to these (configured) rows.

        Apply it to the table built from the configuration, with the latest report of every
        exchange, rather than to an already refreshed table: a network reopens when the
        exchange reopens it, unless the configuration closed it.

        ``exchanges`` are the ones that answered: their configured rows that the answer does
        not mention are closed (both directions), since the exchange no longer offers them.
        Raises ``NetworkTableError`` (and changes nothing) if any reported value is invalid.
        """
        answered = set(exchanges)
        by_label: dict[tuple[str, str, str], NetworkUpdate] = {}
        by_network: dict[tuple[str, str, str], NetworkUpdate] = {}
        for u in updates:
            by_label[(u.exchange, u.asset, u.label.strip().upper())] = u
            by_network[(u.exchange, u.asset, u.network)] = u
        rows: list[TransferNetwork] = []
        used: set[int] = set()
        missing: list[tuple[str, str, str]] = []
        for row in self._rows.values():
            if row.exchange not in answered:
                rows.append(row)
                continue
            found = by_label.get((row.exchange, row.asset, row.label.upper())) or by_network.get(row.key)
            if found is None:
                missing.append(row.key)
                rows.append(replace(row, withdraw_enabled=False, deposit_enabled=False))
                continue
            u = found
            used.add(id(u))
            rows.append(
                replace(
                    row,
                    label=u.label.strip() or row.label,  # the exchange's own name, for its withdrawal endpoint
                    withdraw_fee=row.withdraw_fee if u.withdraw_fee is None else u.withdraw_fee,
                    withdraw_fee_rate=row.withdraw_fee_rate if u.withdraw_fee_rate is None else u.withdraw_fee_rate,
                    withdraw_min=row.withdraw_min if u.withdraw_min is None else u.withdraw_min,
                    # The operator's switch wins: a network closed in the config stays closed.
                    withdraw_enabled=row.withdraw_enabled and u.withdraw_enabled is not False,
                    deposit_enabled=row.deposit_enabled and u.deposit_enabled is not False,
                )
            )
        ignored = len({id(u) for u in by_network.values()} - used)
        return TransferNetworkTable(rows), RefreshReport(updated=len(used), missing=missing, ignored=ignored)
