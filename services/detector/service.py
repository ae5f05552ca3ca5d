"""The detector service shell."""

from __future__ import annotations

from shared.service import Service


class DetectorService(Service):
    name = "detector"
