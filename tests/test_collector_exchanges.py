"""Each exchange module's documented rules, driven through the pure core."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

from services.collector.core import FeedCore, FetchSnapshot
from services.collector.exchanges import make_venue
from services.collector.exchanges.binance import parse_exchange_info
from services.collector.exchanges.bybit import parse_instruments as bybit_instruments
from services.collector.exchanges.okx import parse_instruments as okx_instruments
from services.collector.exchanges.upbit import KRW_TICKS, Upbit, parse_markets
from services.collector.venue import Fees, RestRequest
from shared.models import BookSnapshot, TopOfBook, Trade
from shared.money import round_price
from shared.simulator.venues.upbit import SIMPLE_TO_DEFAULT, rename
from tests.collector_helpers import CAPTURES, METADATA, kinds, records
from tests.collector_reference import Book
from tests.test_collector_service import BYBIT_INSTRUMENTS

FEES = Fees(Decimal("0.002"), Decimal("0.001"))


def _core(exchange: str) -> FeedCore:
    return FeedCore(make_venue(exchange), strict=False)


def _feed(core: FeedCore, frames: list[bytes | str], start_ns: int = 1) -> list[Any]:
    out: list[Any] = []
    for i, frame in enumerate(frames):
        core.on_frame(frame.encode() if isinstance(frame, str) else frame, start_ns + i)
        out.extend(core.take())
    return out


# --------------------------------------------------------------------------- Binance


def test_binance_refetches_a_snapshot_older_than_the_first_buffered_diff() -> None:
    recs = [r for r in records(CAPTURES["binance"][0]) if r.kind == "ws"]
    snapshot = next(r.data for r in recs if r.data.startswith(b'{"lastUpdateId"'))
    last_id = json.loads(snapshot)["lastUpdateId"]
    diffs = [r.data for r in recs if b"depthUpdate" in r.data[:80]]
    late = [d for d in diffs if json.loads(d)["data"]["U"] > last_id + 1]  # joined after the snapshot
    core = _core("binance")
    _feed(core, late[:3])
    assert core.take_actions() == [FetchSnapshot("BTCUSDT")]
    core.on_rest("https://api.binance.com/api/v3/depth?symbol=BTCUSDT&limit=1000", snapshot, 10)
    assert not kinds(core.take(), "BookSnapshot")  # lastUpdateId < first U: not usable
    assert core.take_actions() == [FetchSnapshot("BTCUSDT")]


def test_binance_book_ticker_is_published_apart_from_the_l2_book() -> None:
    recs = [r.data for r in records(CAPTURES["binance"][0]) if r.kind == "ws"][:400]
    core = _core("binance")
    out = _feed(core, recs)
    bbo = kinds(out, "TopOfBook")
    assert bbo and all(isinstance(m, TopOfBook) and m.ts_exchange_ns == m.ts_recv_ns for m in bbo)
    books = kinds(out, "BookSnapshot")
    trades = kinds(out, "Trade")
    assert len(books) + len(bbo) + len(trades) == len(out) - 1  # and one status (synced)
    assert {t.side for t in trades} <= {"buy", "sell"}
    first = json.loads(next(r for r in recs if b"@trade" in r[:40]))["data"]
    assert (trades[0].trade_id, trades[0].side) == (str(first["t"]), "sell" if first["m"] else "buy")


def test_binance_instruments_come_from_exchange_info_filters() -> None:
    body = records([METADATA["binance"]])[0].data
    btc = next(i for i in parse_exchange_info(body, FEES) if i.native == "BTCUSDT")
    assert (btc.symbol, btc.base, btc.quote) == ("BTC/USDT", "BTC", "USDT")
    assert (btc.tick_size, btc.lot_size, btc.min_qty, btc.min_notional) == (
        Decimal("0.01"), Decimal("0.00001"), Decimal("0.00001"), Decimal("10"))
    assert (btc.taker_fee, btc.maker_fee) == (FEES.taker, FEES.maker)


# --------------------------------------------------------------------------- OKX


def _okx_push(action: str, inst: str, bids: list[list[str]], asks: list[list[str]], seq: int, prev: int,
              checksum: int) -> str:
    return json.dumps({"arg": {"channel": "books", "instId": inst}, "action": action, "data": [
        {"asks": asks, "bids": bids, "ts": "1700000000000", "checksum": checksum, "seqId": seq, "prevSeqId": prev}]})


def test_okx_follows_seq_ids_keepalives_resets_and_gaps() -> None:
    """Frames built in the documented shape, checksums from the independent reference."""
    ref = Book()
    bids, asks = [["100.5", "1", "0", "1"], ["100.4", "2", "0", "1"]], [["100.6", "3", "0", "2"]]
    ref.load(bids, asks)
    core = _core("okx")
    out = _feed(core, [_okx_push("snapshot", "BTC-USDT", bids, asks, 10, -1, ref.okx_checksum())])
    assert [m.seq for m in kinds(out, "BookSnapshot")] == [10]
    ref.apply([["100.5", "0", "0", "0"]], [["100.7", "1", "0", "1"]])
    update = _okx_push("update", "BTC-USDT", [["100.5", "0", "0", "0"]], [["100.7", "1", "0", "1"]], 11, 10,
                       ref.okx_checksum())
    keepalive = _okx_push("update", "BTC-USDT", [], [], 11, 11, ref.okx_checksum())
    ref.apply([["100.3", "4", "0", "1"]], [])
    after_maintenance = _okx_push("update", "BTC-USDT", [["100.3", "4", "0", "1"]], [], 3, 11, ref.okx_checksum())
    out = _feed(core, [update, keepalive, after_maintenance])
    assert [m.seq for m in kinds(out, "BookSnapshot")] == [11, 3]  # the keep-alive publishes nothing
    assert kinds(out, "BookSnapshot")[-1].bids == [(100.4, 2.0), (100.3, 4.0)]
    gap = _okx_push("update", "BTC-USDT", [["100.2", "1", "0", "1"]], [], 9, 7, 0)
    out = _feed(core, [gap])
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")] == [("stale", "gap")]
    assert [a.native for a in core.take_actions()] == ["BTC-USDT"]


def test_okx_instruments_come_from_the_spot_instrument_list() -> None:
    rest = records([METADATA["okx"]])
    spot = next(r for r in rest if r.url.endswith("instType=SPOT"))
    btc = next(i for i in okx_instruments(spot.data, FEES) if i.native == "BTC-USDT")
    assert (btc.symbol, btc.tick_size, btc.lot_size, btc.min_qty) == (
        "BTC/USDT", Decimal("0.1"), Decimal("0.00000001"), Decimal("0.00001"))
    swaps = next(r for r in rest if r.url.endswith("instType=SWAP"))
    assert okx_instruments(swaps.data, FEES) == []  # the spot module lists spot markets only


def test_okx_trades_keep_the_taker_side() -> None:
    frames = [r.data for r in records(CAPTURES["okx"][0]) if r.kind == "ws" and b'"channel":"trades"' in r.data[:60]
              and b'"data"' in r.data]
    trades = kinds(_feed(_core("okx"), frames), "Trade")
    raw = [t for f in frames for t in json.loads(f)["data"]]
    assert [(t.trade_id, t.side, t.price) for t in trades] == [(r["tradeId"], r["side"], float(r["px"])) for r in raw]


# --------------------------------------------------------------------------- Bybit


def test_bybit_u_equal_one_overwrites_the_book_and_a_jump_in_u_is_a_gap() -> None:
    frames = [r.data for r in records(CAPTURES["bybit"][0])][:5]
    core = _core("bybit")
    _feed(core, frames)
    restart = json.dumps({"topic": "orderbook.500.XRPUSDT", "type": "delta", "ts": 1733011201000,
                          "data": {"s": "XRPUSDT", "b": [["1.5", "10"]], "a": [["1.6", "20"]], "u": 1, "seq": 1}})
    out = _feed(core, [restart])
    assert [(m.seq, m.bids, m.asks) for m in kinds(out, "BookSnapshot")] == [(1, [(1.5, 10.0)], [(1.6, 20.0)])]
    jump = json.dumps({"topic": "orderbook.500.XRPUSDT", "type": "delta", "ts": 1733011201100,
                       "data": {"s": "XRPUSDT", "b": [], "a": [["1.7", "1"]], "u": 5, "seq": 2}})
    out = _feed(core, [jump])
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")] == [("stale", "gap")]


def test_bybit_instruments_come_from_instruments_info() -> None:
    op = next(i for i in bybit_instruments(BYBIT_INSTRUMENTS, FEES) if i.native == "OPUSDC")
    assert (op.symbol, op.tick_size, op.lot_size, op.min_qty, op.min_notional) == (
        "OP/USDC", Decimal("0.001"), Decimal("0.01"), Decimal("0.01"), Decimal("1"))


# --------------------------------------------------------------------------- Upbit


def test_upbit_default_and_simple_formats_give_the_same_books_and_trades() -> None:
    frames = [r.data for r in records(CAPTURES["upbit"][0]) if r.kind == "ws"][:120]
    default = [json.dumps(rename(json.loads(f), SIMPLE_TO_DEFAULT)).encode() for f in frames]
    simple_out, default_out = _feed(_core("upbit"), frames), _feed(_core("upbit"), default)
    strip = [(type(m).__name__, getattr(m, "symbol", ""), getattr(m, "seq", 0), getattr(m, "bids", None),
              getattr(m, "trade_id", None), getattr(m, "side", None)) for m in simple_out]
    assert strip == [(type(m).__name__, getattr(m, "symbol", ""), getattr(m, "seq", 0), getattr(m, "bids", None),
                      getattr(m, "trade_id", None), getattr(m, "side", None)) for m in default_out]
    assert kinds(simple_out, "BookSnapshot") and kinds(simple_out, "Trade")
    first = json.loads(next(f for f in frames if b'"trade"' in f[:20]))
    trade = next(t for t in kinds(simple_out, "Trade") if isinstance(t, Trade))
    assert (trade.trade_id, trade.side) == (str(first["sid"]), "sell" if first["ab"] == "ASK" else "buy")


def test_upbit_drops_a_book_older_than_the_one_it_has() -> None:
    frames = [r.data for r in records(CAPTURES["upbit"][0]) if r.kind == "ws" and b"orderbook" in r.data[:30]]
    lamb = [f for f in frames if b'"KRW-LAMB"' in f][:3]
    core = _core("upbit")
    out = _feed(core, [lamb[0], lamb[2], lamb[1]])
    assert [m.seq for m in kinds(out, "BookSnapshot")] == [json.loads(lamb[0])["tms"], json.loads(lamb[2])["tms"]]


def test_upbit_instruments_use_the_krw_tick_policy_and_the_tick_endpoint() -> None:
    markets = records([METADATA["upbit"]])[0].data
    waves = next(i for i in parse_markets(markets, {}, FEES) if i.native == "KRW-WAVES")
    assert (waves.symbol, waves.base, waves.quote, waves.tick_table) == ("WAVES/KRW", "WAVES", "KRW", KRW_TICKS)
    assert round_price(waves, Decimal("20237"), "buy") == Decimal("20240")  # 10 KRW ticks between 10k and 50k
    assert round_price(waves, Decimal("1234567"), "sell") == Decimal("1234000")
    # The per-market tick endpoint (since 2025-07-31) wins where it answers; body in its documented shape.
    ticks = json.dumps([{"market": "KRW-WAVES", "quote_currency": "KRW", "tick_size": "0.5",
                         "supported_levels": ["0"]}]).encode()

    async def get(request: RestRequest) -> bytes:
        return markets if request.path == "/v1/market/all" else ticks

    loaded = asyncio.run(Upbit().load_instruments(get, ["WAVES/KRW"], FEES))
    assert [(i.symbol, i.tick_size) for i in loaded] == [("WAVES/KRW", Decimal("0.5"))]


def test_every_exchange_publishes_unified_symbols_once_it_knows_its_instruments() -> None:
    for exchange, capture in (("binance", CAPTURES["binance"][0]), ("okx", CAPTURES["okx"][0]),
                              ("upbit", CAPTURES["upbit"][0])):
        core = FeedCore(make_venue(exchange), strict=False)
        for r in records([METADATA[exchange], *capture]):
            if r.kind == "rest":
                core.on_rest(r.url, r.data, r.recv_ns)
            elif r.kind == "ws":
                core.on_frame(r.data, r.recv_ns)
        symbols = {m.symbol for m in core.take() if isinstance(m, BookSnapshot)}
        expected = {"binance": {"BTC/USDT"}, "okx": {"BTC/USDT"}, "upbit": {"WAVES/KRW", "LAMB/KRW"}}[exchange]
        assert expected <= symbols
