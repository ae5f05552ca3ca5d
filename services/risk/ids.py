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


_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
"""Every two-digit base-62 string, by value: half the divisions of one digit at a time."""


def _base62(value: int, width: int) -> str:
    """``value`` in ``width`` base-62 digits, most significant first (zero-padded)."""
    out: list[str] = []
    for _ in range(width // 2):
        value, pair = divmod(value, 3844)
        out.append(_PAIRS[pair])
    if width % 2:
        out.append(_ALPHABET[value % 62])
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
