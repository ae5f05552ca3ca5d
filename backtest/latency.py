"""Latency model: per-venue feed latency (collector receive -> detector) and order latency
(executor send -> the order meets the exchange's book), constant or sampled.

A distribution is written ``5`` or ``const:5`` (ms), ``uniform:2,8``, ``normal:5,1`` (mean, sd;
clipped at 0), ``lognormal:5,0.5`` (median, sigma of the log) or ``empirical:1.2,3.4,...``
(drawn with replacement). Each venue and kind draws from its own seeded stream, so adding a
venue never changes another's draws and a run is reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Kind = Literal["const", "uniform", "normal", "lognormal", "empirical"]
_MS = 1_000_000


class LatencyError(ValueError):
    pass


@dataclass(frozen=True)
class Dist:
    kind: Kind = "const"
    params: tuple[float, ...] = (0.0,)

    @classmethod
    def parse(cls, text: str | float | int) -> Dist:
        if isinstance(text, int | float):
            return cls("const", (float(text),))
        name, sep, rest = text.partition(":")
        if not sep:
            name, rest = "const", name
        try:
            values = tuple(float(v) for v in rest.split(",") if v.strip())
        except ValueError:
            raise LatencyError(f"latency {text!r}: numbers expected after '{name}:'") from None
        arity = {"const": 1, "uniform": 2, "normal": 2, "lognormal": 2}
        if name not in (*arity, "empirical"):
            raise LatencyError(f"latency {text!r}: one of const, uniform, normal, lognormal, empirical")
        if (name in arity and len(values) != arity[name]) or not values or any(v < 0 for v in values):
            raise LatencyError(f"latency {text!r}: {name} takes {arity.get(name, 'one or more')} non-negative value(s)")
        return cls(name, values)  # type: ignore[arg-type]

    @property
    def constant(self) -> bool:
        return self.kind == "const"

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{v:g}' for v in self.params)}"

    def sampler(self, rng: np.random.Generator) -> Callable[[], int]:
        """A function drawing one latency in nanoseconds."""
        p = self.params
        if self.kind == "const":
            value = int(p[0] * _MS)
            return lambda: value
        if self.kind == "uniform":
            return lambda: int(rng.uniform(p[0], p[1]) * _MS)
        if self.kind == "normal":
            return lambda: int(max(0.0, rng.normal(p[0], p[1])) * _MS)
        if self.kind == "lognormal":
            return lambda: int(p[0] * float(np.exp(p[1] * rng.standard_normal())) * _MS)
        samples = np.array(p) * _MS
        return lambda: int(samples[rng.integers(len(samples))])


@dataclass(frozen=True)
class LatencyModel:
    feed: Mapping[str, Dist] = field(default_factory=dict)
    """Per venue; ``*`` is every other venue."""
    order: Mapping[str, Dist] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def build(cls, feed: Mapping[str, str | float] | None = None, order: Mapping[str, str | float] | None = None,
              seed: int = 0) -> LatencyModel:
        return cls({k: Dist.parse(v) for k, v in (feed or {}).items()},
                   {k: Dist.parse(v) for k, v in (order or {}).items()}, seed)

    def dist(self, kind: Literal["feed", "order"], venue: str) -> Dist:
        table = self.feed if kind == "feed" else self.order
        return table.get(venue) or table.get("*") or Dist()

    def samplers(self, kind: Literal["feed", "order"], venues: list[str]) -> dict[str, Callable[[], int]]:
        out = {}
        for venue in venues:
            digest = hashlib.blake2b(f"{self.seed}:{kind}:{venue}".encode(), digest_size=8).digest()
            out[venue] = self.dist(kind, venue).sampler(np.random.Generator(np.random.PCG64(
                int.from_bytes(digest, "big"))))
        return out

    def zero_feed(self, venues: list[str]) -> bool:
        return all(self.dist("feed", v).constant and self.dist("feed", v).params[0] == 0 for v in venues)

    def describe(self) -> dict[str, dict[str, str]]:
        return {"feed": {k: str(v) for k, v in self.feed.items()}, "order": {k: str(v) for k, v in self.order.items()}}


def parse_venue_map(items: list[str] | None) -> dict[str, str]:
    """``["binance=5", "*=lognormal:3,0.5"]`` -> ``{"binance": "5", "*": "lognormal:3,0.5"}``; a bare value is ``*``."""
    out: dict[str, str] = {}
    for item in items or ():
        venue, sep, value = item.partition("=")
        if not sep:
            venue, value = "*", item
        out[venue.strip()] = value.strip()
    return out
