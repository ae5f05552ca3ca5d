"""The rebalancer service shell."""

from __future__ import annotations

from shared.service import Service


class RebalancerService(Service):
    name = "rebalancer"
