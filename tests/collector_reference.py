"""Independent reference order books for the collector tests.

Each exchange's documented book rules written out again, as plainly as possible: dicts of
``Decimal`` prices and sizes, ``json`` decoding, ``sorted`` for the top levels. Nothing here
imports the collector, so a bug there cannot hide behind the same bug here.

``reference_books`` returns, per native symbol, the book after every change as
``(seq, bids, asks)`` with the top ``depth`` levels as floats, best first.
"""

from __future__ import annotations

import heapq
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from shared.capture import Record

Entry = tuple[int, list[tuple[float, float]], list[tuple[float, float]]]


@dataclass
class Book:
    bids: dict[Decimal, Decimal] = field(default_factory=dict)
    asks: dict[Decimal, Decimal] = field(default_factory=dict)
    raw_bids: dict[Decimal, tuple[str, str]] = field(default_factory=dict)
    raw_asks: dict[Decimal, tuple[str, str]] = field(default_factory=dict)
    seq: int = 0

    def set(self, side: str, price: Any, size: Any) -> None:
        book, raw = (self.bids, self.raw_bids) if side == "bid" else (self.asks, self.raw_asks)
        p, q = Decimal(str(price)), Decimal(str(size))
        if q == 0:
            book.pop(p, None)
            raw.pop(p, None)
        else:
            book[p] = q
            raw[p] = (str(price), str(size))

    def load(self, bids: Iterable[Sequence[Any]], asks: Iterable[Sequence[Any]]) -> None:
        self.bids, self.asks, self.raw_bids, self.raw_asks = {}, {}, {}, {}
        self.apply(bids, asks)

    def apply(self, bids: Iterable[Sequence[Any]], asks: Iterable[Sequence[Any]]) -> None:
        for level in bids:
            self.set("bid", level[0], level[1])
        for level in asks:
            self.set("ask", level[0], level[1])

    def top(self, depth: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        bids = heapq.nlargest(depth, self.bids.items())
        asks = heapq.nsmallest(depth, self.asks.items())
        return [(float(p), float(q)) for p, q in bids], [(float(p), float(q)) for p, q in asks]

    def okx_checksum(self) -> int:
        bids = [self.raw_bids[p] for p in sorted(self.raw_bids, reverse=True)[:25]]
        asks = [self.raw_asks[p] for p in sorted(self.raw_asks)[:25]]
        parts = []
        for i in range(25):
            if i < len(bids):
                parts.append(":".join(bids[i]))
            if i < len(asks):
                parts.append(":".join(asks[i]))
        value = zlib.crc32(":".join(parts).encode())
        return value - 2**32 if value >= 2**31 else value


@dataclass
class Reference:
    books: dict[str, list[Entry]] = field(default_factory=dict)
    checksums_checked: int = 0
    checksum_mismatches: int = 0
    gaps: int = 0
    quiet: dict[str, list[Entry]] = field(default_factory=dict)
    """States the exchange passed through without a change to publish (a KuCoin increment made
    only of price-0 changes moves the sequence alone): a resync may land on one."""

    def record(self, symbol: str, seq: int, book: Book, depth: int, *, changed: bool = True) -> None:
        bids, asks = book.top(depth)
        (self.books if changed else self.quiet).setdefault(symbol, []).append((seq, bids, asks))


def reference_books(exchange: str, records: Sequence[Record], depth: int = 20) -> Reference:
    builders = {"binance": _binance, "okx": _okx, "bybit": _bybit, "upbit": _upbit, "kucoin": _kucoin,
                "gateio": _gateio, "bitget": _bitget, "bithumb": _bithumb}
    return builders[exchange](records, depth)


def _binance(records: Sequence[Record], depth: int) -> Reference:
    """REST snapshot, then diffs: skip u <= lastUpdateId; apply while U == previous u + 1."""
    ref = Reference()
    ws = [r for r in records if r.kind == "ws"]
    symbols = set()
    for r in ws:
        if r.data.startswith(b'{"stream"') and b"depthUpdate" in r.data[:80]:
            symbols.add(json.loads(r.data)["data"]["s"])
    books: dict[str, Book] = {}
    for r in records:
        body: dict[str, Any] | None = None
        symbol = ""
        if r.kind == "rest" and urlsplit(r.url).path.endswith("/depth"):
            symbol, body = parse_qs(urlsplit(r.url).query)["symbol"][0], json.loads(r.data)
        elif r.data.startswith(b'{"lastUpdateId"') and len(symbols) == 1:
            symbol, body = next(iter(symbols)), json.loads(r.data)
        if body is not None and symbol not in books:
            book = books[symbol] = Book(seq=body["lastUpdateId"])
            book.load(body["bids"], body["asks"])
    synced: set[str] = set()
    for r in ws:
        if b'"depthUpdate"' not in r.data[:120]:
            continue
        d = json.loads(r.data)["data"]
        book = books.get(d["s"])
        if book is None or d["u"] <= book.seq:
            continue
        if d["s"] not in synced:
            assert d["U"] <= book.seq + 1 <= d["u"], "the recorded snapshot does not meet the diffs"
            synced.add(d["s"])
            ref.record(d["s"], book.seq, book, depth)  # the snapshot itself
        elif d["U"] != book.seq + 1:
            ref.gaps += 1
        book.apply(d["b"], d["a"])
        book.seq = d["u"]
        ref.record(d["s"], book.seq, book, depth)
    return ref


def _okx(records: Sequence[Record], depth: int) -> Reference:
    """Snapshot replaces, updates apply; the CRC32 of the top 25 strings must match."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind != "ws" or b'"action"' not in r.data:
            continue
        msg = json.loads(r.data)
        inst = msg["arg"]["instId"]
        for d in msg["data"]:
            if msg["action"] == "snapshot":
                book = books[inst] = Book()
                book.load(d["bids"], d["asks"])
            elif inst in books:
                book = books[inst]
                if "seqId" in d and d.get("prevSeqId") not in (book.seq, None) and d["seqId"] >= d["prevSeqId"]:
                    ref.gaps += 1
                book.apply(d["bids"], d["asks"])
            else:
                continue
            book.seq = d.get("seqId", int(d["ts"]))
            if "checksum" in d:
                ref.checksums_checked += 1
                if book.okx_checksum() != d["checksum"]:
                    ref.checksum_mismatches += 1
            ref.record(inst, book.seq, book, depth)
    return ref


def _bybit(records: Sequence[Record], depth: int) -> Reference:
    """Snapshot (or u == 1) replaces; a delta applies when its u follows the last one."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind != "ws" or not r.data.startswith(b'{"topic":"orderbook.'):
            continue
        msg = json.loads(r.data)
        d = msg["data"]
        if msg["type"] == "snapshot" or d["u"] == 1:
            book = books[d["s"]] = Book()
            book.load(d["b"], d["a"])
        elif d["s"] in books:
            book = books[d["s"]]
            if d["u"] != book.seq + 1:
                ref.gaps += 1
            book.apply(d["b"], d["a"])
        else:
            continue
        book.seq = d["u"]
        ref.record(d["s"], book.seq, book, depth)
    return ref


def _upbit(records: Sequence[Record], depth: int) -> Reference:
    """Every orderbook message is the whole book; older timestamps are dropped."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind != "ws":
            continue
        msg = json.loads(r.data)
        if msg.get("ty", msg.get("type")) != "orderbook":
            continue
        code = msg.get("cd", msg.get("code"))
        tms = msg.get("tms", msg.get("timestamp"))
        units = msg.get("obu", msg.get("orderbook_units"))
        book = books.setdefault(code, Book(seq=-1))
        if tms < book.seq:
            continue
        bids = [(u.get("bp", u.get("bid_price")), u.get("bs", u.get("bid_size"))) for u in units]
        asks = [(u.get("ap", u.get("ask_price")), u.get("as", u.get("ask_size"))) for u in units]
        book.load([b for b in bids if b[0] and b[1]], [a for a in asks if a[0] and a[1]])
        book.seq = tms
        ref.record(code, tms, book, depth)
    return ref


def _kucoin(records: Sequence[Record], depth: int) -> Reference:
    """REST snapshot (``sequence``), then increments: skip sequenceEnd <= sequence; each must
    start at or before local + 1; changes with a sequence above local apply, price 0 only
    moves the sequence. A book is recorded when an increment changed a level."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind == "rest" and "/market/orderbook/level2" in r.url:
            symbol = parse_qs(urlsplit(r.url).query)["symbol"][0]
            data = json.loads(r.data)["data"]
            if symbol not in books:
                book = books[symbol] = Book(seq=int(data["sequence"]))
                book.load(data["bids"], data["asks"])
                ref.record(symbol, book.seq, book, depth)  # the snapshot itself
    increments = sorted((json.loads(r.data)["data"] for r in records
                         if r.kind == "ws" and b'"trade.l2update"' in r.data), key=lambda d: d["sequenceStart"])
    for d in increments:
        book = books.get(d["symbol"])
        if book is None or d["sequenceEnd"] <= book.seq:
            continue
        if d["sequenceStart"] > book.seq + 1:
            ref.gaps += 1
        changed = False
        for side, key in (("bid", "bids"), ("ask", "asks")):
            for price, size, sequence in d["changes"][key]:
                if int(sequence) > book.seq and Decimal(price) != 0:
                    book.set(side, price, size)
                    changed = True
        book.seq = d["sequenceEnd"]
        ref.record(d["symbol"], book.seq, book, depth, changed=changed)
    return ref


def _gateio(records: Sequence[Record], depth: int) -> Reference:
    """REST snapshot (``id``), then pushes: drop u <= id; the first kept has U <= id + 1 <= u,
    every later one U == previous u + 1."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind == "rest" and "/spot/order_book" in r.url:
            pair = parse_qs(urlsplit(r.url).query)["currency_pair"][0]
            body = json.loads(r.data)
            if pair not in books:
                book = books[pair] = Book(seq=body["id"])
                book.load(body["bids"], body["asks"])
                ref.record(pair, book.seq, book, depth)  # the snapshot itself
    pushes = sorted((json.loads(r.data)["result"] for r in records if r.kind == "ws"
                     and b'"spot.order_book_update","event":"update"' in r.data), key=lambda d: d["U"])
    started: set[str] = set()
    for d in pushes:
        book = books.get(d["s"])
        if book is None or d["u"] <= book.seq:
            continue
        if d["s"] not in started:
            started.add(d["s"])
            assert d["U"] <= book.seq + 1 <= d["u"], "the recorded snapshot does not meet the pushes"
        elif d["U"] != book.seq + 1:
            ref.gaps += 1
        book.apply(d["b"], d["a"])
        book.seq = d["u"]
        ref.record(d["s"], book.seq, book, depth)
    return ref


def _bitget(records: Sequence[Record], depth: int) -> Reference:
    """Snapshot replaces, updates apply; the CRC32 of the top 25 strings (OKX's layout) must match."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind != "ws" or not r.data.startswith(b'{"action"') or b'"channel":"books"' not in r.data[:120]:
            continue
        msg = json.loads(r.data)
        inst = msg["arg"]["instId"]
        for d in msg["data"]:
            if msg["action"] == "snapshot":
                book = books[inst] = Book()
                book.load(d["bids"], d["asks"])
            elif inst in books:
                book = books[inst]
                book.apply(d["bids"], d["asks"])
            else:
                continue
            book.seq = d.get("seq", int(d["ts"]))
            ref.checksums_checked += 1
            if book.okx_checksum() != d["checksum"]:
                ref.checksum_mismatches += 1
            ref.record(inst, book.seq, book, depth)
    return ref


def _bithumb(records: Sequence[Record], depth: int) -> Reference:
    """Legacy ``orderbookdepth``: changed levels applied from an empty book, one book per push
    (the collector publishes these marked stale: there is no sync point)."""
    ref = Reference()
    books: dict[str, Book] = {}
    for r in records:
        if r.kind != "ws" or not r.data.startswith(b'{"type":"orderbookdepth"'):
            continue
        content = json.loads(r.data)["content"]
        touched: dict[str, None] = {}
        for level in content["list"]:
            book = books.setdefault(level["symbol"], Book())
            book.set("bid" if level["orderType"] == "bid" else "ask", level["price"], level["quantity"])
            touched[level["symbol"]] = None
        for symbol in touched:
            books[symbol].seq = int(content["datetime"])
            ref.record(symbol, books[symbol].seq, books[symbol], depth)
    return ref


def book_natives(exchange: str, records: Sequence[Record]) -> list[str]:
    """The native symbols whose books a capture carries (what a client would subscribe to)."""
    out: dict[str, None] = {}
    for r in records:
        if r.kind != "ws":
            continue
        if exchange == "binance" and b"depthUpdate" in r.data[:120]:
            out[json.loads(r.data)["data"]["s"]] = None
        elif exchange == "okx" and b'"action"' in r.data:
            out[json.loads(r.data)["arg"]["instId"]] = None
        elif exchange == "bybit" and r.data.startswith(b'{"topic":"orderbook.'):
            out[json.loads(r.data)["data"]["s"]] = None
        elif exchange == "upbit" and b"orderbook" in r.data[:40]:
            msg = json.loads(r.data)
            out[msg.get("cd", msg.get("code"))] = None
        elif exchange == "kucoin" and b'"trade.l2update"' in r.data:
            out[json.loads(r.data)["data"]["symbol"]] = None
        elif exchange == "gateio" and b'"spot.order_book_update","event":"update"' in r.data:
            out[json.loads(r.data)["result"]["s"]] = None
        elif exchange == "bitget" and r.data.startswith(b'{"action"') and b'"channel":"books"' in r.data[:120]:
            out[json.loads(r.data)["arg"]["instId"]] = None
        elif exchange == "bithumb" and r.data.startswith(b'{"type":"orderbookdepth"'):
            for level in json.loads(r.data)["content"]["list"]:
                out[level["symbol"]] = None
    return list(out)


def assert_published_match(published: Sequence[Any], reference: Reference, *, one_to_one: bool = True,
                           status: str = "synced") -> int:
    """Every ``BookSnapshot`` with ``status`` equals the reference book with its seq; with
    ``one_to_one`` the published books are exactly the reference's from the first one on.
    Returns the number of books compared."""
    by_symbol: dict[str, list[Any]] = {}
    for msg in published:
        if type(msg).__name__ == "BookSnapshot" and msg.status == status:
            by_symbol.setdefault(msg.symbol, []).append(msg)
    compared = 0
    for symbol, snaps in by_symbol.items():
        entries = reference.books[symbol]
        if one_to_one:
            first = next(i for i, e in enumerate(entries)
                         if e == (snaps[0].seq, snaps[0].bids, snaps[0].asks))
            expected = entries[first:]
            got = [(s.seq, s.bids, s.asks) for s in snaps]
            assert len(got) == len(expected), f"{symbol}: {len(got)} books published, reference has {len(expected)}"
            for g, e in zip(got, expected, strict=True):
                assert g == e, f"{symbol} seq {g[0]}: published {g[1][:3]} {g[2][:3]}, reference {e[1][:3]} {e[2][:3]}"
        else:
            by_seq: dict[int, list[Entry]] = {}
            for e in [*entries, *reference.quiet.get(symbol, ())]:
                by_seq.setdefault(e[0], []).append(e)
            for s in snaps:
                candidates = by_seq.get(s.seq, [])
                assert candidates, f"{symbol}: seq {s.seq} is not in the reference"
                assert (s.seq, s.bids, s.asks) in candidates, f"{symbol} seq {s.seq}: book differs from the reference"
        compared += len(snaps)
    return compared
