"""The collector service shell."""

from __future__ import annotations

from shared.service import Service


class CollectorService(Service):
    name = "collector"
