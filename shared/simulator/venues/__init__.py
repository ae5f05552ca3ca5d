"""One module per simulated exchange; ``SIM_VENUES`` names them."""

from __future__ import annotations

import importlib

from shared.simulator.server import SimVenue

SIM_VENUES: dict[str, str] = {
    "binance": "shared.simulator.venues.binance:BinanceSim",
    "upbit": "shared.simulator.venues.upbit:UpbitSim",
    "okx": "shared.simulator.venues.okx:OkxSim",
    "bybit": "shared.simulator.venues.bybit:BybitSim",
    "bithumb": "shared.simulator.venues.bithumb:BithumbSim",
    "kucoin": "shared.simulator.venues.kucoin:KucoinSim",
    "gateio": "shared.simulator.venues.gateio:GateioSim",
    "bitget": "shared.simulator.venues.bitget:BitgetSim",
}


def sim_venue_class(name: str) -> type[SimVenue]:
    if name not in SIM_VENUES:
        raise KeyError(f"the simulator does not speak {name!r} (has: {', '.join(SIM_VENUES)})")
    module, _, cls = SIM_VENUES[name].partition(":")
    venue: type[SimVenue] = getattr(importlib.import_module(module), cls)
    return venue
