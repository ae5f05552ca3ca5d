"""`arb detect --books FILE`: run the detector cores offline over dumped books.

The input is what ``arb replay --dump-books`` writes, one JSON object per line:

- a book change: ``{"exchange", "symbol", "seq", "status": "synced"|"stale", "bids": [[price, size], ...],
  "asks": [...]}``, best level first, unified ``BASE/QUOTE`` symbols;
- an FX rate: ``{"pair": "USDT/KRW", "rate": 1380.5}`` (optional ``bid``, ``ask``).

Either may carry ``ts_ns``; without it a line happens ``--line-ms`` after the previous one
(line order is time), which is what book and FX ages are measured against. FX comes from
FX lines, from the mid of any ``USDT/KRW`` book in the file, and from ``--fx PAIR=RATE``,
which counts as fresh on every line until the file gives a rate for that pair.

Signals go to stdout as JSON lines, exactly as the service would publish them; a summary
and every skipped line (with its number and reason) go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import msgspec

from services.detector.common import DetectorCore, InvalidInput
from services.detector.cores import build_cores
from shared.config import ConfigError, load_config
from shared.models import BookSnapshot, BookState, FxRate, Instrument, Level, Signal, encode

_FX_BOOK = "USDT/KRW"
"""A KRW book of USDT is the stablecoin-implied USD/KRW rate (see docs/exchanges.md)."""


class DumpBook(msgspec.Struct, kw_only=True):
    exchange: str
    symbol: str
    bids: list[Level]
    asks: list[Level]
    seq: int = 0
    status: BookState = "synced"
    ts_ns: int | None = None


class DumpFx(msgspec.Struct, kw_only=True):
    pair: str
    rate: float
    bid: float | None = None
    ask: float | None = None
    ts_ns: int | None = None


class OfflineRun:
    """Feeds dumped lines to the cores with line-order (or ``ts_ns``) time; collects signals."""

    def __init__(self, cores: dict[str, DetectorCore], *, fixed_fx: dict[str, float], line_ns: int) -> None:
        self.cores = cores
        self.fixed_fx = dict(fixed_fx)
        self.line_ns = line_ns
        self.now_ns = 0
        self.stats: Counter[str] = Counter()
        self.skipped: list[tuple[int, str]] = []

    def run(self, lines: Iterable[str]) -> Iterator[Signal]:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield from self._line(number, line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._skip(number, f"malformed: {exc}")
            except InvalidInput as exc:
                self._skip(number, f"unusable: {exc}")

    def _skip(self, number: int, reason: str) -> None:
        self.stats["skipped"] += 1
        self.skipped.append((number, reason))

    def _line(self, number: int, line: str) -> Iterator[Signal]:
        raw = msgspec.json.decode(line)
        if not isinstance(raw, dict):
            raise msgspec.ValidationError("expected a JSON object")
        if "pair" in raw:
            fx = msgspec.convert(raw, DumpFx)
            self._advance(fx.ts_ns)
            self.fixed_fx.pop(fx.pair, None)  # the file's own rates replace the command line's
            self._fx(FxRate(pair=fx.pair, rate=fx.rate, bid=fx.bid, ask=fx.ask, source="file",
                            ts_source_ns=self.now_ns, ts_pub_ns=self.now_ns))
            self.stats["fx"] += 1
            return
        if "exchange" not in raw:
            raise msgspec.ValidationError("neither a book (exchange, symbol, bids, asks) nor an FX rate (pair, rate)")
        dump = msgspec.convert(raw, DumpBook)
        self._advance(dump.ts_ns)
        for pair, rate in self.fixed_fx.items():
            self._fx(FxRate(pair=pair, rate=rate, source="command line", ts_source_ns=self.now_ns))
        book = BookSnapshot(exchange=dump.exchange, symbol=dump.symbol, seq=dump.seq or number, bids=dump.bids,
                            asks=dump.asks, status=dump.status, ts_exchange_ns=self.now_ns,
                            ts_recv_ns=self.now_ns, ts_pub_ns=self.now_ns)
        if book.symbol == _FX_BOOK and book.status == "synced" and book.bids and book.asks:
            self.fixed_fx.pop(_FX_BOOK, None)
            mid = (book.bids[0][0] + book.asks[0][0]) / 2
            self._fx(FxRate(pair=_FX_BOOK, rate=mid, source=f"{book.exchange} book", ts_source_ns=self.now_ns))
        self.stats["books"] += 1
        for strategy, core in self.cores.items():
            signals = core.on_book(book, self.now_ns)
            self.stats[f"signals.{strategy}"] += len(signals)
            yield from signals

    def _advance(self, ts_ns: int | None) -> None:
        self.now_ns = ts_ns if ts_ns is not None else self.now_ns + self.line_ns

    def _fx(self, rate: FxRate) -> None:
        for core in self.cores.values():
            core.on_fx(rate, self.now_ns)


def _parse_fx(values: list[str]) -> dict[str, float]:
    out = {}
    for value in values:
        pair, sep, rate = value.partition("=")
        base, slash, quote = pair.partition("/")
        try:
            number = float(rate)
        except ValueError:
            number = 0.0
        if not sep or not slash or not base or not quote or not number > 0:
            raise ValueError(f"--fx {value!r}: expected PAIR=RATE with a positive rate, e.g. USDT/KRW=1380")
        out[pair.upper()] = number
    return out


def _read_instruments(path: str) -> list[Instrument]:
    decoder = msgspec.json.Decoder(Instrument)
    return [decoder.decode(line) for line in Path(path).read_text().splitlines() if line.strip()]


def cmd_detect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb detect", description="Run the detectors offline over dumped books.")
    parser.add_argument("--books", required=True, help="JSON lines of book changes (and FX rates); '-' for stdin")
    parser.add_argument("--fx", action="append", default=[], metavar="PAIR=RATE",
                        help="an FX rate, e.g. USDT/KRW=1380 (repeatable)")
    parser.add_argument("--strategies", help="comma-separated, default: detector.strategies from the config")
    parser.add_argument("--line-ms", type=float, default=1.0,
                        help="time between lines without ts_ns, for book and FX ages (default 1 ms)")
    parser.add_argument("--instruments", help="JSON lines of instruments (tick, lot, fees); default: config fees")
    parser.add_argument("--config", help="TOML config file (default: $ARB_CONFIG or ./arb.toml)")
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if args.strategies:
            overrides["detector"] = {"strategies": [s.strip() for s in args.strategies.split(",") if s.strip()]}
        cfg = load_config(args.config, overrides=overrides or None)
        fixed_fx = _parse_fx(args.fx)
        instruments = _read_instruments(args.instruments) if args.instruments else []
    except (ConfigError, ValueError, OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        print(f"arb detect: {exc}", file=sys.stderr)
        return 2
    if args.line_ms < 0:
        print("arb detect: --line-ms must be >= 0", file=sys.stderr)
        return 2
    run = OfflineRun(build_cores(cfg, instruments), fixed_fx=fixed_fx, line_ns=int(args.line_ms * 1_000_000))
    try:
        source: TextIO = sys.stdin if args.books == "-" else open(args.books)  # noqa: SIM115
    except OSError as exc:
        print(f"arb detect: {args.books}: {exc.strerror}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    with source:
        for signal in run.run(source):
            out.write(encode(signal) + b"\n")
    out.flush()
    for number, reason in run.skipped[:50]:
        print(f"arb detect: line {number} skipped: {reason}", file=sys.stderr)
    if len(run.skipped) > 50:
        print(f"arb detect: ... and {len(run.skipped) - 50} more skipped lines", file=sys.stderr)
    print(f"arb detect: {dict(sorted(run.stats.items()))}", file=sys.stderr)
    return 0
