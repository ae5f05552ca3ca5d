"""The alerter: reads the ``alerts`` stream and hands each alert to every configured sink,
once per de-duplication window and within each sink's rate limit.

It also takes Alertmanager's webhook (``POST /alertmanager``) and publishes those alerts to
the same stream, so Prometheus alert rules reach Telegram through the same de-duplication,
rate limit and token handling as the services' own alerts.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
from aiohttp import web

from services.alerter.limits import Deduplicator, fingerprint
from services.alerter.metrics import ALERTS_RECEIVED, ALERTS_SENT, ALERTS_SUPPRESSED, RATE_LIMIT_WAIT, SEND_ERRORS
from services.alerter.sinks import Sink, build_sinks
from shared.config import ConfigError
from shared.http import Route
from shared.models import Alert, decoder_for
from shared.runtime import Delivery
from shared.service import Service
from shared.streams import ALERTS, Group

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class AlertmanagerAlert(msgspec.Struct):
    status: str
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: str = msgspec.field(default="", name="startsAt")
    fingerprint: str = ""


class AlertmanagerWebhook(msgspec.Struct):
    alerts: list[AlertmanagerAlert]


def from_alertmanager(payload: AlertmanagerWebhook, now_ns: int) -> list[Alert]:
    """Alertmanager's webhook body -> our alerts (a resolution is its own, informational alert)."""
    out = []
    for a in payload.alerts:
        labels = {k: v for k, v in a.labels.items() if k not in ("alertname", "severity")}
        text = a.annotations.get("summary") or a.annotations.get("description") or a.labels.get("alertname", "")
        severity = a.labels.get("severity", "warning")
        if a.status == "resolved":
            severity, text, labels = "info", f"resolved: {text}", {**labels, "status": "resolved"}
        out.append(Alert(
            alert_id=f"prometheus:{a.fingerprint}:{a.status}:{a.starts_at}",
            severity=severity if severity in SEVERITY_RANK else "warning",  # type: ignore[arg-type]
            source="prometheus",
            kind=a.labels.get("alertname", "prometheus"),
            message=text,
            ts_ns=now_ns,
            labels=labels,
        ))
    return out


class AlerterService(Service):
    name = "alerter"

    async def setup(self) -> None:
        settings = self.cfg.alerter
        try:
            self.sinks: list[Sink] = build_sinks(settings, self.secrets, self.bus, self.cfg.session)
        except ValueError as exc:
            raise ConfigError("alerter.sinks", str(exc).partition(": ")[2], show_value=False) from None
        self.dedupe = Deduplicator(self.bus, settings.dedupe_window_s)
        self.min_rank = SEVERITY_RANK[settings.min_severity]
        for severity in SEVERITY_RANK:  # every series present from the start
            ALERTS_RECEIVED.labels(severity)
        for sink in self.sinks:
            ALERTS_SENT.labels(sink.name)
            SEND_ERRORS.labels(sink.name)
            RATE_LIMIT_WAIT.labels(sink.name)
            for reason in ("duplicate", "severity"):
                ALERTS_SUPPRESSED.labels(sink.name, reason)
        # Small batches: a rate-limited sink holds its batch, and stop() waits for it.
        self.consumer(Group.ALERTER, [ALERTS], self.handle, decoder=decoder_for(Alert).decode, batch_size=8)

    async def teardown(self) -> None:
        for sink in getattr(self, "sinks", []):
            await sink.close()

    async def handle(self, delivery: Delivery) -> None:
        alert: Alert = delivery.message
        ALERTS_RECEIVED.labels(alert.severity).inc()
        fp = fingerprint(alert)
        for sink in self.sinks:
            if sink.status()[0] == "DISABLED":
                continue
            if SEVERITY_RANK[alert.severity] < self.min_rank:
                ALERTS_SUPPRESSED.labels(sink.name, "severity").inc()
                continue
            if not await self.dedupe.reserve(sink.name, fp):
                ALERTS_SUPPRESSED.labels(sink.name, "duplicate").inc()
                continue
            try:
                await sink.send(alert)
            except BaseException:
                SEND_ERRORS.labels(sink.name).inc()
                with contextlib.suppress(Exception):
                    await self.dedupe.release(sink.name, fp)
                raise
            await self.dedupe.confirm(sink.name, fp)
            ALERTS_SENT.labels(sink.name).inc()

    async def extra_health(self) -> dict[str, Any]:
        checks = []
        for sink in getattr(self, "sinks", []):
            status, detail = sink.status()
            checks.append({"name": f"sink {sink.name}", "status": status, "detail": detail})
        return {"checks": checks}

    def http_routes(self) -> list[Route]:
        return [("POST", "/alertmanager", self._alertmanager)]

    async def _alertmanager(self, request: web.Request) -> web.Response:
        try:
            payload = msgspec.json.decode(await request.read(), type=AlertmanagerWebhook)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        alerts = from_alertmanager(payload, time.time_ns())
        self.producer.publish_many(ALERTS, alerts)
        await self.producer.flush()
        return web.json_response({"accepted": len(alerts)})
