"""Request signing against the exchanges' documented examples, and secrets that never leak."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as pysecrets
import uuid

import pytest

from services.executor.signing import binance_signature, jwt_encode_hs512, query_hash, upbit_query_string, upbit_token
from shared.config import Secret
from shared.simulator.orders_upbit import body_query_string, verify_jwt

# Binance rest-api.md, "SIGNED Endpoint Examples for POST /api/v3/order".
DOC_API_KEY = "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A"
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_QUERY = ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
             "&timestamp=1499827319559")


def test_binance_documented_hmac_example_reproduces_exactly() -> None:
    expected = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
    assert binance_signature(DOC_SECRET, DOC_QUERY) == expected


def test_binance_documented_mixed_query_and_body_example() -> None:
    # Example 3: totalParams is the query string immediately followed by the body (no '&').
    query, body = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC", DOC_QUERY[DOC_QUERY.index("quantity"):]
    total = query + body
    assert binance_signature(DOC_SECRET, total) == "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"


# Upbit reference/auth: the example token's header and payload segments.
DOC_UPBIT_HEADER = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9"
DOC_UPBIT_PAYLOAD = (
    "eyJhY2Nlc3Nfa2V5IjoiYTdYZDkyTG1RVzN2QnRSellwTWo1Q3hOS2VUMUh1VnMwZkZnSmNBdyIsIm5vbmNlIjoiYjJmMWUzZjgtMmRjMS00ZD"
    "ZmLWE4MzgtYzc0YzQ5YjBlMzlhIiwicXVlcnlfaGFzaCI6IjBiM2U4ODRkNDBjYzk5MmE4NTczMGNmNDcwYjRhMzI4NmYxM2Q5YzQ2MjA0Mjc5"
    "ZWYzMjE1M2JjZGNkNGVkYjdjMTI5MjVlNzI2NjYzNmU4NmE2ZDZhZTU4MDRhNmJiMzk0ZTYzMmU0ZGJhOWI0MDQ1YWQ0NzBjOTM3MjBlNWU2Iiwi"
    "cXVlcnlfaGFzaF9hbGciOiJTSEE1MTIifQ")


def _segment(seg: str) -> dict:  # type: ignore[type-arg]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def test_upbit_token_has_the_documented_header_and_payload_layout() -> None:
    claims = _segment(DOC_UPBIT_PAYLOAD)
    token = jwt_encode_hs512(claims, "any-secret")
    header, payload, _ = token.split(".")
    assert header == DOC_UPBIT_HEADER  # {"alg":"HS512","typ":"JWT"}
    assert payload == DOC_UPBIT_PAYLOAD


def test_upbit_order_token_verifies_and_carries_the_query_hash_of_the_documented_order_body() -> None:
    # reference/auth: the new-order body below hashes as this exact query string.
    body = {"market": "KRW-BTC", "side": "bid", "volume": "0.01", "price": "100.0", "ord_type": "limit"}
    query = upbit_query_string(body)
    assert query == "market=KRW-BTC&side=bid&volume=0.01&price=100.0&ord_type=limit"
    assert body_query_string(body) == query  # the simulator forms the same string independently
    access, secret = "a7Xd92LmQW3vBtRzYpMj5CxNKeT1HuVs0fFgJcAw", pysecrets.token_urlsafe(30)
    token = upbit_token(access, secret, query)
    claims = verify_jwt(token, {access: secret})
    assert claims["access_key"] == access
    assert uuid.UUID(claims["nonce"])
    assert claims["query_hash"] == hashlib.sha512(query.encode()).hexdigest()
    assert claims["query_hash_alg"] == "SHA512"
    # The signature is HMAC-SHA512 of "header.payload" under the secret as given.
    h, p, s = token.split(".")
    digest = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha512).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == s
    with pytest.raises(ValueError):
        verify_jwt(token, {access: secret + "x"})


def test_upbit_get_query_hash_covers_the_query_string_as_sent() -> None:
    # reference/auth: GET /v1/orders/open?market=KRW-BTC&states[]=wait&states[]=watch hashes that string.
    query = upbit_query_string({"market": "KRW-BTC", "states[]": ["wait", "watch"]})
    assert query == "market=KRW-BTC&states[]=wait&states[]=watch"
    assert query_hash(query) == hashlib.sha512(b"market=KRW-BTC&states[]=wait&states[]=watch").hexdigest()
    plain = upbit_token("k", "s")
    assert "query_hash" not in _segment(plain.split(".")[1])
    assert _segment(upbit_token("k", "s", "identifier=abc").split(".")[1])["query_hash"] == query_hash("identifier=abc")


def test_secrets_never_print() -> None:
    s = Secret(DOC_SECRET)
    assert DOC_SECRET not in repr(s) and DOC_SECRET not in str(s) and DOC_SECRET not in f"{[s]}"
