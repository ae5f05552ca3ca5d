"""Recorded exchange traffic: the capture layouts we read and the one we write.

A capture is a sequence of ``Record``s in receive order. Three layouts are read, detected
line by line, so files can be mixed and concatenated:

- **frame lines** (what ``arb record`` writes, and hftbacktest's collector layout):
  ``<recv_ns> <frame>``; gzip or plain text. A REST response recorded by ``arb record``
  is one such line whose frame is ``{"rest":"<url>","body":<body>}``; hftbacktest writes a
  REST body bare, so a frame may also be a REST body without its URL (the exchange module
  recognises it).
- **cryptofeed** ``raw_data_collection`` lines: ``<https url> -> <ts>: <body>`` (REST),
  ``<wss url> <-> <ts>`` (connection opened), ``<wss url> <- <ts>: <payload>`` (sent by
  the client), ``<ts>: <payload>`` (received; binary frames as a Python bytes literal),
  ``configuration: {...}`` (skipped). ``<ts>`` is seconds.
- **ndjson**: one frame per line with no receive time (e.g. Bybit's historical order-book
  downloads); records get ``recv_ns`` 0.

Frames are kept as bytes exactly as received, so checksums over original strings survive.
"""

from __future__ import annotations

import ast
import gzip
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Literal

RecordKind = Literal["ws", "rest", "open", "sent"]

REST_ENVELOPE = b'{"rest":'


@dataclass(frozen=True, slots=True)
class Record:
    """One recorded event: a received frame, a REST response, a connection opening or a sent message."""

    recv_ns: int
    kind: RecordKind
    data: bytes
    url: str = ""


class CaptureError(ValueError):
    """A line that fits none of the capture layouts."""


_NS_LINE = re.compile(rb"^(\d+) (.*)$", re.DOTALL)
_TS_LINE = re.compile(rb"^(\d{9,11}(?:\.\d+)?): (.*)$", re.DOTALL)
_URL_LINE = re.compile(rb"^((?:https?|wss?)://\S+) (->|<-|<->) (\d{9,11}(?:\.\d+)?)(?:: (.*))?$", re.DOTALL)


def _seconds_to_ns(text: bytes) -> int:
    # Decimal keeps the recorded digits exact (float would shift the last microseconds).
    return int(Decimal(text.decode()) * 1_000_000_000)


def _payload(raw: bytes) -> bytes:
    """cryptofeed writes binary frames as a Python bytes literal: ``b'...'``."""
    if raw[:2] in (b"b'", b'b"'):
        value = ast.literal_eval(raw.decode())
        if isinstance(value, bytes):
            return value
    return raw


def parse_line(line: bytes) -> Record | None:
    """One line of any supported layout; ``None`` for lines that carry no traffic."""
    line = line.rstrip(b"\r\n")
    if not line.strip() or line.startswith(b"configuration:"):
        return None
    m = _NS_LINE.match(line)
    if m:
        recv_ns, frame = int(m.group(1)), m.group(2)
        if frame.startswith(REST_ENVELOPE):
            url, body = split_rest_envelope(frame)
            return Record(recv_ns, "rest", body, url)
        return Record(recv_ns, "ws", frame)
    m = _URL_LINE.match(line)
    if m:
        url, arrow, ts, body = m.group(1).decode(), m.group(2), m.group(3), m.group(4) or b""
        if arrow == b"->":
            return Record(_seconds_to_ns(ts), "rest", body, url)
        if arrow == b"<->":
            return Record(_seconds_to_ns(ts), "open", b"", url)
        return Record(_seconds_to_ns(ts), "sent", body, url)
    m = _TS_LINE.match(line)
    if m:
        return Record(_seconds_to_ns(m.group(1)), "ws", _payload(m.group(2)))
    if line.startswith((b"{", b"[")):
        return Record(0, "ws", line)
    raise CaptureError(f"unrecognised capture line: {line[:80]!r}")


def rest_envelope(url: str, body: bytes) -> bytes:
    """How ``arb record`` stores a REST response: the body is embedded verbatim."""
    return b'{"rest":"' + url.replace('"', "%22").encode() + b'","body":' + body + b"}"


def split_rest_envelope(frame: bytes) -> tuple[str, bytes]:
    start = len(REST_ENVELOPE) + 1
    end = frame.index(b'"', start)
    marker = b',"body":'
    if frame[end + 1:end + 1 + len(marker)] != marker or not frame.endswith(b"}"):
        raise CaptureError(f"malformed REST envelope: {frame[:80]!r}")
    return frame[start:end].decode(), frame[end + 1 + len(marker):-1]


def _open(path: Path) -> IO[bytes] | gzip.GzipFile:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_capture(path: str | Path) -> Iterator[Record]:
    """Records of one capture file in file order (gzip detected by content, not name)."""
    with _open(Path(path)) as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                record = parse_line(line)
            except (CaptureError, ValueError, SyntaxError) as exc:
                raise CaptureError(f"{path}:{lineno}: {exc}") from None
            if record is not None:
                yield record


def read_captures(paths: Iterable[str | Path]) -> list[Record]:
    """Several captures merged by receive time (stable: file order breaks ties).

    cryptofeed records REST snapshots in a separate file from the WebSocket frames they
    belong with; merging by receive time puts each snapshot where the client received it.
    """
    records: list[tuple[int, int, int, Record]] = []
    for file_no, path in enumerate(paths):
        for i, record in enumerate(read_capture(path)):
            records.append((record.recv_ns, file_no, i, record))
    if len({file_no for _, file_no, _, _ in records}) > 1:
        records.sort(key=lambda t: (t[0], t[1], t[2]))
    return [r for *_, r in records]


class CaptureWriter:
    """Writes ``<recv_ns> <frame>`` lines, gzip-compressed, flushing whole lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6)
        self.lines = 0

    def frame(self, recv_ns: int, frame: bytes | str) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        # One frame per line: a raw newline inside a frame would split it; JSON never has one.
        self._gz.write(b"%d %s\n" % (recv_ns, data.replace(b"\n", b" ")))
        self.lines += 1

    def rest(self, recv_ns: int, url: str, body: bytes) -> None:
        self.frame(recv_ns, rest_envelope(url, body.replace(b"\n", b" ")))

    def flush(self) -> None:
        self._gz.flush()

    def close(self) -> None:
        self._gz.close()
        self._raw.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
