"""One module per exchange; ``VENUES`` names them for the service, replay and record."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from services.collector.venue import Credentials, Venue, VenueOptions

if TYPE_CHECKING:
    from shared.config import CollectorSettings, ExchangeSettings, Secrets

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


def venue_options(name: str, collector: CollectorSettings, exchange: ExchangeSettings,
                  secrets: Secrets | None = None) -> VenueOptions:
    """The options of one exchange's module from the configuration (service and ``arb record``
    alike), with a read-only key when the environment has one (``<NAME>_API_KEY``, ...)."""
    credentials = None
    if secrets is not None:
        key, secret = secrets.exchange(name, "api_key"), secrets.exchange(name, "api_secret")
        phrase = secrets.exchange(name, "api_passphrase")
        if key is not None and secret is not None:
            credentials = Credentials(key.reveal(), secret.reveal(), phrase.reveal() if phrase is not None else "")
    return VenueOptions(
        snapshot_depth=collector.snapshot_depth, trades=collector.trades, bbo=collector.bbo,
        upbit_format=collector.upbit_format, channel_depth=exchange.book_depth, book_channel=exchange.book_channel,
        credentials=credentials,
    )
