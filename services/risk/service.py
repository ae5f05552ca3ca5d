"""The risk service shell."""

from __future__ import annotations

from shared.service import Service


class RiskService(Service):
    name = "risk"
