"""A consumer process for the crash tests: stores each message as a row, idempotently.

The rows of one batch are committed in ``before_ack``, i.e. before the batch is
acknowledged, so a kill at any point loses nothing and (thanks to the primary key)
doubles nothing. Every handler call is also logged in ``deliveries``.

usage: consume_to_pg.py REDIS_URL PREFIX PG_URL GROUP NAME CLAIM_IDLE_MS
"""

from __future__ import annotations

import asyncio
import signal
import sys

import psycopg

from shared.runtime import Bus, Consumer, Delivery
from shared.service import install_event_loop_policy


async def main(redis_url: str, prefix: str, pg_url: str, group: str, name: str, claim_idle_ms: int) -> None:
    bus = Bus.from_url(redis_url, prefix=prefix)
    conn = await psycopg.AsyncConnection.connect(pg_url)
    # Deliveries are logged outside the batch's transaction, so the log survives a kill.
    log = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)

    async def handle(d: Delivery) -> None:
        await conn.execute(
            "INSERT INTO handled (msg_id, entry_id) VALUES (%s, %s) ON CONFLICT (msg_id) DO NOTHING",
            (d.message.alert_id, d.entry_id.decode()),
        )
        await log.execute("INSERT INTO deliveries (msg_id, consumer) VALUES (%s, %s)", (d.message.alert_id, name))
        await asyncio.sleep(0.001)  # a little work, so kills land mid-batch

    async def commit() -> None:
        await conn.commit()

    consumer = Consumer(
        bus, group=group, streams=["work"], handler=handle, name=name, before_ack=commit,
        batch_size=50, block_ms=100, claim_idle_ms=claim_idle_ms, claim_interval_ms=200, start_id="0",
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, consumer.stop)
    print("ready", flush=True)
    await consumer.run()
    await conn.close()
    await log.close()
    await bus.close()


if __name__ == "__main__":
    install_event_loop_policy()
    redis_url, prefix, pg_url, group, name, idle = sys.argv[1:7]
    asyncio.run(main(redis_url, prefix, pg_url, group, name, int(idle)))
