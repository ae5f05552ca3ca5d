"""The executor service shell."""

from __future__ import annotations

from shared.service import Service


class ExecutorService(Service):
    name = "executor"
