"""JSON-lines logging on stdout, tagged with service and session, with secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

# Credentials that may sit inside a URL, header or query string even when we do not know
# the secret's value (e.g. an exchange echoing a request).
_PATTERNS = [
    (re.compile(r"(?i)(signature=)[^&\s\"']+"), r"\1***"),
    (re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"(?i)((?:x-mbx-apikey|ok-access-key|ok-access-sign|ok-access-passphrase|x-bapi-api-key|"
                r"x-bapi-sign|kc-api-key|kc-api-sign|kc-api-passphrase|access-key|access-sign|"
                r"access-passphrase|api[_-]?key|api[_-]?secret|passphrase)[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,}]+"),
     r"\1***"),
    (re.compile(r"(bot)\d+:[A-Za-z0-9_-]{20,}"), r"\1***"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+(@)"), r"\1***\2"),
]


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, session: str, redactor: Redactor) -> None:
        super().__init__()
        self.service = service
        self.session = session
        self.redactor = redactor
        self._encoder = msgspec.json.Encoder()
        self._key = (service, session, id(redactor))

    def format(self, record: logging.LogRecord) -> str:
        # Redaction is most of the cost: a record shipped to more than one place (stdout and
        # PostgreSQL) is formatted once per formatter setup, not once per handler.
        cached = record.__dict__.get("_json_line")
        if cached is not None and cached[0] == self._key:
            return str(cached[1])
        text = self._format(record)
        record.__dict__["_json_line"] = (self._key, text)
        return text

    def _format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "session": self.session,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return self.redactor(self._encoder.encode(doc).decode())


def setup_logging(service: str, session: str, level: str = "INFO", secrets: Iterable[str] = ()) -> Redactor:
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service, session, redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("asyncio", "aiohttp.access", "websockets"):
        logging.getLogger(noisy).setLevel("WARNING")
    return redactor
