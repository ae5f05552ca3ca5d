"""Balances in PostgreSQL: the single, exact (NUMERIC) record of what each venue holds.

Paper fills (executor) and paper transfers (rebalancer) both move balances only through
``adjust_balance`` inside the transaction that records why they moved, so a crash can
never leave a fill without its balance change or the other way round. Live mode records
what the exchanges report.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from psycopg import AsyncConnection


class InsufficientBalance(Exception):
    def __init__(self, exchange: str, asset: str, available: Decimal, needed: Decimal) -> None:
        self.exchange, self.asset, self.available, self.needed = exchange, asset, available, needed
        super().__init__(f"{exchange} {asset}: need {needed}, have {available}")


async def seed_balances(
    conn: AsyncConnection, session: str, mode: str, balances: Mapping[str, Mapping[str, Decimal | float | str]]
) -> None:
    """Create start balances once; existing rows (a restart) are left as they are."""
    async with conn.cursor() as cur:
        for exchange, assets in balances.items():
            for asset, amount in assets.items():
                await cur.execute(
                    """INSERT INTO balances (session, mode, exchange, asset, free, locked)
                       VALUES (%s, %s, %s, %s, %s, 0)
                       ON CONFLICT (session, mode, exchange, asset) DO NOTHING""",
                    (session, mode, exchange, asset, Decimal(str(amount))),
                )


async def adjust_balance(
    conn: AsyncConnection,
    *,
    session: str,
    mode: str,
    exchange: str,
    asset: str,
    delta_free: Decimal,
    delta_locked: Decimal = Decimal(0),
    allow_negative: bool = False,
) -> tuple[Decimal, Decimal]:
    """Move a balance by exact deltas; returns the new (free, locked). Call inside a transaction."""
    async with conn.cursor() as cur:
        await cur.execute(
            """INSERT INTO balances (session, mode, exchange, asset, free, locked)
               VALUES (%s, %s, %s, %s, 0, 0)
               ON CONFLICT (session, mode, exchange, asset) DO NOTHING""",
            (session, mode, exchange, asset),
        )
        await cur.execute(
            """SELECT free, locked FROM balances
               WHERE session = %s AND mode = %s AND exchange = %s AND asset = %s FOR UPDATE""",
            (session, mode, exchange, asset),
        )
        row = await cur.fetchone()
        assert row is not None
        free, locked = Decimal(row[0]) + delta_free, Decimal(row[1]) + delta_locked
        if not allow_negative and (free < 0 or locked < 0):
            raise InsufficientBalance(exchange, asset, Decimal(row[0]), -delta_free)
        await cur.execute(
            """UPDATE balances SET free = %s, locked = %s, updated_at = now()
               WHERE session = %s AND mode = %s AND exchange = %s AND asset = %s""",
            (free, locked, session, mode, exchange, asset),
        )
    return free, locked


BalanceMap = dict[tuple[str, str], tuple[Decimal, Decimal]]
"""(exchange, asset) -> (free, locked)"""


async def load_balances(conn: AsyncConnection, session: str, mode: str) -> BalanceMap:
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT exchange, asset, free, locked FROM balances WHERE session = %s AND mode = %s", (session, mode)
        )
        return {(ex, asset): (Decimal(free), Decimal(locked)) for ex, asset, free, locked in await cur.fetchall()}
