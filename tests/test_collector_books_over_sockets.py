"""Acceptance: every recorded book capture, served by the simulator over real sockets, gives
the collector the same books as an independent reference builder, update after update."""

from __future__ import annotations

import json

import pytest

from services.collector.venue import Credentials, VenueOptions
from tests.collector_helpers import CAPTURES, KUCOIN_KEY, kinds, records, run_against_simulator
from tests.collector_reference import assert_published_match, book_natives, reference_books

CASES = [(exchange, capture) for exchange, captures in CAPTURES.items() for capture in captures]


def _options(exchange: str, capture: list[str], upbit_format: str = "SIMPLE") -> VenueOptions:
    depth, channel = 0, ""
    if exchange == "bybit":  # subscribe to the depth the capture was recorded with
        depth = 500 if "ob500" in capture[0] else 1
    if exchange == "okx" and "books-l2-tbt" in capture[0]:
        channel = "books-l2-tbt"
    if exchange == "bithumb":  # the recording is of the legacy feed
        channel = "orderbookdepth"
    return VenueOptions(channel_depth=depth, book_channel=channel, upbit_format=upbit_format,  # type: ignore[arg-type]
                        credentials=KUCOIN_KEY if exchange == "kucoin" else None)


@pytest.mark.parametrize(("exchange", "capture"), CASES, ids=[c[0].split("/")[1] for _, c in CASES])
async def test_every_published_book_equals_the_reference_builder(exchange: str, capture: list[str]) -> None:
    recs = records(capture)
    run = await run_against_simulator(exchange, capture, natives=book_natives(exchange, recs),
                                      options=_options(exchange, capture))
    reference = reference_books(exchange, recs)
    # Bithumb's legacy feed has no sync point: its books are published, marked stale, never synced.
    status = "stale" if exchange == "bithumb" else "synced"
    compared = assert_published_match(run.outputs, reference, status=status)
    assert compared >= 0.95 * sum(len(v) for v in reference.books.values()) - len(reference.books)
    assert run.core.malformed == 0
    assert not [k for k in run.core.stats if k.startswith("resync:")]
    assert reference.gaps == 0


async def test_okx_checksum_matches_on_every_update_of_both_captures() -> None:
    for capture in CAPTURES["okx"]:
        recs = records(capture)
        run = await run_against_simulator("okx", capture, natives=book_natives("okx", recs),
                                          options=_options("okx", capture))
        reference = reference_books("okx", recs)
        updates = sum(1 for r in recs if r.kind == "ws" and b'"action"' in r.data)
        assert reference.checksums_checked == updates > 0
        assert reference.checksum_mismatches == 0
        # The collector verified the same checksums itself: a mismatch would have been a resync.
        assert run.core.stats["resync:checksum"] == 0
        assert len(kinds(run.outputs, "BookSnapshot")) == updates


async def test_binance_btcusdt_syncs_from_its_rest_snapshot_and_stays_synced_to_the_end() -> None:
    capture = CAPTURES["binance"][0]
    recs = records(capture)
    run = await run_against_simulator("binance", capture, natives=["BTCUSDT"],
                                      options=VenueOptions(trades=False, bbo=False))
    depth_requests = [p for p in run.sim.rest_requests if p.startswith("/api/v3/depth")]
    assert depth_requests == ["/api/v3/depth?symbol=BTCUSDT&limit=1000"]  # one snapshot: the recorded one
    statuses = [(m.status, m.reason) for m in kinds(run.outputs, "BookStatus")]
    # synced once, and stale again only when the test closes the connection at the end
    assert statuses == [("stale", "connecting"), ("synced", "recovered from connecting"), ("stale", "disconnected")]
    books = kinds(run.outputs, "BookSnapshot")
    snapshot_id = json.loads(next(r.data for r in recs if r.data.startswith(b'{"lastUpdateId"')))["lastUpdateId"]
    last_u = max(json.loads(r.data)["data"]["u"] for r in recs if b"depthUpdate" in r.data[:80])
    assert books[0].seq > snapshot_id
    assert books[-1].seq == last_u
    assert all(b.status == "synced" for b in books)


@pytest.mark.parametrize("fmt", ["DEFAULT", "SIMPLE"])
async def test_upbit_books_in_both_formats_equal_the_reference(fmt: str) -> None:
    capture = CAPTURES["upbit"][0]
    recs = records(capture)
    run = await run_against_simulator("upbit", capture, natives=book_natives("upbit", recs),
                                      options=VenueOptions(upbit_format=fmt))  # type: ignore[arg-type]
    compared = assert_published_match(run.outputs, reference_books("upbit", recs))
    assert compared == 145
    assert len(kinds(run.outputs, "Trade")) == 304


async def test_bitget_checksum_matches_on_every_update_of_both_captures() -> None:
    for capture in CAPTURES["bitget"]:
        recs = records(capture)
        run = await run_against_simulator("bitget", capture, natives=book_natives("bitget", recs),
                                          options=VenueOptions(trades=False))
        reference = reference_books("bitget", recs)
        pushes = sum(1 for r in recs if r.kind == "ws" and r.data.startswith(b'{"action"')
                     and b'"channel":"books"' in r.data[:120])
        assert reference.checksums_checked == pushes > 0
        assert reference.checksum_mismatches == 0
        # The collector checked the same checksums itself (over the v2 envelope): a mismatch would be a resync.
        assert run.core.stats["resync:checksum"] == 0 and run.core.malformed == 0
        assert len(kinds(run.outputs, "BookSnapshot")) == pushes


async def test_kucoin_signs_its_full_snapshot_requests_and_a_wrong_key_is_refused() -> None:
    capture = CAPTURES["kucoin"][0]
    natives = book_natives("kucoin", records(capture))
    run = await run_against_simulator("kucoin", capture, natives=natives, options=VenueOptions(
        trades=False, credentials=KUCOIN_KEY))
    full = sorted(p for p in run.sim.rest_requests if p.startswith("/api/v3/market/orderbook/level2"))
    assert full == sorted(f"/api/v3/market/orderbook/level2?symbol={n}" for n in natives)  # one each, accepted
    wrong = Credentials(key=KUCOIN_KEY.key, secret="not-the-secret", passphrase=KUCOIN_KEY.passphrase)
    refused = await run_against_simulator("kucoin", capture, natives=natives[:1], timeout_s=60,
                                          options=VenueOptions(trades=False, credentials=wrong))
    assert not kinds(refused.outputs, "BookSnapshot")  # never synced on a snapshot it could not get
    assert len([p for p in refused.sim.rest_requests if p.startswith("/api/v3/")]) >= 2  # and it kept asking


async def test_kucoin_without_a_key_syncs_from_the_public_partial_snapshot() -> None:
    capture = CAPTURES["kucoin"][0]
    natives = ["BCHSV-USDT", "CAPP-BTC", "FET-BTC"]  # asks run past 100 levels in all three
    run = await run_against_simulator("kucoin", capture, natives=natives, options=VenueOptions(trades=False))
    assert {p.split("?")[0] for p in run.sim.rest_requests if "orderbook" in p} == {
        "/api/v1/market/orderbook/level2_100"}
    # Top 20 published from the partial books: every one a book the exchange had, level for level.
    assert assert_published_match(run.outputs, reference_books("kucoin", records(capture)), one_to_one=False) > 1000
    assert run.core.malformed == 0


async def test_gateio_v2_obu_books_equal_the_reference_builder() -> None:
    capture = CAPTURES["gateio"][0]
    recs = records(capture)
    run = await run_against_simulator("gateio", capture, natives=book_natives("gateio", recs),
                                      options=VenueOptions(trades=False, book_channel="spot.obu"))
    reference = reference_books("gateio", recs)
    assert assert_published_match(run.outputs, reference, one_to_one=False) > 150
    assert run.core.malformed == 0 and not [k for k in run.core.stats if k.startswith("resync:")]
    assert not [p for p in run.sim.rest_requests if "order_book" in p]
    for symbol, entries in reference.books.items():
        last = [m for m in kinds(run.outputs, "BookSnapshot") if m.symbol == symbol][-1]
        assert (last.seq, last.bids, last.asks) == entries[-1]


async def test_bithumb_current_api_is_upbits_protocol_and_its_books_equal_the_reference() -> None:
    """No recording of Bithumb's current API exists: Upbit's recorded frames, which the current
    Bithumb API mirrors field for field, drive the Bithumb module and simulator."""
    capture = CAPTURES["upbit"][0]
    recs = records(capture)
    run = await run_against_simulator("bithumb", capture, natives=book_natives("upbit", recs))
    assert assert_published_match(run.outputs, reference_books("upbit", recs)) == 145
    assert len(kinds(run.outputs, "Trade")) == 304
    assert {m.status for m in kinds(run.outputs, "BookSnapshot")} == {"synced"}


async def test_bithumb_legacy_books_are_published_stale_and_never_synced() -> None:
    capture = CAPTURES["bithumb"][0]
    recs = records(capture)
    natives = book_natives("bithumb", recs)
    run = await run_against_simulator("bithumb", capture, natives=natives,
                                      options=VenueOptions(book_channel="orderbookdepth"))
    statuses = [(m.symbol, m.status, m.reason) for m in kinds(run.outputs, "BookStatus")]
    assert {s for _, s, _ in statuses} == {"stale"}
    assert {(sym, r) for sym, _, r in statuses if r == "untrusted"} == {(n, "untrusted") for n in natives}
    assert {m.status for m in kinds(run.outputs, "BookSnapshot")} == {"stale"}
    assert all(book["status"] == "stale" and book["reason"] == "untrusted" for book in run.core.health(0).values())
    fills = [f for r in recs if r.kind == "ws" and r.data.startswith(b'{"type":"transaction"')
             for f in json.loads(r.data)["content"]["list"]]
    trades = kinds(run.outputs, "Trade")  # trades are sound and published
    assert [(t.symbol, t.price, t.side) for t in trades] == [
        (f["symbol"], float(f["contPrice"]), "sell" if f["buySellGb"] == "1" else "buy") for f in fills]
