"""A local exchange simulator: recorded traffic served on 127.0.0.1 in each exchange's own
protocol (WebSocket subscribe/ping rules, REST snapshots, signed order endpoints), with
injectable faults. Used by the tests and by anyone who wants to run offline.

``simulator("binance", ["capture.gz"])`` builds one; ``await sim.start()`` serves it on a free
port (``sim.ws_url``, ``sim.rest_url``). ``shared/simulator/server.py`` has the generic
machinery, ``shared/simulator/venues/<exchange>.py`` each exchange's protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.simulator.server import Faults, Simulator


def simulator(exchange: str, captures: Iterable[str | Path], **options: Any) -> Simulator:
    """A simulator of ``exchange`` playing the given capture files (merged by receive time)."""
    from shared.capture import read_captures
    from shared.simulator.venues import sim_venue_class

    return Simulator(sim_venue_class(exchange)(read_captures(captures)), **options)


__all__ = ["Faults", "Simulator", "simulator"]
