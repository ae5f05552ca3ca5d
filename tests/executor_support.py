"""What the executor tests share: recorded books, intents, market data in Redis, service processes."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared.models import BookSnapshot, FxRate, Instrument, OrderIntent, OrderLeg, encode
from shared.runtime import Bus

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BINANCE_BOOKS = FIXTURES / "binance" / "kimchi-premium-arbitrage_orderbook_binance_BTC_USDT_20250824_06.jsonl.gz"
UPBIT_BOOKS = FIXTURES / "upbit" / "kimchi-premium-arbitrage_orderbook_upbit_BTC_KRW_20250824_06.jsonl.gz"
BINANCE_DEPTH = FIXTURES / "binance" / "cryptofeed_BINANCE.http.0.0.txt"

BTC_USDT = Instrument(exchange="binance", symbol="BTC/USDT", native="BTCUSDT", base="BTC", quote="USDT",
                      tick_size=Decimal("0.01"), lot_size=Decimal("0.00001"), min_qty=Decimal("0.00001"),
                      min_notional=Decimal("5"), taker_fee=Decimal("0.001"), maker_fee=Decimal("0.001"))
# Upbit KRW ticks (2025-07-31 policy) above 1,000,000 KRW: 1,000; lot: 8 decimals.
BTC_KRW = Instrument(exchange="upbit", symbol="BTC/KRW", native="KRW-BTC", base="BTC", quote="KRW",
                     tick_size=Decimal("1"), lot_size=Decimal("0.00000001"), min_notional=Decimal("5000"),
                     taker_fee=Decimal("0.0005"), maker_fee=Decimal("0.0005"),
                     tick_table=[(Decimal("1000000"), Decimal("1000")), (Decimal("500000"), Decimal("500")),
                                 (Decimal("100000"), Decimal("100")), (Decimal("0"), Decimal("1"))])


def recorded_books(path: Path, exchange: str, symbol: str) -> list[BookSnapshot]:
    """The ccxt-normalised snapshots as ``BookSnapshot``s (levels exactly as recorded)."""
    out = []
    for i, line in enumerate(gzip.decompress(path.read_bytes()).decode().splitlines()):
        doc = json.loads(line)
        out.append(BookSnapshot(exchange=exchange, symbol=symbol, seq=i,
                                bids=[(float(p), float(s)) for p, s in doc["bids"]],
                                asks=[(float(p), float(s)) for p, s in doc["asks"]],
                                ts_exchange_ns=0, ts_recv_ns=0))
    return out


def recorded_depth(native: str, exchange: str = "binance", symbol: str = "") -> BookSnapshot:
    """One Binance REST depth snapshot from the cryptofeed capture, by native symbol."""
    for line in BINANCE_DEPTH.read_text().splitlines():
        url, _, rest = line.partition(" -> ")
        if f"symbol={native}&" not in url:
            continue
        _, _, body = rest.partition(": ")
        doc = json.loads(body)
        return BookSnapshot(exchange=exchange, symbol=symbol or native, seq=int(doc["lastUpdateId"]),
                            bids=[(float(p), float(s)) for p, s in doc["bids"]],
                            asks=[(float(p), float(s)) for p, s in doc["asks"]],
                            ts_exchange_ns=0, ts_recv_ns=0)
    raise LookupError(native)


def fresh(book: BookSnapshot, now_ns: int | None = None) -> BookSnapshot:
    now = now_ns or time.time_ns()
    return BookSnapshot(exchange=book.exchange, symbol=book.symbol, seq=book.seq, bids=book.bids, asks=book.asks,
                        ts_exchange_ns=now, ts_recv_ns=now, ts_pub_ns=now)


def cid(prefix: str = "c") -> str:
    return (prefix + uuid.uuid4().hex)[:32]


def spatial_intent(*, quantity: str = "0.01", buy_price: str = "115300", sell_price: str = "159000000",
                   arb_id: str | None = None, expires_ns: int = 0, buy_exchange: str = "binance",
                   sell_exchange: str = "upbit", **kw: Any) -> OrderIntent:
    """Buy BTC on Binance (USDT), sell it on Upbit (KRW): the kimchi-premium trade."""
    arb = arb_id or uuid.uuid4().hex[:20]
    return OrderIntent(
        arb_id=arb, signal_id=f"s{arb}", strategy="spatial", notional=1000.0, ts_ns=time.time_ns(),
        ts_origin_ns=time.time_ns(), expires_ns=expires_ns, expected_profit=1.0, profit_currency="USDT",
        legs=[OrderLeg(client_order_id=f"{arb}b", exchange=buy_exchange, symbol="BTC/USDT", side="buy",
                       price=Decimal(buy_price), quantity=Decimal(quantity)),
              OrderLeg(client_order_id=f"{arb}s", exchange=sell_exchange, symbol="BTC/KRW", side="sell",
                       price=Decimal(sell_price), quantity=Decimal(quantity))],
        **kw)


async def put_market(bus: Bus, *, binance: BookSnapshot | None = None, upbit: BookSnapshot | None = None,
                     usdt_krw: float | None = 1380.0, instruments: bool = True) -> None:
    """What the collector would have written: instruments, latest books, the FX rate."""
    r = bus.redis
    if instruments:
        await r.hset(bus.keys.instruments("binance"), "BTC/USDT", encode_instrument(BTC_USDT))
        await r.hset(bus.keys.instruments("upbit"), "BTC/KRW", encode_instrument(BTC_KRW))
    if binance is not None:
        await r.set(bus.keys.latest_book("binance", "BTC/USDT"), encode(fresh(binance)), ex=60)
    if upbit is not None:
        await r.set(bus.keys.latest_book("upbit", "BTC/KRW"), encode(fresh(upbit)), ex=60)
    if usdt_krw is not None:
        fx = FxRate(pair="USDT/KRW", rate=usdt_krw, source="test", ts_source_ns=time.time_ns())
        await r.set(bus.keys.fx_latest("USDT/KRW"), encode(fx), ex=3600)


def encode_instrument(instrument: Instrument) -> bytes:
    import msgspec

    return msgspec.json.encode(instrument)


def decimals(doc: Any) -> Any:
    """JSON numbers/strings of a recorded payload as Decimal (for expectations)."""
    return json.loads(json.dumps(doc), parse_float=Decimal)


# --------------------------------------------------------------------------- service processes


def executor_env(service_env: dict[str, str], **settings: Any) -> dict[str, str]:
    """``service_env`` plus executor settings as ``ARB_EXECUTOR__*`` (JSON for tables)."""
    env = dict(service_env)
    for key, value in settings.items():
        env[f"ARB_EXECUTOR__{key.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


def start_executor(env: dict[str, str], instance: str = "") -> Any:
    import subprocess
    import sys

    args = [sys.executable, "-m", "services.executor"] + (["--instance", instance] if instance else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_process(proc: Any, timeout: float = 10.0) -> str:
    """SIGTERM, then SIGKILL if it hangs; returns what it printed."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else b""
    return out.decode(errors="replace")


def service_bus(redis_url: str, namespace: str, env: str = "development") -> Bus:
    """The bus as a service running with ``service_env`` sees it (session = namespace)."""
    from shared.streams import KeySpace

    return Bus.from_url(redis_url, prefix=f"{namespace}:", keys=KeySpace(env, namespace))


async def publish_intents(bus: Bus, intents: list[OrderIntent]) -> list[bytes]:
    from shared.runtime import FIELD
    from shared.streams import ORDERS

    pipe = bus.redis.pipeline(transaction=False)
    for intent in intents:
        pipe.xadd(bus.stream(ORDERS), {FIELD: encode(intent)})
    return list(await pipe.execute())


async def read_stream(bus: Bus, stream: str) -> list[Any]:
    from shared.models import decode
    from shared.runtime import FIELD

    entries = await bus.redis.xrange(bus.stream(stream))
    return [decode(fields[FIELD]) for _, fields in entries]


async def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
