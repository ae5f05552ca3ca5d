"""A ClickHouse HTTP interface in front of chDB, for the tests of the ``http://`` DSN path.

There is no ClickHouse server on our machines (no registry package ships one, Debian's is
too old, there is no Docker engine), so the tests run ClickHouse itself -- chDB, the
embedded build of the same engine -- behind the HTTP protocol a ClickHouse server speaks:
``query`` / ``database`` / ``default_format`` / ``param_*`` URL parameters, the statement
in the URL or the body, insert data in the body (compressed per ``Content-Encoding``), and
``X-ClickHouse-*`` headers on the answer (an exception as HTTP 500 with its code). That is
enough for clickhouse-connect's HTTP client to work unmodified, so the collector's
``http://`` code path is exercised for real.

Run as a process: ``python tests/clickhouse_http.py <chdb dir>`` prints the port it serves.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import tempfile
import threading
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
TRAILING_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
ERROR_CODE = re.compile(r"Code: (\d+)")


def decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower()
    if not encoding or encoding == "identity":
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame

        return bytes(lz4.frame.decompress(body))
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding}")


class Engine:
    """One chDB session; queries run one at a time (chDB is one engine per process)."""

    def __init__(self, path: str) -> None:
        from chdb import session

        self.session = session.Session(path)
        self.lock = threading.Lock()

    def run(self, sql: str, fmt: str, params: dict[str, str]) -> bytes:
        with self.lock:
            result: Any = self.session.query(sql, fmt, params=params) if params else self.session.query(sql, fmt)
        data = result.bytes() if hasattr(result, "bytes") else bytes(result)
        return data or b""


class Handler(BaseHTTPRequestHandler):
    engine: Engine
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        body = self._body()
        if url.path == "/ping":
            self._reply(200, b"Ok.\n", {})
            return
        try:
            body = decompress(body, self.headers.get("Content-Encoding", ""))
            data, fmt = self._execute(params, body)
        except Exception as exc:
            text = str(exc)
            code = ERROR_CODE.search(text)
            message = text if text.startswith("Code:") else f"Code: 1001. DB::Exception: {text}"
            self._reply(500, message.encode(), {"X-ClickHouse-Exception-Code": code.group(1) if code else "1001"})
            return
        self._reply(200, data, {"X-ClickHouse-Format": fmt})

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed inserts
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _execute(self, params: dict[str, str], body: bytes) -> tuple[bytes, str]:
        query = params.get("query", "")
        if not query and body[:6].upper() == b"INSERT":  # the statement leads the insert data
            statement, _, body = body.partition(b"\n")
            query = statement.decode()
        binds = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        if params.get("database") and params["database"] != "default":
            self.engine.run(f"USE {params['database']}", "TabSeparated", {})
        if query:
            insert = INSERT.match(query)
            if insert and body:
                with tempfile.NamedTemporaryFile(suffix=".data", delete=False) as tmp:
                    tmp.write(body)
                try:
                    sql = f"INSERT INTO {insert.group(1)} FROM INFILE '{tmp.name}' FORMAT {insert.group(2)}"
                    self.engine.run(sql, "TabSeparated", binds)
                finally:
                    os.unlink(tmp.name)
                return b"", "TabSeparated"
            sql = query + ("\n" + body.decode() if body else "")
        else:
            sql = body.decode()
        trailing = TRAILING_FORMAT.search(sql)
        fmt = trailing.group(1) if trailing else params.get("default_format", "TabSeparated")
        return self.engine.run(sql, fmt, binds), fmt

    def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-ClickHouse-Query-Id", str(uuid.uuid4()))
        self.send_header("X-ClickHouse-Timezone", "UTC")
        self.send_header("X-ClickHouse-Server-Display-Name", "chdb-http")
        self.send_header("X-ClickHouse-Summary", json.dumps({"read_rows": "0", "written_rows": "0"}))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    Handler.engine = Engine(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
