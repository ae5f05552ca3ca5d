"""PostgreSQL migrations and the ClickHouse schema, on real servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from shared import clickhouse
from shared.db import MigrationError, migrate, migrations

TABLES = {
    "orders", "order_events", "fills", "trades", "signals", "decisions", "balances", "portfolio_snapshots",
    "daily_performance", "risk_guard_snapshots", "session_snapshots", "system_logs",
}


def test_migrate_is_idempotent_and_recorded(pg_url: str) -> None:
    assert migrate(pg_url) == []  # the fixture already applied everything
    with psycopg.connect(pg_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    assert versions == [m.version for m in migrations()]
    assert tables >= TABLES


def test_money_columns_are_numeric(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            """SELECT table_name, column_name, data_type FROM information_schema.columns
               WHERE table_schema = current_schema()
                 AND column_name IN ('price', 'quantity', 'fee', 'realised_pnl', 'free', 'locked', 'notional')"""
        ).fetchall()
    assert rows and all(dtype == "numeric" for _, _, dtype in rows), rows


def test_fills_are_unique_per_exchange_trade_id(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute(
            """INSERT INTO orders (client_order_id, session, arb_id, exchange, symbol, side, order_type,
                                   time_in_force, price, quantity, status, mode)
               VALUES ('c1', 's', 'a1', 'binance', 'BTC/USDT', 'buy', 'limit', 'IOC', 1, 1, 'NEW', 'paper')""")
        insert = """INSERT INTO fills (exchange, fill_id, session, client_order_id, arb_id, symbol, side, price,
                                       quantity, fee, fee_asset, mode, ts)
                    VALUES ('binance', 'f1', 's', 'c1', 'a1', 'BTC/USDT', 'buy', %s, 1, 0.001, 'USDT', 'paper', now())
                    ON CONFLICT DO NOTHING"""
        conn.execute(insert, (Decimal("61837.64000001"),))
        conn.execute(insert, (Decimal("61837.64000001"),))
        rows = conn.execute("SELECT price FROM fills").fetchall()
    assert rows == [(Decimal("61837.64000001"),)]


def test_retention_purges_only_sessions_stopped_long_ago(pg_url: str) -> None:
    old = datetime.now(UTC) - timedelta(days=120)
    with psycopg.connect(pg_url) as conn:
        for session, status, stopped in (("old", "stopped", old), ("recent", "stopped", datetime.now(UTC)),
                                         ("live", "running", None)):
            conn.execute(
                """INSERT INTO session_snapshots (session, env, mode, status, stopped_at)
                   VALUES (%s, 'test', 'paper', %s, %s)""",
                (session, status, stopped),
            )
            conn.execute(
                "INSERT INTO system_logs (session, service, level, message) VALUES (%s, 'risk', 'INFO', 'x')",
                (session,),
            )
            conn.execute(
                """INSERT INTO transfers (transfer_id, session, mode, state, asset, to_exchange, amount,
                                          from_exchange, from_asset, from_amount, expected_cost, cost_currency,
                                          expected_seconds, created_ns, updated_ns)
                   VALUES (%s, %s, 'paper', 'completed', 'USDT', 'binance', 100, 'upbit', 'USDT', 101, 1,
                           'USDT', 60, 1, 1)""",
                (f"t-{session}", session),
            )
        purged = [r[0] for r in conn.execute("SELECT * FROM purge_stopped_sessions(INTERVAL '90 days')")]
        left = sorted(r[0] for r in conn.execute("SELECT DISTINCT session FROM system_logs"))
        transfers = sorted(r[0] for r in conn.execute("SELECT session FROM transfers"))
    assert purged == ["old"]
    assert left == ["live", "recent"]
    assert transfers == ["live", "recent"]


def test_an_applied_migration_that_changed_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(pg_url)


def test_clickhouse_schema_on_chdb(tmp_path: Path) -> None:
    client = clickhouse.connect(f"chdb://{tmp_path / 'ch'}")
    clickhouse.ensure_schema(client)
    clickhouse.ensure_schema(client)  # idempotent
    tables = {r[0]: r[1] for r in client.query(
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase()").result_rows}
    assert {t: "MergeTree" for t in clickhouse.TABLES} == {t: tables[t] for t in clickhouse.TABLES}
    create = client.command("SHOW CREATE TABLE orderbook_snapshots")
    assert "LowCardinality(String)" in create and "DateTime64(9" in create and "TTL" in create
    ttl = {t: client.command(f"SHOW CREATE TABLE {t}") for t in clickhouse.TABLES}
    assert "toIntervalDay(90)" in ttl["orderbook_snapshots"]
    assert "toIntervalDay(180)" in ttl["tick_trades"]
    assert "toIntervalDay(365)" in ttl["spread_history"]
    now = datetime.now(UTC)
    client.insert("tick_trades", [["binance", "BTC/USDT", "1", 61837.63, 0.02, "sell", now, now]],
                  column_names=["exchange", "symbol", "trade_id", "price", "size", "side", "ts_exchange", "ts_recv"])
    assert client.query("SELECT count() FROM tick_trades").result_rows == [(1,)]
