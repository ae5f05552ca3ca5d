"""Withdrawal fees, minimums and wallet status from each exchange's wallet endpoint.

One reader per exchange (endpoints from docs/exchanges.md), each a signed or public GET
followed by a pure parser of the documented response shape into ``NetworkUpdate`` rows:

| exchange | endpoint | auth |
| --- | --- | --- |
| binance | ``GET /sapi/v1/capital/config/getall`` | HMAC-SHA256 query signature |
| upbit | ``GET /v1/withdraws/chance?currency=&net_type=`` | JWT HS512 with query hash |
| bithumb | ``GET /v1/withdraws/chance?currency=&net_type=`` | JWT HS256 with query hash |
| okx | ``GET /api/v5/asset/currencies?ccy=`` | base64 HMAC-SHA256 + passphrase |
| bybit | ``GET /v5/asset/coin/query-info?coin=`` | HMAC-SHA256 headers |
| kucoin | ``GET /api/v3/currencies/{currency}`` | public |
| gateio | ``GET /api/v4/wallet/withdraw_status?currency=`` | HMAC-SHA512 headers |
| bitget | ``GET /api/v2/spot/public/coins?coin=`` | public |

Errors never carry credentials: they name the exchange, the path and the HTTP status or
the exchange's own error code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

import aiohttp

from services.rebalancer.networks import NetworkUpdate, TransferNetwork
from shared.config import Secrets

DEFAULT_URLS: Mapping[str, str] = {
    "binance": "https://api.binance.com",
    "upbit": "https://api.upbit.com",
    "bithumb": "https://api.bithumb.com",
    "okx": "https://www.okx.com",
    "bybit": "https://api.bybit.com",
    "kucoin": "https://api.kucoin.com",
    "gateio": "https://api.gateio.ws",
    "bitget": "https://api.bitget.com",
}


class WalletError(RuntimeError):
    """A wallet endpoint could not be read or answered with something we cannot use."""


# --------------------------------------------------------------------------- value parsing


def _dec(value: Any, what: str) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        out = Decimal(str(value))
    except InvalidOperation:
        raise WalletError(f"{what}: {value!r} is not a number") from None
    if not out.is_finite():
        raise WalletError(f"{what}: {value!r} is not a finite number")
    return out


def _percent(value: Any, what: str) -> Decimal | None:
    """``"0.1%"`` -> 0.001; ``"0.001"`` stays."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = _dec(value.strip()[:-1], what)
        return None if number is None else number / 100
    return _dec(value, what)


def _flag(value: Any) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- parsers (pure)


def parse_binance(body: Any, assets: Iterable[str]) -> list[NetworkUpdate]:
    wanted = set(assets)
    if not isinstance(body, list):
        raise WalletError(f"binance: expected a list of coins, got {type(body).__name__}")
    out = []
    for coin in body:
        if coin.get("coin") not in wanted:
            continue
        for n in coin.get("networkList", []):
            what = f"binance {coin['coin']} {n.get('network')}"
            out.append(NetworkUpdate(
                exchange="binance", asset=coin["coin"], label=str(n["network"]),
                withdraw_fee=_dec(n.get("withdrawFee"), f"{what} withdrawFee"),
                withdraw_min=_dec(n.get("withdrawMin"), f"{what} withdrawMin"),
                withdraw_enabled=_flag(n.get("withdrawEnable")),
                deposit_enabled=_flag(n.get("depositEnable")),
            ))
    return out


def parse_upbit_chance(body: Any, exchange: str, asset: str, net_type: str) -> NetworkUpdate:
    """``/v1/withdraws/chance`` (Upbit, and Bithumb's v1 API which shares its shape)."""
    if not isinstance(body, dict) or "currency" not in body:
        raise WalletError(f"{exchange} {asset} {net_type}: no currency section in the answer")
    currency, limit = body["currency"], body.get("withdraw_limit") or {}
    state = currency.get("wallet_state", "")
    support = currency.get("wallet_support") or []
    what = f"{exchange} {asset} {net_type}"
    return NetworkUpdate(
        exchange=exchange, asset=asset, label=net_type,
        withdraw_fee=_dec(currency.get("withdraw_fee"), f"{what} withdraw_fee"),
        withdraw_min=_dec(limit.get("minimum"), f"{what} withdraw_limit.minimum"),
        withdraw_enabled=bool(limit.get("can_withdraw", True)) and state in ("working", "withdraw_only")
        and "withdraw" in support,
        deposit_enabled=state in ("working", "deposit_only") and "deposit" in support,
    )


def parse_okx(body: Any, assets: Iterable[str]) -> list[NetworkUpdate]:
    if not isinstance(body, dict) or str(body.get("code")) != "0":
        raise WalletError(f"okx: error {body.get('code') if isinstance(body, dict) else '?'}: "
                          f"{(body.get('msg') if isinstance(body, dict) else '')!s:.200}")
    wanted = set(assets)
    out = []
    for row in body.get("data", []):
        ccy, chain = row.get("ccy"), str(row.get("chain", ""))
        if ccy not in wanted:
            continue
        what = f"okx {chain}"
        fee = row.get("fee") if row.get("fee") not in (None, "") else row.get("minFee")
        out.append(NetworkUpdate(
            exchange="okx", asset=ccy, label=chain,  # "USDT-TRC20": what OKX's withdrawal endpoint expects
            withdraw_fee=_dec(fee, f"{what} fee"),
            withdraw_fee_rate=_dec(row.get("burningFeeRate"), f"{what} burningFeeRate"),
            withdraw_min=_dec(row.get("minWd"), f"{what} minWd"),
            withdraw_enabled=_flag(row.get("canWd")),
            deposit_enabled=_flag(row.get("canDep")),
        ))
    return out


def parse_bybit(body: Any, assets: Iterable[str]) -> list[NetworkUpdate]:
    if not isinstance(body, dict) or body.get("retCode") != 0:
        raise WalletError(f"bybit: error {body.get('retCode') if isinstance(body, dict) else '?'}: "
                          f"{(body.get('retMsg') if isinstance(body, dict) else '')!s:.200}")
    wanted = set(assets)
    out = []
    for coin in body.get("result", {}).get("rows", []):
        if coin.get("coin") not in wanted:
            continue
        for c in coin.get("chains", []):
            what = f"bybit {coin['coin']} {c.get('chain')}"
            fee = _dec(c.get("withdrawFee"), f"{what} withdrawFee")
            out.append(NetworkUpdate(
                exchange="bybit", asset=coin["coin"], label=str(c["chain"]),
                withdraw_fee=fee,
                withdraw_fee_rate=_dec(c.get("withdrawPercentageFee"), f"{what} withdrawPercentageFee"),
                withdraw_min=_dec(c.get("withdrawMin"), f"{what} withdrawMin"),
                # An empty withdrawFee means the coin cannot be withdrawn on this chain.
                withdraw_enabled=fee is not None and _flag(c.get("chainWithdraw")) is True,
                deposit_enabled=_flag(c.get("chainDeposit")),
            ))
    return out


def parse_kucoin(body: Any, asset: str) -> list[NetworkUpdate]:
    if not isinstance(body, dict) or str(body.get("code")) != "200000":
        raise WalletError(f"kucoin {asset}: error {body.get('code') if isinstance(body, dict) else '?'}: "
                          f"{(body.get('msg') if isinstance(body, dict) else '')!s:.200}")
    out = []
    for c in (body.get("data") or {}).get("chains") or []:
        what = f"kucoin {asset} {c.get('chainName')}"
        out.append(NetworkUpdate(
            exchange="kucoin", asset=asset, label=str(c.get("chainName") or c.get("chainId")),
            withdraw_fee=_dec(c.get("withdrawalMinFee"), f"{what} withdrawalMinFee"),
            withdraw_fee_rate=_dec(c.get("withdrawFeeRate"), f"{what} withdrawFeeRate"),
            withdraw_min=_dec(c.get("withdrawalMinSize"), f"{what} withdrawalMinSize"),
            withdraw_enabled=_flag(c.get("isWithdrawEnabled")),
            deposit_enabled=_flag(c.get("isDepositEnabled")),
        ))
    return out


def parse_gateio(body: Any, asset: str) -> list[NetworkUpdate]:
    """Gate reports fees per chain but not wallet status: status stays as configured."""
    if not isinstance(body, list):
        raise WalletError(f"gateio {asset}: expected a list, got {str(body)[:200]}")
    out = []
    for row in body:
        if row.get("currency") != asset:
            continue
        rates = row.get("withdraw_percent_on_chains") or {}
        minimum = _dec(row.get("withdraw_amount_mini"), f"gateio {asset} withdraw_amount_mini")
        for chain, fee in (row.get("withdraw_fix_on_chains") or {}).items():
            out.append(NetworkUpdate(
                exchange="gateio", asset=asset, label=chain,
                withdraw_fee=_dec(fee, f"gateio {asset} {chain} fee"),
                withdraw_fee_rate=_percent(rates.get(chain), f"gateio {asset} {chain} percent"),
                withdraw_min=minimum,
            ))
    return out


def parse_bitget(body: Any, asset: str) -> list[NetworkUpdate]:
    if not isinstance(body, dict) or str(body.get("code")) != "00000":
        raise WalletError(f"bitget {asset}: error {body.get('code') if isinstance(body, dict) else '?'}: "
                          f"{(body.get('msg') if isinstance(body, dict) else '')!s:.200}")
    out = []
    for coin in body.get("data") or []:
        if coin.get("coin") != asset:
            continue
        for c in coin.get("chains") or []:
            what = f"bitget {asset} {c.get('chain')}"
            out.append(NetworkUpdate(
                exchange="bitget", asset=asset, label=str(c["chain"]),
                withdraw_fee=_dec(c.get("withdrawFee"), f"{what} withdrawFee"),
                withdraw_fee_rate=_dec(c.get("extraWithdrawFee"), f"{what} extraWithdrawFee"),
                withdraw_min=_dec(c.get("minWithdrawAmount"), f"{what} minWithdrawAmount"),
                withdraw_enabled=_flag(c.get("withdrawable")),
                deposit_enabled=_flag(c.get("rechargeable")),
            ))
    return out


# --------------------------------------------------------------------------- signing


def _hmac_hex(secret: str, message: str, digest: Any = hashlib.sha256) -> str:
    return hmac.new(secret.encode(), message.encode(), digest).hexdigest()


def _jwt(secret: str, payload: Mapping[str, Any], alg: str) -> str:
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": alg, "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(dict(payload), separators=(",", ":")).encode())
    signature = b64(hmac.new(secret.encode(), f"{header}.{body}".encode(), digest).digest())
    return f"{header}.{body}.{signature}"


class _Keys:
    def __init__(self, secrets: Secrets, exchange: str, passphrase: bool = False) -> None:
        key, secret = secrets.exchange(exchange, "api_key"), secrets.exchange(exchange, "api_secret")
        phrase = secrets.exchange(exchange, "api_passphrase") if passphrase else None
        if key is None or secret is None or (passphrase and phrase is None):
            names = ["API_KEY", "API_SECRET"] + (["API_PASSPHRASE"] if passphrase else [])
            raise WalletError(f"{exchange}: the wallet endpoint is signed: set "
                              + ", ".join(f"{exchange.upper()}_{n}" for n in names))
        self.key, self.secret = key.reveal(), secret.reveal()
        self.passphrase = phrase.reveal() if phrase is not None else ""


# --------------------------------------------------------------------------- readers


_Get = Callable[[str, str, Mapping[str, str]], Awaitable[Any]]
"""(path, query string, headers) -> the decoded JSON answer."""


def _getter(session: aiohttp.ClientSession, exchange: str, base_url: str) -> _Get:
    async def get(path: str, query: str, headers: Mapping[str, str]) -> Any:
        url = f"{base_url.rstrip('/')}{path}" + (f"?{query}" if query else "")
        try:
            async with session.get(url, headers=dict(headers)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise WalletError(f"{exchange} {path}: HTTP {resp.status}: {_error_text(text)}")
                try:
                    return json.loads(text)
                except ValueError:
                    raise WalletError(f"{exchange} {path}: answer is not JSON") from None
        except aiohttp.ClientError as exc:
            raise WalletError(f"{exchange} {path}: {type(exc).__name__}") from None
        except TimeoutError:
            raise WalletError(f"{exchange} {path}: timed out") from None

    return get


def _error_text(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return "(not JSON)"
    if isinstance(body, dict):
        code = next((body[k] for k in ("code", "retCode", "label", "error") if k in body), "")
        msg = next((body[k] for k in ("msg", "message", "retMsg") if k in body), "")
        return f"{code} {msg}"[:200]
    return "(unexpected body)"


async def fetch_network_updates(
    session: aiohttp.ClientSession,
    exchange: str,
    rows: Iterable[TransferNetwork],
    secrets: Secrets,
    base_url: str = "",
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> list[NetworkUpdate]:
    """What ``exchange`` reports now about the networks of the assets in ``rows``.

    Raises ``WalletError`` when the endpoint is unreachable, refuses, or answers in a shape
    we do not know."""
    try:
        return await _fetch(session, exchange, list(rows), secrets, base_url, now_ms)
    except (KeyError, TypeError, AttributeError) as exc:
        raise WalletError(f"{exchange}: unexpected answer shape ({type(exc).__name__}: {exc})") from None


async def _fetch(
    session: aiohttp.ClientSession,
    exchange: str,
    rows: list[TransferNetwork],
    secrets: Secrets,
    base_url: str,
    now_ms: Callable[[], int],
) -> list[NetworkUpdate]:
    rows = [r for r in rows if r.exchange == exchange]
    assets = sorted({r.asset for r in rows})
    if not assets:
        return []
    get = _getter(session, exchange, base_url or DEFAULT_URLS.get(exchange, ""))
    if exchange == "binance":
        keys = _Keys(secrets, exchange)
        query = urlencode({"recvWindow": 5000, "timestamp": now_ms()})
        query += "&signature=" + _hmac_hex(keys.secret, query)
        body = await get("/sapi/v1/capital/config/getall", query, {"X-MBX-APIKEY": keys.key})
        return parse_binance(body, assets)
    if exchange in ("upbit", "bithumb"):
        keys = _Keys(secrets, exchange)
        out = []
        for r in rows:
            query = urlencode({"currency": r.asset, "net_type": r.label})
            claims: dict[str, Any] = {"access_key": keys.key, "nonce": str(uuid.uuid4()),
                                      "query_hash": hashlib.sha512(query.encode()).hexdigest(),
                                      "query_hash_alg": "SHA512"}
            alg = "HS512"
            if exchange == "bithumb":
                claims["timestamp"] = now_ms()
                alg = "HS256"
            token = _jwt(keys.secret, claims, alg)
            body = await get("/v1/withdraws/chance", query, {"Authorization": f"Bearer {token}"})
            out.append(parse_upbit_chance(body, exchange, r.asset, r.label))
        return out
    if exchange == "okx":
        keys = _Keys(secrets, exchange, passphrase=True)
        path = "/api/v5/asset/currencies"
        query = urlencode({"ccy": ",".join(assets)})
        ts = datetime.fromtimestamp(now_ms() / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        sign = base64.b64encode(hmac.new(keys.secret.encode(), f"{ts}GET{path}?{query}".encode(),
                                         hashlib.sha256).digest()).decode()
        body = await get(path, query, {"OK-ACCESS-KEY": keys.key, "OK-ACCESS-SIGN": sign,
                                       "OK-ACCESS-TIMESTAMP": ts, "OK-ACCESS-PASSPHRASE": keys.passphrase})
        return parse_okx(body, assets)
    if exchange == "bybit":
        keys = _Keys(secrets, exchange)
        out = []
        for asset in assets:
            query = urlencode({"coin": asset})
            ts, window = str(now_ms()), "5000"
            headers = {"X-BAPI-API-KEY": keys.key, "X-BAPI-TIMESTAMP": ts, "X-BAPI-RECV-WINDOW": window,
                       "X-BAPI-SIGN": _hmac_hex(keys.secret, f"{ts}{keys.key}{window}{query}")}
            out += parse_bybit(await get("/v5/asset/coin/query-info", query, headers), [asset])
        return out
    if exchange == "kucoin":
        out = []
        for asset in assets:
            out += parse_kucoin(await get(f"/api/v3/currencies/{asset}", "", {}), asset)
        return out
    if exchange == "gateio":
        keys = _Keys(secrets, exchange)
        out = []
        for asset in assets:
            path, query = "/api/v4/wallet/withdraw_status", urlencode({"currency": asset})
            ts = str(now_ms() // 1000)
            payload = f"GET\n{path}\n{query}\n{hashlib.sha512(b'').hexdigest()}\n{ts}"
            headers = {"KEY": keys.key, "Timestamp": ts, "SIGN": _hmac_hex(keys.secret, payload, hashlib.sha512)}
            out += parse_gateio(await get(path, query, headers), asset)
        return out
    if exchange == "bitget":
        out = []
        for asset in assets:
            out += parse_bitget(await get("/api/v2/spot/public/coins", urlencode({"coin": asset}), {}), asset)
        return out
    raise WalletError(f"{exchange}: no wallet endpoint known")
