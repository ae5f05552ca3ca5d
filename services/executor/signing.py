"""Request signing for the live venues (and its verification, used by the exchange simulator).

Binance (``rest-api.md``, "SIGNED Endpoint security"): ``signature`` = hex HMAC-SHA256 keyed
with the secret over ``totalParams``, the query string concatenated with the request body,
sent as the last parameter; the API key travels in the ``X-MBX-APIKEY`` header.

Upbit (``reference/auth``): a JWT signed HS512 with the secret key as given (not base64
decoded), claims ``access_key``, ``nonce`` (a new UUID each request) and, when the request
has parameters, ``query_hash`` = hex SHA-512 of the unencoded query string (a JSON body as
``key=value&...`` in the body's key order; list values as ``key[]=v1&key[]=v2``) with
``query_hash_alg`` = ``SHA512``; sent as ``Authorization: Bearer <jwt>``.

The JWT is built with the standard library (HMAC + base64url + JSON) rather than PyJWT:
only HS512 encoding is needed, which is a dozen lines; the exchange simulator verifies
tokens with its own independent code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

_JWT_HEADER = {"alg": "HS512", "typ": "JWT"}


# --------------------------------------------------------------------------- Binance


def binance_signature(secret: str, total_params: str) -> str:
    return hmac.new(secret.encode(), total_params.encode(), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- Upbit


def upbit_query_string(params: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """``k=v&k=v`` unencoded, in the given order; list values repeat ``k[]=v``."""
    items = params.items() if isinstance(params, Mapping) else params
    parts: list[str] = []
    for key, value in items:
        if value is None:
            continue
        if isinstance(value, list | tuple):
            name = key if key.endswith("[]") else f"{key}[]"
            parts.extend(f"{name}={v}" for v in value)
        else:
            parts.append(f"{key}={value}")
    return "&".join(parts)


def query_hash(query: str) -> str:
    return hashlib.sha512(query.encode()).hexdigest()


def upbit_token(access_key: str, secret: str, query: str = "", *, nonce: str | None = None) -> str:
    claims: dict[str, Any] = {"access_key": access_key, "nonce": nonce or str(uuid.uuid4())}
    if query:
        claims["query_hash"] = query_hash(query)
        claims["query_hash_alg"] = "SHA512"
    return jwt_encode_hs512(claims, secret)


# --------------------------------------------------------------------------- JWT HS512


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def jwt_encode_hs512(claims: Mapping[str, Any], secret: str) -> str:
    signing_input = f"{_b64(_json(_JWT_HEADER))}.{_b64(_json(dict(claims)))}"
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha512).digest()
    return f"{signing_input}.{_b64(signature)}"
