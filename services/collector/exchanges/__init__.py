"""One module per exchange; ``VENUES`` names them for the service, replay and record."""

from __future__ import annotations

import importlib

from services.collector.venue import Venue, VenueOptions

VENUES: dict[str, str] = {
    "binance": "services.collector.exchanges.binance:Binance",
    "upbit": "services.collector.exchanges.upbit:Upbit",
    "okx": "services.collector.exchanges.okx:Okx",
    "bybit": "services.collector.exchanges.bybit:Bybit",
    "bithumb": "services.collector.exchanges.bithumb:Bithumb",
    "kucoin": "services.collector.exchanges.kucoin:Kucoin",
    "gateio": "services.collector.exchanges.gateio:Gateio",
    "bitget": "services.collector.exchanges.bitget:Bitget",
}


def venue_class(name: str) -> type[Venue]:
    if name not in VENUES:
        raise KeyError(f"no collector module for exchange {name!r} (have: {', '.join(VENUES)})")
    module, _, cls = VENUES[name].partition(":")
    venue: type[Venue] = getattr(importlib.import_module(module), cls)
    return venue


def make_venue(name: str, options: VenueOptions | None = None) -> Venue:
    return venue_class(name)(options)
