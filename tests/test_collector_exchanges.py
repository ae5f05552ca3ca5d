"""Each exchange module's documented rules, driven through the pure core."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest

from services.collector.core import FeedCore, FetchSnapshot, Resubscribe
from services.collector.exchanges import make_venue
from services.collector.exchanges import upbit as upbit_module
from services.collector.exchanges.binance import parse_exchange_info
from services.collector.exchanges.bitget import parse_symbols as bitget_symbols
from services.collector.exchanges.bithumb import parse_legacy_tickers as bithumb_legacy
from services.collector.exchanges.bithumb import parse_markets as bithumb_markets
from services.collector.exchanges.bybit import parse_instruments as bybit_instruments
from services.collector.exchanges.gateio import parse_currency_pairs as gate_pairs
from services.collector.exchanges.kucoin import parse_symbols as kucoin_symbols
from services.collector.exchanges.okx import parse_instruments as okx_instruments
from services.collector.exchanges.upbit import KRW_TICKS, Upbit, parse_markets
from services.collector.venue import BookMsg, Fees, Malformed, RestRequest, VenueOptions
from shared.models import BookSnapshot, TopOfBook, Trade
from shared.money import round_price
from shared.simulator.venues.upbit import SIMPLE_TO_DEFAULT, rename
from tests.collector_helpers import CAPTURES, METADATA, kinds, records
from tests.collector_reference import Book, reference_books
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


def test_upbit_padded_units_are_dropped_and_a_full_book_reads_as_the_general_rules_read_it() -> None:
    def frame(units: list[tuple[float, float, float, float]]) -> bytes:
        obu = [{"ap": ap, "as": asz, "bp": bp, "bs": bsz} for ap, asz, bp, bsz in units]
        return json.dumps({"ty": "orderbook", "cd": "KRW-BTC", "tms": 7, "obu": obu, "st": "REALTIME"}).encode()

    full = frame([(101.0, 1.0, 100.0, 2.0), (102.0, 3.0, 99.0, 4.0)])
    padded = frame([(101.0, 1.0, 100.0, 2.0), (102.0, 3.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)])
    [book] = Upbit().decode(full)
    [general] = (Upbit._event(upbit_module._simple.decode(full)),)  # the decoder that admits padding
    assert book == general == BookMsg("KRW-BTC", (7, [(100.0, 2.0), (99.0, 4.0)], [(101.0, 1.0), (102.0, 3.0)]))
    assert Upbit().decode(padded) == (BookMsg("KRW-BTC", (7, [(100.0, 2.0)], [(101.0, 1.0), (102.0, 3.0)])),)
    with pytest.raises(Malformed, match="bad_level"):  # a size without a price is still refused
        Upbit().decode(frame([(101.0, 1.0, 0.0, 2.0)]))


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


# --------------------------------------------------------------------------- KuCoin

KUCOIN_SNAPSHOT = "https://api.kucoin.com/api/v3/market/orderbook/level2?symbol=BCHSV-USDT"


def _kucoin_increment(symbol: str, start: int, asks: list[list[str]], bids: list[list[str]], end: int | None = None
                      ) -> str:
    return json.dumps({"type": "message", "topic": f"/market/level2:{symbol}", "subject": "trade.l2update",
                       "data": {"sequenceStart": start, "sequenceEnd": start if end is None else end,
                                "symbol": symbol, "changes": {"asks": asks, "bids": bids}}})


def _kucoin_snapshot(seq: int, bids: list[list[str]], asks: list[list[str]]) -> bytes:
    return json.dumps({"code": "200000", "data": {"time": 1, "sequence": str(seq), "bids": bids,
                                                  "asks": asks}}).encode()


def test_kucoin_price_zero_changes_move_the_sequence_and_publish_nothing() -> None:
    core = _core("kucoin")
    _feed(core, [_kucoin_increment("BCHSV-USDT", 11, [["101", "1", "11"]], [])])
    assert core.take_actions() == [FetchSnapshot("BCHSV-USDT")]
    core.on_rest(KUCOIN_SNAPSHOT, _kucoin_snapshot(10, [["99", "1"]], [["101", "2"]]), 5)
    assert [(m.seq, m.asks) for m in kinds(core.take(), "BookSnapshot")] == [(11, [(101.0, 1.0)])]
    only_zero = _kucoin_increment("BCHSV-USDT", 12, [["0", "0", "12"]], [["0", "0", "13"]], end=13)
    after = _kucoin_increment("BCHSV-USDT", 14, [], [["99.5", "3", "14"]])
    out = _feed(core, [only_zero, after], start_ns=10)
    # Nothing to publish for the first; the second follows it without a gap.
    assert [(m.seq, m.bids) for m in kinds(out, "BookSnapshot")] == [(14, [(99.5, 3.0), (99.0, 1.0)])]
    assert not kinds(out, "BookStatus") and not core.take_actions()


def test_kucoin_snapshot_older_than_the_first_buffered_increment_is_fetched_again() -> None:
    core = _core("kucoin")
    _feed(core, [_kucoin_increment("BCHSV-USDT", 20, [["101", "1", "20"]], [])])
    core.take_actions()
    core.on_rest(KUCOIN_SNAPSHOT, _kucoin_snapshot(15, [["99", "1"]], [["101", "2"]]), 5)  # 16..19 lost in between
    assert not kinds(core.take(), "BookSnapshot")
    assert core.take_actions() == [FetchSnapshot("BCHSV-USDT")]


def test_kucoin_partial_snapshot_keeps_only_its_range_and_is_refreshed_before_it_runs_thin() -> None:
    """Built from the recorded full BCHSV-USDT snapshot: the public endpoint's answer is its top 100."""
    recs = records(CAPTURES["kucoin"][0])
    full = json.loads(next(r.data for r in recs if r.kind == "rest" and "BCHSV-USDT" in r.url))["data"]
    part = dict(full, bids=full["bids"][:100], asks=full["asks"][:100])
    assert len(full["asks"]) > 100 and len(full["bids"]) > 100
    core = _core("kucoin")
    increments = [r for r in recs if r.kind == "ws" and b"/market/level2:BCHSV-USDT" in r.data]
    _feed(core, [increments[0].data])
    assert core.take_actions() == [FetchSnapshot("BCHSV-USDT")]
    core.on_rest("https://api.kucoin.com/api/v1/market/orderbook/level2_100?symbol=BCHSV-USDT",
                 json.dumps({"code": "200000", "data": part}).encode(), 1)
    sync = core.books["BCHSV-USDT"].sync
    edge = float(part["asks"][-1][0])
    assert sync.ask_edge == edge  # type: ignore[attr-defined]
    reference = reference_books("kucoin", recs)
    published = kinds(_feed(core, [r.data for r in increments[1:]]), "BookSnapshot")
    assert published and max(sync.book.asks.levels) <= edge
    by_seq = {e[0]: e for e in reference.books["BCHSV-USDT"]}
    assert all((m.seq, m.bids, m.asks) == by_seq[m.seq] for m in published)  # the top 20 is the full book's
    # Remove asks inside the range until fewer than 25 are known: the book asks for a new snapshot.
    seq = sync.seq
    asks = sorted(sync.book.asks.levels)
    deletes = [[repr(p), "0", str(seq + 1 + i)] for i, p in enumerate(asks[:len(asks) - 24])]
    out = _feed(core, [_kucoin_increment("BCHSV-USDT", seq + 1, deletes, [], end=seq + len(deletes))])
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")] == [("stale", "partial_depth")]
    assert core.take_actions() == [FetchSnapshot("BCHSV-USDT")]


def test_kucoin_bullet_answer_gives_the_endpoint_token_and_ping_interval() -> None:
    """The answer in the shape KuCoin documents for ``POST /api/v1/bullet-public``."""
    answer = json.dumps({"code": "200000", "data": {"token": "tok123", "instanceServers": [
        {"endpoint": "wss://ws-api-spot.kucoin.com/", "encrypt": True, "protocol": "websocket",
         "pingInterval": 18000, "pingTimeout": 10000}]}}).encode()
    asked: list[RestRequest] = []

    async def get(request: RestRequest) -> bytes:
        asked.append(request)
        return answer

    venue = make_venue("kucoin")
    url = asyncio.run(venue.open_url(get, venue.ws_url, ["BTC-USDT"]))
    assert url.startswith("wss://ws-api-spot.kucoin.com/?token=tok123&connectId=")
    assert [(r.method, r.path) for r in asked] == [("POST", "/api/v1/bullet-public")]
    assert venue.ping.interval_s == 9.0 and venue.ping.message == '{"id":"ping","type":"ping"}'


def test_kucoin_instruments_come_from_the_symbol_list() -> None:
    body = records([METADATA["kucoin"]])[0].data
    bsv = next(i for i in kucoin_symbols(body, FEES) if i.native == "BCHSV-USDT")
    assert (bsv.symbol, bsv.tick_size, bsv.lot_size, bsv.min_qty, bsv.min_notional) == (
        "BSV/USDT", Decimal("0.001"), Decimal("0.00000001"), Decimal("0.001"), Decimal("0.05"))
    assert (bsv.taker_fee, bsv.maker_fee) == (FEES.taker, FEES.maker)


# --------------------------------------------------------------------------- Gate


def _gate_push(pair: str, first: int, last: int, bids: list[list[str]], asks: list[list[str]], **extra: Any) -> str:
    return json.dumps({"time": 1, "channel": "spot.order_book_update", "event": "update", "result": {
        "t": 1606294781123, "e": "depthUpdate", "E": 1606294781, "s": pair, "U": first, "u": last, "b": bids,
        "a": asks, **extra}})


def test_gateio_a_full_push_replaces_the_book() -> None:
    """``full: true`` in the documented shape, on top of a recorded book."""
    recs = records(CAPTURES["gateio"][0])
    core = _core("gateio")
    for r in recs:
        if r.kind == "rest":
            core.on_rest(r.url, r.data, r.recv_ns)
        elif r.kind == "ws":
            core.on_frame(r.data, r.recv_ns)
    core.take()
    seq = core.books["OMG_USDT"].sync.seq
    out = _feed(core, [_gate_push("OMG_USDT", seq + 1, seq + 7, [["7.5", "1"]], [["7.6", "2"]], full=True, l="100")])
    assert [(m.seq, m.bids, m.asks) for m in kinds(out, "BookSnapshot")] == [(seq + 7, [(7.5, 1.0)], [(7.6, 2.0)])]


def test_gateio_a_snapshot_behind_the_first_cached_push_is_fetched_again() -> None:
    core = _core("gateio")
    _feed(core, [_gate_push("BTC_USDT", 100, 105, [["1", "1"]], [])])
    assert core.take_actions() == [FetchSnapshot("BTC_USDT")]
    core.on_rest("https://api.gateio.ws/api/v4/spot/order_book?currency_pair=BTC_USDT&limit=100&with_id=true",
                 json.dumps({"id": 90, "bids": [["1", "1"]], "asks": [["2", "1"]]}).encode(), 3)
    assert not kinds(core.take(), "BookSnapshot") and core.take_actions() == [FetchSnapshot("BTC_USDT")]


def test_gateio_v2_needs_consecutive_ids_and_resubscribes_on_a_hole() -> None:
    core = FeedCore(make_venue("gateio", VenueOptions(book_channel="spot.obu")), strict=False)
    full = {"channel": "spot.obu", "result": {"t": 1, "full": True, "s": "ob.BTC_USDT.400", "u": 10,
                                              "b": [["100", "1"]], "a": [["101", "1"]]}, "time_ms": 1}
    step = {"channel": "spot.obu", "result": {"t": 2, "s": "ob.BTC_USDT.400", "U": 11, "u": 12,
                                              "b": [["100", "0"]], "a": []}, "time_ms": 2}
    hole = {"channel": "spot.obu", "result": {"t": 3, "s": "ob.BTC_USDT.400", "U": 14, "u": 15,
                                              "b": [], "a": [["102", "1"]]}, "time_ms": 3}
    out = _feed(core, [json.dumps(full), json.dumps(step), json.dumps(hole)])
    assert [(m.seq, m.bids) for m in kinds(out, "BookSnapshot")] == [(10, [(100.0, 1.0)]), (12, [])]
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")][-1] == ("stale", "gap")
    assert core.take_actions() == [Resubscribe("BTC_USDT")]
    assert [json.loads(m)["event"] for m in core.venue.resubscribe("BTC_USDT")] == ["unsubscribe", "subscribe"]


def test_gateio_trades_keep_the_taker_side_and_the_exact_time() -> None:
    frames = [r.data for r in records(CAPTURES["gateio"][0]) if r.kind == "ws" and b'"spot.trades","event":"update"'
              in r.data]
    trades = kinds(_feed(_core("gateio"), frames), "Trade")
    first = json.loads(frames[0])["result"]
    assert (trades[0].trade_id, trades[0].side, trades[0].ts_exchange_ns) == (
        str(first["id"]), first["side"], 1619093543708_264200)
    assert len(trades) == len(frames)


def test_gateio_instruments_turn_decimal_places_into_tick_and_lot() -> None:
    body = records([METADATA["gateio"]])[0].data
    pairs = {i.native: i for i in gate_pairs(body, FEES)}
    omg = pairs["OMG_USDT"]
    assert (omg.symbol, omg.tick_size, omg.lot_size, omg.min_notional) == (
        "OMG/USDT", Decimal("0.001"), Decimal("0.001"), Decimal("1"))
    assert pairs["ZPT_BTC"].lot_size == Decimal("1") and pairs["ZPT_BTC"].tick_size == Decimal("1E-9")
    assert "SAL_USDT" not in pairs  # untradable


# --------------------------------------------------------------------------- Bitget


def _bitget_push(action: str, inst: str, bids: list[list[str]], asks: list[list[str]], seq: int, checksum: int) -> str:
    """The v2 shape from Bitget's Depth-Channel page."""
    return json.dumps({"action": action, "arg": {"instType": "SPOT", "channel": "books", "instId": inst},
                       "data": [{"asks": asks, "bids": bids, "checksum": checksum, "seq": seq,
                                 "ts": "1695710946294"}], "ts": 1695710946294})


def test_bitget_v2_seq_must_rise_and_the_checksum_must_hold() -> None:
    ref = Book()
    bids, asks = [["26274.8", "0.0009"], ["26274.7", "0.0027"]], [["26274.9", "0.0009"], ["26275.0", "0.0500"]]
    ref.load(bids, asks)
    core = _core("bitget")
    out = _feed(core, [_bitget_push("snapshot", "BTCUSDT", bids, asks, 123, ref.okx_checksum())])
    assert [m.seq for m in kinds(out, "BookSnapshot")] == [123]
    ref.apply([["26274.8", "0"]], [["26275.1", "1.0000"]])
    update = _bitget_push("update", "BTCUSDT", [["26274.8", "0"]], [["26275.1", "1.0000"]], 130, ref.okx_checksum())
    out = _feed(core, [update])
    assert [(m.seq, m.bids) for m in kinds(out, "BookSnapshot")] == [(130, [(26274.7, 0.0027)])]
    out = _feed(core, [_bitget_push("update", "BTCUSDT", [], [["26276", "1"]], 129, 0)])  # older seq: out of order
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")] == [("stale", "out_of_order")]
    assert core.take_actions() == [Resubscribe("BTCUSDT")]


def test_bitget_trades_of_both_versions_keep_the_taker_side() -> None:
    v2 = json.dumps({"action": "update", "arg": {"instType": "SPOT", "channel": "trade", "instId": "BTCUSDT"},
                     "data": [{"ts": "1695709835822", "price": "26293.4", "size": "0.0013", "side": "buy",
                               "tradeId": "1000000000"}], "ts": 1695711090682})
    v1 = [r.data for r in records(CAPTURES["bitget"][0]) if r.kind == "ws"
          and b'"action":"update","arg":{"instType":"sp","channel":"trade"' in r.data]
    snapshot = [r.data for r in records(CAPTURES["bitget"][0]) if r.kind == "ws"
                and b'"action":"snapshot","arg":{"instType":"sp","channel":"trade"' in r.data]
    trades = kinds(_feed(_core("bitget"), [v2, *v1, *snapshot]), "Trade")
    assert (trades[0].trade_id, trades[0].side, trades[0].price) == ("1000000000", "buy", 26293.4)
    rows = [row for f in v1 for row in json.loads(f)["data"]]
    assert [(t.side, t.price, t.ts_exchange_ns) for t in trades[1:]] == [
        (row[3], float(row[1]), int(row[0]) * 1_000_000) for row in rows]  # the history snapshots are skipped


def test_bitget_instruments_from_v1_products_and_the_v2_symbol_list() -> None:
    body = records([METADATA["bitget"]])[0].data
    eos = next(i for i in bitget_symbols(body, FEES) if i.native == "EOSUSDT")
    assert (eos.symbol, eos.tick_size, eos.lot_size, eos.taker_fee) == (
        "EOS/USDT", Decimal("0.0001"), Decimal("0.0001"), Decimal("0.002"))
    # The v2 answer in the shape of Bitget's Get-Symbols page.
    v2 = json.dumps({"code": "00000", "msg": "success", "requestTime": 1744276707885, "data": [
        {"symbol": "BTCUSDT", "baseCoin": "BTC", "quoteCoin": "USDT", "minTradeAmount": "0",
         "maxTradeAmount": "900000000000000000000", "takerFeeRate": "0.002", "makerFeeRate": "0.002",
         "pricePrecision": "2", "quantityPrecision": "6", "quotePrecision": "8", "status": "online",
         "minTradeUSDT": "1"}]}).encode()
    btc = bitget_symbols(v2, FEES)[0]
    assert (btc.symbol, btc.native, btc.tick_size, btc.lot_size, btc.min_notional) == (
        "BTC/USDT", "BTCUSDT", Decimal("0.01"), Decimal("0.000001"), Decimal("1"))


# --------------------------------------------------------------------------- Bithumb


def test_bithumb_legacy_books_are_built_but_never_synced() -> None:
    frames = [r.data for r in records(CAPTURES["bithumb"][0]) if r.kind == "ws"]
    core = _core("bithumb")
    out = _feed(core, frames)
    assert {m.status for m in kinds(out, "BookSnapshot")} == {"stale"}
    assert [(m.status, m.reason) for m in kinds(out, "BookStatus")] == [("stale", "untrusted")] * 7
    assert all(e.status == "stale" for e in core.books.values())
    reference = reference_books("bithumb", records(CAPTURES["bithumb"][0]))
    for symbol, entries in reference.books.items():
        assert [(m.seq, m.bids, m.asks) for m in kinds(out, "BookSnapshot") if m.symbol == symbol] == entries


def test_bithumb_legacy_fills_are_korean_time_and_taker_side() -> None:
    fill = next(json.loads(r.data) for r in records(CAPTURES["bithumb"][0]) if r.kind == "ws"
                and r.data.startswith(b'{"type":"transaction"'))
    trade = kinds(_feed(_core("bithumb"), [json.dumps(fill)]), "Trade")[0]
    row = fill["content"]["list"][0]
    assert row["contDtm"] == "2021-06-02 08:43:34.555058" and row["buySellGb"] == "2"
    assert (trade.side, trade.ts_exchange_ns) == ("buy", 1622591014_555058_000)  # 2021-06-01 23:43:34.555058 UTC


def test_bithumb_instruments_leave_unverified_ticks_unknown() -> None:
    legacy = records([METADATA["bithumb"]])
    krw = next(r for r in legacy if r.url.endswith("ALL_KRW"))
    bnb = next(i for i in bithumb_legacy(krw.data, "KRW", FEES) if i.native == "BNB_KRW")
    assert (bnb.symbol, bnb.tick_size, bnb.lot_size, bnb.tick_table) == ("BNB/KRW", Decimal(0), Decimal(0), [])
    # The current API lists markets exactly as Upbit's /v1/market/all does.
    markets = records([METADATA["upbit"]])[0].data
    waves = next(i for i in bithumb_markets(markets, FEES) if i.native == "KRW-WAVES")
    assert (waves.exchange, waves.symbol, waves.tick_size) == ("bithumb", "WAVES/KRW", Decimal(0))
