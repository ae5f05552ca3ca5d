"""Where alerts go. A sink is anything with ``name``, ``send``, ``status`` and ``close``;
``SINKS`` maps the names allowed in ``alerter.sinks`` to their factories, so another
channel (e-mail, Slack, PagerDuty) is one class and one entry here.

A sink raises ``Retryable`` when the channel is down (the alert is retried in place,
without counting against it) and ``SinkError`` when the channel refused this alert (it
is retried, then dead-lettered). Neither may carry a URL: the Telegram bot token is in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import msgspec

from services.alerter.limits import RateLimiter
from services.alerter.metrics import RATE_LIMIT_WAIT
from shared.config import AlerterSettings, Secret, Secrets
from shared.models import Alert
from shared.runtime import Bus, Retryable

log = logging.getLogger(__name__)

TELEGRAM_MAX_CHARS = 4096
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}


class SinkError(Exception):
    """The channel refused this alert (bad request, unknown chat): not worth retrying in place."""


class Sink(Protocol):
    name: str

    async def send(self, alert: Alert) -> None: ...

    def status(self) -> tuple[str, str]:
        """(OK | WARN | DISABLED, detail) for /health and `arb health`."""
        ...

    async def close(self) -> None: ...


def format_alert(alert: Alert, session: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(alert.ts_ns / 1e9))
    lines = [f"[{alert.severity.upper()}] {alert.kind}", alert.message]
    if alert.labels:
        lines.append(" ".join(f"{k}={v}" for k, v in sorted(alert.labels.items())))
    lines.append(f"{alert.source} | session {session} | {when}")
    text = "\n".join(lines)
    return text if len(text) <= TELEGRAM_MAX_CHARS else text[:TELEGRAM_MAX_CHARS - 1] + "…"


class LogSink:
    """Every alert as a log record (critical ones at ERROR, so they reach `arb monitor --errors`)."""

    name = "log"

    async def send(self, alert: Alert) -> None:
        log.log(_LOG_LEVELS[alert.severity], "alert: %s", alert.message,
                extra={"alert_id": alert.alert_id, "kind": alert.kind, "severity": alert.severity,
                       "source": alert.source, **{f"label_{k}": v for k, v in alert.labels.items()}})

    def status(self) -> tuple[str, str]:
        return "OK", "alerts go to the service log"

    async def close(self) -> None:
        return None


class _TelegramReply(msgspec.Struct):
    ok: bool
    description: str = ""
    error_code: int = 0
    parameters: dict[str, Any] = {}


class TelegramSink:
    """``sendMessage`` of the Telegram Bot API, rate limited across replicas."""

    name = "telegram"
    MAX_429_WAITS = 3

    def __init__(self, settings: AlerterSettings, token: Secret, session: str, limiter: RateLimiter) -> None:
        self.settings = settings
        self._token = token
        self.session_name = session
        self.limiter = limiter
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.telegram_timeout_s))
        self.last_error = ""
        self.sent = 0

    def _endpoint(self) -> str:
        # Built per call and never stored or logged: the token is part of the path.
        return f"{self.settings.telegram_api_url.rstrip('/')}/bot{self._token.reveal()}/sendMessage"

    async def _wait_for_slot(self) -> None:
        while (wait := await self.limiter.acquire()) > 0:
            RATE_LIMIT_WAIT.labels(self.name).inc(wait)
            await asyncio.sleep(wait)

    async def send(self, alert: Alert) -> None:
        body = {"chat_id": self.settings.telegram_chat_id, "text": format_alert(alert, self.session_name),
                "disable_web_page_preview": True}
        for _ in range(self.MAX_429_WAITS + 1):
            await self._wait_for_slot()
            try:
                async with self._http.post(self._endpoint(), json=body) as resp:
                    status = resp.status
                    raw = await resp.read()
            except Exception as exc:  # the exception text may hold the URL, hence the token
                self.last_error = f"unreachable ({type(exc).__name__})"
                raise Retryable(f"telegram {self.last_error}") from None
            try:
                reply = msgspec.json.decode(raw, type=_TelegramReply)
            except msgspec.DecodeError:
                reply = _TelegramReply(ok=False, description=f"non-JSON answer ({len(raw)} bytes)")
            if status == 200 and reply.ok:
                self.last_error = ""
                self.sent += 1
                return
            if status == 429:  # no slot, for any replica, before Telegram's retry_after
                await self.limiter.hold_off(float(reply.parameters.get("retry_after", 1)))
                continue
            self.last_error = f"HTTP {status}: {reply.description[:200]}"
            if status >= 500:
                raise Retryable(f"telegram {self.last_error}")
            raise SinkError(f"telegram refused the alert: {self.last_error}")
        self.last_error = "rate limited by Telegram (429) repeatedly"
        raise Retryable(f"telegram {self.last_error}")

    def status(self) -> tuple[str, str]:
        if self.last_error:
            return "WARN", f"last send failed: {self.last_error}"
        return "OK", f"chat {self.settings.telegram_chat_id}, {self.sent} sent"

    async def close(self) -> None:
        await self._http.close()


class DisabledSink:
    """A configured sink that cannot run (missing token or chat id): says why, sends nothing."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    async def send(self, alert: Alert) -> None:
        return None

    def status(self) -> tuple[str, str]:
        return "DISABLED", self.reason

    async def close(self) -> None:
        return None


SinkFactory = Callable[[AlerterSettings, Secrets, Bus, str], Sink]


def _log_sink(settings: AlerterSettings, secrets: Secrets, bus: Bus, session: str) -> Sink:
    return LogSink()


def _telegram_sink(settings: AlerterSettings, secrets: Secrets, bus: Bus, session: str) -> Sink:
    token = secrets.get("TELEGRAM_BOT_TOKEN")
    if token is None:
        return DisabledSink("telegram", "TELEGRAM_BOT_TOKEN is not set")
    if not settings.telegram_chat_id:
        return DisabledSink("telegram", "alerter.telegram_chat_id is not set")
    limiter = RateLimiter(bus, "telegram", settings.rate_per_minute, settings.rate_burst)
    return TelegramSink(settings, token, session, limiter)


SINKS: dict[str, SinkFactory] = {"log": _log_sink, "telegram": _telegram_sink}


def build_sinks(settings: AlerterSettings, secrets: Secrets, bus: Bus, session: str) -> list[Sink]:
    unknown = [name for name in settings.sinks if name not in SINKS]
    if unknown:
        raise ValueError(f"alerter.sinks: unknown sink {', '.join(unknown)} (known: {', '.join(SINKS)})")
    return [SINKS[name](settings, secrets, bus, session) for name in settings.sinks]
