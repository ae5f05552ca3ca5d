"""ClickHouse: one code path for embedded chDB (``chdb:///path``) and a server (``http://host:8123``).

clickhouse-connect serves both DSNs with the same client API, so the collector's writer
and the backtest's reader never branch on which one they talk to. Remember that chDB
admits one process per data directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client

TABLES = ("orderbook_snapshots", "tick_trades", "spread_history")


def normalise_url(url: str) -> str:
    """Make a relative chDB path absolute (``chdb://./var/ch`` -> ``chdb:///abs/var/ch``)."""
    if url.startswith("chdb://"):
        path = url[len("chdb://"):]
        return "chdb://" + str(Path(path).expanduser().resolve())
    return url


def connect(url: str, **kwargs: Any) -> Client:
    url = normalise_url(url)
    if url.startswith("chdb://"):
        Path(url[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(dsn=url, **kwargs)


def ddl_statements() -> list[str]:
    out: list[str] = []
    folder = resources.files("shared.db").joinpath("clickhouse")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            text = "\n".join(line for line in entry.read_text().splitlines() if not line.startswith("--"))
            out.extend(stmt.strip() for stmt in text.split("\n;") if stmt.strip())
    return out


def ensure_schema(client: Client) -> None:
    for stmt in ddl_statements():
        client.command(stmt)
