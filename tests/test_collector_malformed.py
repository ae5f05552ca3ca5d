"""Malformed input, per parser: no exception escapes, every bad frame is counted, and the
good frames around it still apply exactly as they would have without it.

Bad frames are built from recorded ones (truncated, a field given the wrong type, an unknown
symbol, empty or impossible levels, a crossed Upbit book) or are arbitrary bytes, and are
inserted between the recorded frames, which stay untouched.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.collector.core import FeedCore
from services.collector.exchanges import make_venue
from shared.capture import Record
from tests.collector_helpers import CAPTURES, METADATA, kinds, records
from tests.collector_reference import book_natives

Mutation = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutation:
    def mutate(msg: dict[str, Any]) -> Any:
        node: Any = msg
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return msg
    return mutate


def _drop(path: str) -> Mutation:
    def mutate(msg: dict[str, Any]) -> Any:
        node: Any = msg
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        del node[last]
        return msg
    return mutate


def _crossed_upbit(msg: dict[str, Any]) -> Any:
    unit = msg["obu"][0]
    unit["bp"] = unit["ap"] * 1.01
    return msg


def _every_symbol(value: str) -> Mutation:
    """Bithumb's legacy pushes name the symbol on every level: an unknown market renames them all."""
    def mutate(msg: dict[str, Any]) -> Any:
        for level in msg["content"]["list"]:
            level["symbol"] = value
        return msg
    return mutate


# Per exchange: which recorded frames to mutate (a byte marker) and mutations that make them
# invalid for that exchange's documented format.
MUTATIONS: dict[str, dict[bytes, list[Mutation]]] = {
    "binance": {
        b"depthUpdate": [_set("data.U", "first"), _set("data.b", [["-1.0", "1.0"]]), _set("data.b", [[]]),
                         _set("data.a", [["100.0"]]), _set("data.a", "none"), _set("data.s", "ZZZZUSDT"),
                         _drop("data.u"), _set("data.b", [["nan", "1"]]), _set("data.a", [["inf", "1"]]),
                         _set("data.E", {"t": 1})],
        b"@trade": [_set("data.p", "abc"), _set("data.m", "maybe"), _set("data.s", "ZZZZUSDT"), _drop("data.t"),
                    _set("data.q", "-2")],
        b"bookTicker": [_set("data.b", "-5"), _set("data.A", None), _set("data.s", "ZZZZUSDT")],
    },
    "okx": {
        b'"action":"update"': [_set("data.0.asks", [["abc", "1", "0", "1"]]), _set("data.0.bids", [["1", "2"]]),
                               _set("data.0.ts", "soon"), _set("data.0.checksum", "x"), _set("data", []),
                               _set("arg.instId", "ZZZ-USDT"), _set("action", "merge"),
                               _set("data.0.asks", [["-1", "1", "0", "1"]]), _set("data.0.bids", [[]])],
        b'"channel":"trades"': [_set("data.0.side", "up"), _set("data.0.px", "-3"), _set("data.0.sz", "many")],
    },
    "bybit": {
        b'"type":"delta"': [_set("data.u", "next"), _set("data.b", [["-1", "2"]]), _set("data.s", "ZZZUSDT"),
                            _set("type", "merge"), _set("data.a", [["1"]]), _drop("data.b"), _set("ts", [])],
    },
    "upbit": {
        b'"orderbook"': [_set("obu", []), _set("tms", "now"), _crossed_upbit, _set("cd", "KRW-ZZZ"),
                         _set("obu.0.ap", -1), _drop("obu"), _set("obu.0", {"ap": 1})],
        b'"trade"': [_set("ab", "BOTH"), _set("tp", 0), _set("cd", "KRW-ZZZ"), _drop("sid")],
    },
    "kucoin": {
        b'{"data":{"sequenceStart"': [_set("data.sequenceStart", "next"), _set("data.changes.bids", [["-1", "1", "5"]]),
                                      _set("data.changes.asks", [["1", "1"]]), _set("data.symbol", "ZZZ-USDT"),
                                      _drop("data.sequenceEnd"), _set("data.changes", []),
                                      _set("data.changes.bids", [["nan", "1", "1"]]), _set("data.changes.asks", "none"),
                                      _set("data.changes.bids", [["1", "-2", "1"]])],
        b'"takerOrderId"': [_set("data.side", "up"), _set("data.price", "-1"), _set("data.size", "many"),
                            _drop("data.tradeId"), _set("data.symbol", "ZZZ-USDT")],
    },
    "gateio": {
        b'"spot.order_book_update","event":"update"': [
            _set("result.U", "first"), _set("result.b", [["-1", "1"]]), _set("result.a", [["1"]]),
            _set("result.s", "ZZZ_USDT"), _drop("result.u"), _set("result.b", "none"), _set("result.a", [["inf", "1"]]),
            _set("result.b", [[]]), _set("result.t", {"ms": 1})],
        b'"spot.trades","event":"update"': [_set("result.side", "up"), _set("result.price", "abc"),
                                           _set("result.create_time_ms", "soon"),
                                           _set("result.currency_pair", "ZZZ_USDT")],
    },
    "bitget": {
        b'"action":"update","arg":{"instType":"sp","channel":"books"': [
            _set("data.0.asks", [["abc", "1"]]), _set("data.0.bids", [["1"]]), _set("data.0.ts", "soon"),
            _set("data.0.checksum", "x"), _set("data", []), _set("arg.instId", "ZZZUSDT"), _set("action", "merge"),
            _set("data.0.asks", [["-1", "1"]]), _set("data.0.bids", [[]]), _set("data.0.bids", [["1", "nan"]])],
        b'"action":"update","arg":{"instType":"sp","channel":"trade"': [
            _set("data.0.3", "up"), _set("data.0.1", "-3"), _set("data.0.2", "many"), _set("arg.instId", "ZZZUSDT")],
    },
    "bithumb": {
        b'{"type":"orderbookdepth"': [_set("content.datetime", "soon"), _set("content.list", []),
                                     _set("content.list.0.orderType", "mid"), _set("content.list.0.price", "-1"),
                                     _set("content.list.0.quantity", "lots"), _every_symbol("ZZZ_KRW"),
                                     _drop("content.datetime")],
        b'{"type":"transaction"': [_set("content.list.0.buySellGb", "3"), _set("content.list.0.contDtm", "yesterday"),
                                  _set("content.list.0.contPrice", "x"), _set("content.list.0.symbol", "ZZZ_KRW")],
    },
}

CONTROL = {"okx": {b"pong"}, "bitget": {b"pong"}}
"""Frames that are not JSON yet belong to the protocol."""

CAPTURE = {"binance": CAPTURES["binance"][0], "okx": CAPTURES["okx"][0], "bybit": CAPTURES["bybit"][0],
           "upbit": CAPTURES["upbit"][0], "kucoin": CAPTURES["kucoin"][0], "gateio": CAPTURES["gateio"][0],
           "bitget": CAPTURES["bitget"][0], "bithumb": CAPTURES["bithumb"][0]}
FRAMES = {"binance": 700, "okx": 120, "bybit": 50, "upbit": 200, "kucoin": 600, "gateio": 239, "bitget": 150,
          "bithumb": 98}
"""Received frames used per exchange (the REST snapshots recorded among them come along)."""


def _good(exchange: str) -> list[Record]:
    out: list[Record] = []
    frames = 0
    for r in records(CAPTURE[exchange]):
        if r.kind == "rest":
            out.append(r)
        elif r.kind == "ws":
            if frames == FRAMES[exchange]:
                break
            out.append(r)
            frames += 1
    return out


def _core(exchange: str) -> FeedCore:
    """A strict core, as in production: it knows its instruments."""
    core = FeedCore(make_venue(exchange), strict=True)
    if exchange in METADATA:
        for r in records([METADATA[exchange]]):
            core.on_rest(r.url, r.data, 0)
    natives = {"binance": ["BTCUSDT"], "okx": ["BTC-USDT", "UNI-USD-SWAP", "BTC-USD-220527"],
               "bybit": ["XRPUSDT"]}.get(exchange)
    if exchange == "upbit":
        natives = sorted({json.loads(r.data)["cd"] for r in _good("upbit") if r.kind == "ws"})
    if exchange in ("kucoin", "gateio", "bitget", "bithumb"):
        natives = book_natives(exchange, _good(exchange))
    for native in natives or ():
        core.symbols.setdefault(native, native)
    core.track(natives or [], 0)
    core.take()
    return core


Item = tuple[bytes, int, str | None]
"""A received frame (url None) or a recorded REST response, as the live shell hands them over."""


def _items(recs: list[Record]) -> list[Item]:
    return [(r.data, r.recv_ns, r.url if r.kind == "rest" else None) for r in recs]


def _run(core: FeedCore, items: list[Item]) -> list[Any]:
    out = []
    for data, recv_ns, url in items:
        if url is None:
            core.on_frame(data, recv_ns)
        else:
            core.on_rest(url, data, recv_ns)
        out.extend(core.take())
        core.take_actions()
    return out


def _books(outputs: list[Any]) -> list[tuple[str, int, Any, Any]]:
    return [(m.symbol, m.seq, m.bids, m.asks) for m in kinds(outputs, "BookSnapshot")]


def _metric(exchange: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == "arb_collector_malformed":
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("exchange") == exchange:
                    total += sample.value
    return total


def _bad_frames(exchange: str) -> st.SearchStrategy[bytes]:
    good = _good(exchange)
    mutated: list[bytes] = []
    for marker, mutations in MUTATIONS[exchange].items():
        sources = [r.data for r in good if marker in r.data[:200] and b'"event"' not in r.data[:20]][:3]
        assert sources, f"no recorded {marker!r} frame to mutate"
        for source in sources:
            for mutate in mutations:
                mutated.append(json.dumps(mutate(copy.deepcopy(json.loads(source)))).encode())
    truncated = st.tuples(st.sampled_from([r.data for r in good if r.kind == "ws"]), st.floats(0, 0.999)).map(
        lambda t: t[0][:int(len(t[0]) * t[1])])

    def not_json(data: bytes) -> bool:
        if data in CONTROL.get(exchange, ()):
            return False  # a legitimate control frame, not junk
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError:
            return True
        return False

    return st.one_of(st.sampled_from(mutated), truncated, st.binary(max_size=64).filter(not_json))


@pytest.mark.parametrize("exchange", sorted(CAPTURE))
def test_bad_frames_are_counted_and_skipped_and_the_good_ones_still_apply(exchange: str) -> None:
    good = _items(_good(exchange))
    clean = _books(_run(_core(exchange), good))
    assert len(clean) > 10

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.integers(0, len(good)), _bad_frames(exchange)), max_size=12))
    def check(insertions: list[tuple[int, bytes]]) -> None:
        frames = list(good)
        for position, bad in sorted(insertions, key=lambda t: t[0], reverse=True):
            frames.insert(position, (bad, 0, None))
        core = _core(exchange)
        before = _metric(exchange)
        outputs = _run(core, frames)  # nothing may escape
        assert core.malformed == len(insertions)
        assert _metric(exchange) - before == len(insertions)
        assert _books(outputs) == clean
        assert not [k for k in core.stats if k.startswith("resync:")]

    check()


def test_a_crossed_diff_throws_the_book_away_and_asks_for_a_snapshot() -> None:
    good = _good("binance")
    core = _core("binance")
    _run(core, _items(good))
    book = core.books["BTCUSDT"].sync.book
    best_ask = book.best_ask()
    assert best_ask is not None
    diff = next(json.loads(r.data) for r in reversed(good) if b"depthUpdate" in r.data[:80])
    seq = core.books["BTCUSDT"].sync.seq
    diff["data"].update(U=seq + 1, u=seq + 1, b=[[str(best_ask + 1), "1"]], a=[])
    core.on_frame(json.dumps(diff).encode(), 1)
    statuses = [(m.status, m.reason) for m in kinds(core.take(), "BookStatus")]
    assert statuses == [("stale", "crossed")]
    assert core.stats["malformed:crossed"] == 1
    assert [a.native for a in core.take_actions()] == ["BTCUSDT"]
    assert not book  # nothing of the broken book is kept
