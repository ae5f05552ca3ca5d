"""Deterministic identifiers: one arbitrage id per signal, one client order id per leg.

Client order ids must be valid everywhere we trade: OKX allows 1-32 letters and digits
only, Gate prefixes ``t-`` to at most 28 characters, Upbit never accepts an identifier
twice (even after a failed request). So an id is letters and digits only, 23 characters,
and derived from a 128-bit hash of (env, session, signal id): a re-decided signal gets the
same ids (the executor deduplicates on them), a new signal never reuses an old one.
"""

from __future__ import annotations

import hashlib

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ARB_ID_LENGTH = 22
"""62**22 > 2**128: the whole hash fits."""
MAX_LEGS = len(_ALPHABET)


_CHUNK = 62**10
"""Ten base-62 digits fit in 64 bits: convert in machine-word chunks, not 128-bit arithmetic."""


def _base62(value: int, width: int) -> str:
    out: list[str] = []
    while len(out) < width:
        value, chunk = divmod(value, _CHUNK)
        for _ in range(min(10, width - len(out))):
            chunk, digit = divmod(chunk, 62)
            out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def arb_id(env: str, session: str, signal_id: str) -> str:
    digest = hashlib.blake2b(f"{env}\x00{session}\x00{signal_id}".encode(), digest_size=16).digest()
    return _base62(int.from_bytes(digest, "big"), ARB_ID_LENGTH)


def client_order_id(arb: str, leg_index: int) -> str:
    """``arb`` + one base-62 digit for the leg: 23 letters and digits."""
    if not 0 <= leg_index < MAX_LEGS:
        raise ValueError(f"leg index {leg_index} out of range 0..{MAX_LEGS - 1}")
    return arb + _ALPHABET[leg_index]


def decision_id(arb: str) -> str:
    return f"d{arb}"
