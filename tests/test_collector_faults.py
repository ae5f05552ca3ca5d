"""Acceptance: injected faults are detected, the book is published stale, resynced and right again."""

from __future__ import annotations

import json
from typing import Any

from services.collector.core import FeedCore, FetchSnapshot, Resubscribe
from services.collector.exchanges import make_venue
from services.collector.venue import VenueOptions
from shared.simulator import Faults, simulator
from tests.collector_helpers import CAPTURES, KUCOIN_KEY, kinds, paths, records, run_against_simulator
from tests.collector_reference import assert_published_match, reference_books

BINANCE = CAPTURES["binance"][0]
DEPTH_ONLY = VenueOptions(trades=False, bbo=False)
"""The Binance fault tests need the book stream only (the simulator then skips 38k frames)."""


def _depth_indices(exchange: str, capture: list[str], needle: bytes) -> list[int]:
    return simulator(exchange, paths(capture)).indices(lambda r: needle in r.data[:200])


def _statuses(outputs: list[Any]) -> list[tuple[str, str]]:
    return [(m.status, m.reason) for m in kinds(outputs, "BookStatus")]


def _final_book_equals_reference(outputs: list[Any], reference: Any, symbol: str) -> None:
    last = [m for m in kinds(outputs, "BookSnapshot") if m.symbol == symbol][-1]
    assert (last.seq, last.bids, last.asks) == reference.books[symbol][-1]


def test_a_dropped_diff_is_published_stale_by_the_very_next_diff() -> None:
    """The pure core, frame by frame: the diff after the missing one turns the book stale."""
    recs = [r for r in records(BINANCE) if r.kind == "ws"]
    depth = [i for i, r in enumerate(recs) if b"depthUpdate" in r.data[:80]]
    dropped, following = depth[500], depth[501]
    core = FeedCore(make_venue("binance"), strict=False)
    for i, r in enumerate(recs):
        if i == dropped:
            continue
        core.on_frame(r.data, r.recv_ns)
        out = core.take()
        actions = core.take_actions()
        stale = [m for m in kinds(out, "BookStatus") if m.status == "stale"]
        if i < following:
            assert not stale
        elif i == following:
            assert [(m.reason, m.seq) for m in stale] == [("gap", json.loads(recs[depth[499]].data)["data"]["u"])]
            assert not kinds(out, "BookSnapshot")  # nothing from the broken book is published
            assert actions == [FetchSnapshot("BTCUSDT")]
            return
    raise AssertionError("the gap was never detected")


async def test_a_dropped_diff_is_detected_then_resynced_from_rest_and_correct_again() -> None:
    depth = _depth_indices("binance", BINANCE, b"depthUpdate")
    run = await run_against_simulator("binance", BINANCE, natives=["BTCUSDT"], faults=Faults(drop={depth[1000]}),
                                      options=DEPTH_ONLY)
    assert _statuses(run.outputs)[1:4] == [
        ("synced", "recovered from connecting"), ("stale", "gap"), ("synced", "recovered from gap")]
    assert sum(1 for p in run.sim.rest_requests if p.startswith("/api/v3/depth")) == 2
    reference = reference_books("binance", records(BINANCE))
    compared = assert_published_match(run.outputs, reference, one_to_one=False)
    assert compared > 3000
    _final_book_equals_reference(run.outputs, reference, "BTCUSDT")


async def test_a_closed_connection_reconnects_and_resyncs() -> None:
    depth = _depth_indices("binance", BINANCE, b"depthUpdate")
    run = await run_against_simulator("binance", BINANCE, natives=["BTCUSDT"],
                                      faults=Faults(close_at={depth[800], depth[2500]}), options=DEPTH_ONLY)
    assert run.sim.connects == 3
    statuses = _statuses(run.outputs)
    assert statuses.count(("stale", "disconnected")) == 3  # two faults and the end of the test
    assert statuses.count(("synced", "recovered from disconnected")) == 2
    reference = reference_books("binance", records(BINANCE))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "BTCUSDT")


async def test_a_corrupted_okx_checksum_triggers_a_resubscription_and_a_fresh_snapshot() -> None:
    capture = CAPTURES["okx"][0]
    updates = _depth_indices("okx", capture, b'"instId":"BTC-USDT"},"action":"update"')
    run = await run_against_simulator("okx", capture, natives=["BTC-USDT"],
                                      faults=Faults(corrupt_checksum={updates[50]}))
    assert run.core.stats["resync:checksum"] == 1
    statuses = _statuses(run.outputs)
    assert statuses[1:4] == [("synced", "recovered from connecting"), ("stale", "checksum"),
                             ("synced", "recovered from checksum")]
    reference = reference_books("okx", records(capture))
    # Every book after the resync passed the exchange's checksum again, and ends where the exchange's does.
    _final_book_equals_reference(run.outputs, reference, "BTC-USDT")


async def test_a_bybit_gap_in_u_triggers_a_resubscription_and_a_fresh_snapshot() -> None:
    capture = CAPTURES["bybit"][0]
    deltas = _depth_indices("bybit", capture, b'"type":"delta"')
    run = await run_against_simulator("bybit", capture, natives=["XRPUSDT"], options=VenueOptions(channel_depth=500),
                                      faults=Faults(drop={deltas[20]}))
    assert run.core.stats["resync:gap"] == 1
    assert ("synced", "recovered from gap") in _statuses(run.outputs)
    reference = reference_books("bybit", records(capture))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "XRPUSDT")


async def test_a_garbled_frame_is_counted_malformed_and_the_book_stays_right() -> None:
    trades = _depth_indices("binance", BINANCE, b"@trade")
    run = await run_against_simulator("binance", BINANCE, natives=["BTCUSDT"], faults=Faults(garble={trades[10]}),
                                      options=VenueOptions(bbo=False))
    assert run.core.malformed == run.core.stats["malformed:decode"] == 1
    assert not [s for s in _statuses(run.outputs)[1:] if s[0] == "stale" and s[1] != "disconnected"]
    reference = reference_books("binance", records(BINANCE))
    _final_book_equals_reference(run.outputs, reference, "BTCUSDT")


async def test_a_stalled_exchange_turns_books_stale_and_they_recover_when_it_resumes() -> None:
    depth = _depth_indices("binance", BINANCE, b"depthUpdate")
    run = await run_against_simulator("binance", BINANCE, natives=["BTCUSDT"], faults=Faults(stall={depth[300]: 0.6}),
                                      stale_after_ns=200_000_000, options=DEPTH_ONLY)
    statuses = _statuses(run.outputs)
    assert ("stale", "silent") in statuses
    assert ("synced", "recovered from silent") in statuses


async def test_a_silent_connection_is_dropped_and_replaced() -> None:
    depth = _depth_indices("binance", BINANCE, b"depthUpdate")
    run = await run_against_simulator("binance", BINANCE, natives=["BTCUSDT"], faults=Faults(stall={depth[300]: 1.2}),
                                      silence_timeout_s=0.4, options=DEPTH_ONLY)
    assert run.sim.connects >= 2
    assert ("synced", "recovered from disconnected") in _statuses(run.outputs)


def test_resync_actions_follow_the_exchange_rule() -> None:
    assert make_venue("binance").resync == "snapshot"
    assert make_venue("okx").resync == "resubscribe"
    assert make_venue("bybit").resync == "resubscribe"
    assert make_venue("upbit").resync == "none"
    core = FeedCore(make_venue("okx"), strict=False)
    core.on_frame(b'{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"snapshot","data":[{"asks":[["2","1","0",'
                  b'"1"]],"bids":[["1","1","0","1"]],"ts":"1","checksum":1}]}', 1)
    assert core.take_actions() == [Resubscribe("BTC-USDT")]


# --------------------------------------------------------------------------- KuCoin, Gate, Bitget, Bithumb

KUCOIN = CAPTURES["kucoin"][0]
GATEIO = CAPTURES["gateio"][0]
BITGET = CAPTURES["bitget"][0]
BITHUMB = CAPTURES["bithumb"][0]
KEYED = VenueOptions(trades=False, credentials=KUCOIN_KEY)
EOS_UPDATE = b'"action":"update","arg":{"instType":"sp","channel":"books","instId":"EOSUSDT"'


def _nth(exchange: str, capture: list[str], needle: bytes, n: int) -> int:
    """The timeline index of the n-th frame containing ``needle`` anywhere (KuCoin's topic comes last)."""
    return simulator(exchange, paths(capture)).indices(lambda r: needle in r.data)[n]


async def test_kucoin_a_dropped_increment_is_a_gap_resynced_from_a_new_signed_snapshot() -> None:
    dropped = _nth("kucoin", KUCOIN, b'"topic":"/market/level2:BCHSV-USDT"', 600)
    run = await run_against_simulator("kucoin", KUCOIN, natives=["BCHSV-USDT"], faults=Faults(drop={dropped}),
                                      options=KEYED)
    assert run.core.stats["resync:gap"] == 1
    assert _statuses(run.outputs)[1:4] == [
        ("synced", "recovered from connecting"), ("stale", "gap"), ("synced", "recovered from gap")]
    full = [p for p in run.sim.rest_requests if p.startswith("/api/v3/market/orderbook/level2")]
    assert full == ["/api/v3/market/orderbook/level2?symbol=BCHSV-USDT"] * 2  # accepted: the signature held
    reference = reference_books("kucoin", records(KUCOIN))
    # Every book published before and after the hole is one the exchange had, with its sequence.
    assert assert_published_match(run.outputs, reference, one_to_one=False) > 400
    _final_book_equals_reference(run.outputs, reference, "BCHSV-USDT")


async def test_kucoin_a_closed_connection_gets_a_new_token_reconnects_and_resyncs() -> None:
    close = _nth("kucoin", KUCOIN, b'"topic":"/market/level2:BCHSV-USDT"', 1000)
    run = await run_against_simulator("kucoin", KUCOIN, natives=["BCHSV-USDT", "SNX-BTC"],
                                      faults=Faults(close_at={close}), options=KEYED)
    assert run.sim.connects == 2
    assert [p for p in run.sim.rest_requests if p.startswith("/api/v1/bullet-public")] == ["/api/v1/bullet-public"] * 2
    assert len(run.sim.venue.tokens) == 2  # type: ignore[attr-defined]
    statuses = _statuses(run.outputs)
    assert statuses.count(("synced", "recovered from disconnected")) == 2  # both books
    reference = reference_books("kucoin", records(KUCOIN))
    for symbol in ("BCHSV-USDT", "SNX-BTC"):
        _final_book_equals_reference(run.outputs, reference, symbol)


async def test_gateio_a_dropped_push_is_a_gap_resynced_from_a_new_rest_snapshot() -> None:
    dropped = _nth("gateio", GATEIO, b'"s":"OMG_USDT"', 20)
    run = await run_against_simulator("gateio", GATEIO, natives=["OMG_USDT", "NEO_BTC"],
                                      faults=Faults(drop={dropped}), options=VenueOptions(trades=False))
    assert run.core.stats["resync:gap"] == 1
    assert ("synced", "recovered from gap") in _statuses(run.outputs)
    snapshots = [p for p in run.sim.rest_requests if "currency_pair=OMG_USDT" in p]
    assert len(snapshots) == 2 and all("with_id=true" in p for p in snapshots)
    reference = reference_books("gateio", records(GATEIO))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "OMG_USDT")
    _final_book_equals_reference(run.outputs, reference, "NEO_BTC")


async def test_gateio_v2_a_dropped_push_resubscribes_for_a_new_full_push() -> None:
    dropped = _nth("gateio", GATEIO, b'"s":"OMG_USDT"', 20)
    run = await run_against_simulator("gateio", GATEIO, natives=["OMG_USDT"], faults=Faults(drop={dropped}),
                                      options=VenueOptions(trades=False, book_channel="spot.obu"))
    assert run.core.stats["resync:gap"] == 1
    assert ("synced", "recovered from gap") in _statuses(run.outputs)
    assert not [p for p in run.sim.rest_requests if "order_book" in p]  # V2 never needs the REST snapshot
    reference = reference_books("gateio", records(GATEIO))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "OMG_USDT")


async def test_gateio_a_closed_connection_reconnects_and_resyncs() -> None:
    close = _nth("gateio", GATEIO, b'"s":"OMG_USDT"', 25)
    run = await run_against_simulator("gateio", GATEIO, natives=["OMG_USDT"], faults=Faults(close_at={close}),
                                      options=VenueOptions(trades=False))
    assert run.sim.connects == 2
    assert ("synced", "recovered from disconnected") in _statuses(run.outputs)
    reference = reference_books("gateio", records(GATEIO))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "OMG_USDT")


async def test_bitget_a_corrupted_checksum_resubscribes_and_the_fresh_snapshot_checks_out() -> None:
    corrupted = _nth("bitget", BITGET, EOS_UPDATE, 10)
    run = await run_against_simulator("bitget", BITGET, natives=["EOSUSDT"],
                                      faults=Faults(corrupt_checksum={corrupted}), options=VenueOptions(trades=False))
    assert run.core.stats["resync:checksum"] == 1
    assert _statuses(run.outputs)[1:4] == [("synced", "recovered from connecting"), ("stale", "checksum"),
                                           ("synced", "recovered from checksum")]
    reference = reference_books("bitget", records(BITGET))
    _final_book_equals_reference(run.outputs, reference, "EOSUSDT")


async def test_bitget_a_dropped_update_is_caught_by_the_next_checksum() -> None:
    """v1 pushes carry no sequence: the checksum is what notices the hole."""
    dropped = _nth("bitget", BITGET, EOS_UPDATE, 10)
    run = await run_against_simulator("bitget", BITGET, natives=["EOSUSDT"], faults=Faults(drop={dropped}),
                                      options=VenueOptions(trades=False))
    assert run.core.stats["resync:checksum"] == 1
    assert ("synced", "recovered from checksum") in _statuses(run.outputs)
    reference = reference_books("bitget", records(BITGET))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "EOSUSDT")


async def test_bitget_a_closed_connection_reconnects_and_resyncs() -> None:
    close = _nth("bitget", BITGET, EOS_UPDATE, 20)
    run = await run_against_simulator("bitget", BITGET, natives=["EOSUSDT"], faults=Faults(close_at={close}),
                                      options=VenueOptions(trades=False))
    assert run.sim.connects == 2
    assert ("synced", "recovered from disconnected") in _statuses(run.outputs)
    reference = reference_books("bitget", records(BITGET))
    assert_published_match(run.outputs, reference, one_to_one=False)
    _final_book_equals_reference(run.outputs, reference, "EOSUSDT")


async def test_bithumb_legacy_books_stay_untrusted_across_a_reconnect() -> None:
    """Nothing can resync a legacy book: after a reconnect it starts again from nothing, and
    every book before and after is the one its own connection's pushes built, marked stale."""
    close = _nth("bithumb", BITHUMB, b'"symbol":"ETH_BTC"', 8)
    run = await run_against_simulator("bithumb", BITHUMB, natives=["ETH_BTC"], faults=Faults(close_at={close}),
                                      options=VenueOptions(trades=False, book_channel="orderbookdepth"))
    assert run.sim.connects == 2
    assert {m.status for m in kinds(run.outputs, "BookStatus")} == {"stale"}
    timeline = run.sim.timeline
    first = [timeline[i] for i in run.sim.sent if i <= close]
    second = [timeline[i] for i in run.sim.sent if i > close]
    assert first and second
    books = [m for m in kinds(run.outputs, "BookSnapshot") if m.symbol == "ETH_BTC"]
    assert {b.status for b in books} == {"stale"}
    expected = (reference_books("bithumb", first).books["ETH_BTC"]
                + reference_books("bithumb", second).books["ETH_BTC"])
    assert [(b.seq, b.bids, b.asks) for b in books] == expected


async def test_a_snapshot_asked_for_by_a_new_connection_while_an_old_one_is_under_way_still_comes() -> None:
    """Connections closed in quick succession: each new connection's book asks for its snapshot
    while the request made for the previous one is still under way, and must get its own."""
    pushes = _depth_indices("gateio", GATEIO, b'"s":"OMG_USDT"')
    run = await run_against_simulator("gateio", GATEIO, natives=["OMG_USDT"], options=VenueOptions(trades=False),
                                      faults=Faults(close_at={pushes[i] for i in (10, 12, 14, 16)}))
    assert run.sim.connects == 5
    assert _statuses(run.outputs)[-2] == ("synced", "recovered from disconnected")  # then the end of the test
    _final_book_equals_reference(run.outputs, reference_books("gateio", records(GATEIO)), "OMG_USDT")


async def test_bithumb_current_api_reconnects_and_its_books_are_synced_again_by_the_next_message() -> None:
    """Bithumb's current API is Upbit's protocol (played here from Upbit's recording, the only
    one of that protocol we have): every message is the whole book, so the next one resyncs."""
    capture = CAPTURES["upbit"][0]
    close = _nth("bithumb", capture, b'"cd":"KRW-WAVES"', 3)
    run = await run_against_simulator("bithumb", capture, natives=["KRW-WAVES"], faults=Faults(close_at={close}))
    assert run.sim.connects == 2
    assert ("synced", "recovered from disconnected") in _statuses(run.outputs)
    reference = reference_books("upbit", records(capture))
    assert_published_match(run.outputs, reference)
    _final_book_equals_reference(run.outputs, reference, "KRW-WAVES")
