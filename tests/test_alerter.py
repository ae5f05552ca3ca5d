"""The alerter against a local HTTP server speaking Telegram's ``sendMessage``, and real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from services.alerter.limits import RateLimiter
from services.alerter.service import AlerterService
from services.alerter.sinks import TelegramSink
from shared.config import Secret, Secrets, load_config
from shared.models import Alert, encode
from shared.runtime import FIELD, Bus, Retryable
from shared.streams import KeySpace

TOKEN = "5123456789:AAFakeTokenValue-ForTests_0123456789abc"
CHAT = "-1001234567890"


class FakeTelegram:
    """The Bot API's ``POST /bot<token>/sendMessage``: records messages, can answer with errors."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.answers: list[tuple[int, dict[str, Any]]] = []
        """Scripted answers for the next requests, before normal service."""
        self.refuse: str | None = None
        """Text that makes the API answer 400 (like an unknown chat would)."""
        self.requests = 0
        self.request_times: list[float] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/bot{token}/sendMessage", self.send_message)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def send_message(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.request_times.append(time.monotonic())
        if request.match_info["token"] != TOKEN:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        body = await request.json()
        if self.answers:
            status, answer = self.answers.pop(0)
            return web.json_response(answer, status=status)
        if self.refuse and self.refuse in body["text"]:
            return web.json_response({"ok": False, "error_code": 400, "description": "Bad Request: chat not found"},
                                     status=400)
        self.received.append((time.monotonic(), body))
        return web.json_response({"ok": True, "result": {"message_id": len(self.received), "text": body["text"]}})

    def texts(self) -> list[str]:
        return [body["text"] for _, body in self.received]


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.stop()


def alert(kind: str, alert_id: str, severity: str = "warning", **labels: str) -> Alert:
    return Alert(alert_id=alert_id, severity=severity, source="risk", kind=kind,  # type: ignore[arg-type]
                 message=f"{kind} happened", ts_ns=time.time_ns(), labels=labels)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def alerter_env(service_env: dict[str, str], telegram: FakeTelegram, **extra: str) -> dict[str, str]:
    return {**service_env, "TELEGRAM_BOT_TOKEN": TOKEN, "ARB_ALERTER__TELEGRAM_CHAT_ID": CHAT,
            "ARB_ALERTER__TELEGRAM_API_URL": telegram.url, "ARB_OPS__LOG_TO_POSTGRES": "false", **extra}


# ----------------------------------------------------------------------------- acceptance


@pytest.mark.slow
async def test_alerts_reach_telegram_once_each_within_the_rate_limit_and_the_token_never_leaks(
        service_env: dict[str, str], telegram: FakeTelegram, redis_url: str) -> None:
    per_minute, burst = 120, 2  # two at once, then one every 0.5 s
    env = alerter_env(service_env, telegram,
                      ARB_ALERTER__RATE_PER_MINUTE=str(per_minute), ARB_ALERTER__RATE_BURST=str(burst),
                      ARB_REDIS__CLAIM_IDLE_MS="1500", ARB_REDIS__CLAIM_INTERVAL_MS="300",
                      ARB_REDIS__MAX_DELIVERIES="2")
    # Telegram first fails (500), then asks us to slow down (429), then works.
    telegram.answers = [(500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}),
                        (429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                               "parameters": {"retry_after": 1}})]
    telegram.refuse = "refused_kind"
    prefix = env["ARB_REDIS__STREAM_PREFIX"]
    client = aioredis.Redis.from_url(redis_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.alerter", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        kinds = [f"kind{i}" for i in range(6)]
        # every alert three times (a chatty source, a replayed stream), interleaved
        for copy in range(3):
            for kind in kinds:
                await client.xadd(prefix + "alerts", {FIELD: encode(alert(kind, f"{kind}-{copy}", pair=kind))})
        await client.xadd(prefix + "alerts", {FIELD: encode(alert("refused_kind", "r-0"))})
        await wait_for(lambda: len(telegram.received) >= len(kinds), 30, "six messages")
        dlq: Any = []
        deadline = time.monotonic() + 20
        while not dlq and time.monotonic() < deadline:
            dlq = await client.xrange(prefix + "dlq.alerts")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # anything still coming would be a duplicate
        async with aiohttp.ClientSession() as http:
            beats = await client.hgetall(KeySpace("development", env["ARB_SESSION"]).heartbeats())
            port = next(iter(beats.values())).decode().split('"http_port":')[1].split(",")[0]
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics_text = await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                health_text = await resp.text()
    finally:
        proc.terminate()
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        await client.aclose()
    logs = output.decode()

    texts = telegram.texts()
    assert len(texts) == len(kinds), texts
    assert sorted(t.splitlines()[0] for t in texts) == sorted(f"[WARNING] {k}" for k in kinds)
    assert all(body["chat_id"] == CHAT for _, body in telegram.received)

    # rate limit: in any stretch of time, at most `burst` + elapsed / interval messages
    interval = 60 / per_minute
    times = [t for t, _ in telegram.received]
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            # 0.2 s for the HTTP leg after the slot was taken (a loaded machine)
            assert j - i + 1 <= burst + (times[j] - times[i] + 0.2) / interval, (i, j, times)

    # after the 429 (second request) nothing was sent before its retry_after of 1 s
    assert telegram.request_times[2] - telegram.request_times[1] >= 0.95

    # the refused alert went to the dead-letter stream with Telegram's reason, after its deliveries
    assert len(dlq) == 1 and b"chat not found" in dlq[0][1][b"error"]

    # error paths ran and were logged, and nowhere is the token
    assert "HTTP 500" in logs and "chat not found" in logs, logs
    for text in (logs, metrics_text, health_text, repr(dlq)):
        assert TOKEN not in text and TOKEN.split(":")[1] not in text
    assert 'arb_alerts_sent_total{sink="telegram"} 6.0' in metrics_text
    assert 'arb_alerts_suppressed_total{reason="duplicate",sink="telegram"} 12.0' in metrics_text


# ----------------------------------------------------------------------------- in process


@contextlib.asynccontextmanager
async def running(*services: AlerterService) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.main()) for s in services]
    try:
        await wait_for(lambda: all(s.consumers and s.http and s.http.port for s in services), 10, "start")
        yield
    finally:
        for s in services:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)


def make_alerter(env: dict[str, str], name: str) -> AlerterService:
    cfg = load_config(environ=env)
    return AlerterService(cfg, Secrets({"TELEGRAM_BOT_TOKEN": TOKEN}), instance=name)


async def test_two_alerter_replicas_send_each_alert_once(
        service_env: dict[str, str], telegram: FakeTelegram) -> None:
    env = alerter_env(service_env, telegram, ARB_ALERTER__RATE_PER_MINUTE="6000", ARB_ALERTER__RATE_BURST="50")
    a, b = make_alerter(env, "alerter-a"), make_alerter(env, "alerter-b")
    async with running(a, b):
        for copy in range(4):
            a.producer.publish_many("alerts", [alert(f"k{i}", f"k{i}-{copy}", exchange="binance") for i in range(5)])
        await a.producer.flush()
        await wait_for(lambda: len(telegram.received) >= 5, 15, "five messages")
        await asyncio.sleep(1.0)
        handled = {c.name: c.handled for s in (a, b) for c in s.consumers}
    assert sorted(t.splitlines()[0] for t in telegram.texts()) == [f"[WARNING] k{i}" for i in range(5)]
    assert sum(handled.values()) == 20


async def test_the_same_kind_with_other_labels_or_a_higher_severity_is_not_a_duplicate(
        service_env: dict[str, str], telegram: FakeTelegram) -> None:
    env = alerter_env(service_env, telegram, ARB_ALERTER__RATE_PER_MINUTE="6000", ARB_ALERTER__RATE_BURST="50")
    svc = make_alerter(env, "alerter-a")
    async with running(svc):
        svc.producer.publish_many("alerts", [
            alert("book_stale", "1", exchange="upbit"),
            alert("book_stale", "2", exchange="upbit"),  # duplicate
            alert("book_stale", "3", exchange="binance"),
            alert("book_stale", "4", "critical", exchange="upbit"),
        ])
        await svc.producer.flush()
        await wait_for(lambda: len(telegram.received) >= 3, 10, "three messages")
        await asyncio.sleep(0.5)
    firsts = [t.splitlines() for t in telegram.texts()]
    assert [(f[0], f[2]) for f in firsts] == [("[WARNING] book_stale", "exchange=upbit"),
                                              ("[WARNING] book_stale", "exchange=binance"),
                                              ("[CRITICAL] book_stale", "exchange=upbit")]


async def test_alerts_below_the_minimum_severity_are_not_sent(
        service_env: dict[str, str], telegram: FakeTelegram) -> None:
    env = alerter_env(service_env, telegram, ARB_ALERTER__MIN_SEVERITY="warning")
    svc = make_alerter(env, "alerter-a")
    async with running(svc):
        svc.producer.publish_many("alerts", [alert("info_kind", "1", "info"), alert("warn_kind", "2", "warning")])
        await svc.producer.flush()
        await wait_for(lambda: len(telegram.received) >= 1, 10, "one message")
        await wait_for(lambda: svc.consumers[0].handled >= 2, 10, "both handled")
    assert [t.splitlines()[0] for t in telegram.texts()] == ["[WARNING] warn_kind"]


async def test_prometheus_alerts_arrive_through_the_alertmanager_webhook(
        service_env: dict[str, str], telegram: FakeTelegram) -> None:
    env = alerter_env(service_env, telegram)
    svc = make_alerter(env, "alerter-a")
    firing = {"version": "4", "status": "firing", "receiver": "alerter", "alerts": [{
        "status": "firing", "fingerprint": "abc123", "startsAt": "2024-05-01T10:00:00Z",
        "labels": {"alertname": "ServiceDown", "severity": "critical", "service": "risk", "job": "arb"},
        "annotations": {"summary": "risk replica 10.0.0.5:9103 is down"}}]}
    resolved = {**firing, "status": "resolved", "alerts": [{**firing["alerts"][0], "status": "resolved"}]}
    async with running(svc), aiohttp.ClientSession() as http:
        assert svc.http is not None
        url = f"http://127.0.0.1:{svc.http.port}/alertmanager"
        for payload in (firing, firing, resolved):  # Alertmanager repeats itself too
            async with http.post(url, json=payload) as resp:
                assert resp.status == 200 and (await resp.json()) == {"accepted": 1}
        async with http.post(url, data=b"not json") as resp:
            assert resp.status == 400
        await wait_for(lambda: len(telegram.received) >= 2, 10, "two messages")
        await asyncio.sleep(0.5)
    texts = telegram.texts()
    assert len(texts) == 2, texts
    assert texts[0].splitlines()[:3] == ["[CRITICAL] ServiceDown", "risk replica 10.0.0.5:9103 is down",
                                         "job=arb service=risk"]
    assert texts[1].splitlines()[:2] == ["[INFO] ServiceDown", "resolved: risk replica 10.0.0.5:9103 is down"]


async def test_unreachable_telegram_is_retryable_and_its_error_carries_no_token(bus: Bus) -> None:
    from shared.config import AlerterSettings
    from shared.embedded import free_port

    settings = AlerterSettings(telegram_chat_id=CHAT, telegram_api_url=f"http://127.0.0.1:{free_port()}",
                               telegram_timeout_s=2)
    sink = TelegramSink(settings, Secret(TOKEN), "s1", RateLimiter(bus, "telegram", 60, 5))
    try:
        with pytest.raises(Retryable) as err:
            await sink.send(alert("k", "1"))
    finally:
        await sink.close()
    assert "unreachable" in str(err.value) and TOKEN not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert sink.status()[0] == "WARN"


async def test_rate_limiter_allows_a_burst_then_one_per_interval(bus: Bus) -> None:
    limiter = RateLimiter(bus, "probe", per_minute=120, burst=3)  # 0.5 s apart after 3
    waits = [await limiter.acquire() for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and 0.2 < waits[3] <= 0.5
    await asyncio.sleep(waits[3])
    assert await limiter.acquire() == 0.0
    await limiter.hold_off(1.0)
    assert await limiter.acquire() > 0.8


async def test_an_unknown_sink_stops_the_alerter_with_a_config_error(
        service_env: dict[str, str], tmp_path: Path) -> None:
    env = {**service_env, "ARB_ALERTER__SINKS": '["log", "pager"]', "ARB_OPS__LOG_TO_POSTGRES": "false"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.alerter", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "alerter.sinks unknown sink pager (known: log, telegram)" in err.decode()
