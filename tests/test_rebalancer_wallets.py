"""Refreshing the transfer-network table from each exchange's wallet endpoint, against a
local HTTP server on 127.0.0.1 that checks each documented signature and answers with the
documented response shapes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from services.rebalancer.networks import NetworkTableError, TransferNetworkTable
from services.rebalancer.service import RebalancerService
from services.rebalancer.wallets import WalletError, fetch_network_updates
from shared.config import Config, Secrets, load_config
from shared.models import Alert
from shared.runtime import FIELD, Bus
from shared.streams import ALERTS
from tests.rebalancer_scenarios import D

EXCHANGES = ("binance", "upbit", "bithumb", "okx", "bybit", "kucoin", "gateio", "bitget")
LABELS = {  # each exchange's own names for TRON and Ethereum; empty: matched through the alias table
    "binance": ("TRX", "ETH"), "upbit": ("TRX", "ETH"), "bithumb": ("TRX", "ETH"), "okx": ("", ""),
    "bybit": ("TRX", "ETH"), "kucoin": ("", ""), "gateio": ("TRX", "ETH"), "bitget": ("", ""),
}
KEYS = {f"{ex.upper()}_API_{what}": f"{ex}-{what.lower()}-value" for ex in EXCHANGES for what in ("KEY", "SECRET")}
KEYS["OKX_API_PASSPHRASE"] = "okx-passphrase-value"
SECRETS = Secrets(KEYS)


def networks_config(env: dict[str, str] | None = None, rest_url: str = "") -> Config:
    rows = []
    for ex, (tron, eth) in LABELS.items():
        rows.append({"exchange": ex, "asset": "USDT", "network": "TRON", "label": tron, "withdraw_fee": "9",
                     "confirm_seconds": 120})
        rows.append({"exchange": ex, "asset": "USDT", "network": "ETH", "label": eth, "withdraw_fee": "9",
                     "confirm_seconds": 300})
    overrides: dict[str, Any] = {"rebalancer": {"networks": rows, "refresh_interval_s": 3600}}
    if rest_url:
        overrides["exchanges"] = {ex: {"rest_url": f"{rest_url}/{ex}", "enabled": ex == "binance",
                                       "symbols": ["BTC/USDT"]} for ex in EXCHANGES}
    return load_config(environ=env or {}, overrides=overrides)


# --------------------------------------------------------------------------- the fake wallet endpoints


def _hex(secret: str, msg: str, digest: Any = hashlib.sha256) -> str:
    return hmac.new(secret.encode(), msg.encode(), digest).hexdigest()


def _jwt_claims(token: str, secret: str, digest: Any) -> dict[str, Any]:
    header, body, signature = token.split(".")
    expected = base64.urlsafe_b64encode(hmac.new(secret.encode(), f"{header}.{body}".encode(), digest).digest())
    assert expected.rstrip(b"=").decode() == signature, "bad JWT signature"
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


class WalletServer:
    """Answers like the exchanges' docs; ``fee`` changes what every exchange reports for TRON."""

    def __init__(self) -> None:
        self.fee = "1"
        self.status = 200
        self.drop_eth = False
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{exchange}/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        exchange = request.match_info["exchange"]
        path = "/" + request.match_info["tail"]
        self.seen.append(exchange)
        if self.status != 200:
            return web.json_response({"code": -2015, "msg": "Invalid API-key, IP, or permissions for action."},
                                     status=self.status)
        body = getattr(self, exchange)(request, path)
        return web.json_response(body)

    # Each method checks the documented authentication, then answers in the documented shape.

    def binance(self, request: web.Request, path: str) -> Any:
        assert path == "/sapi/v1/capital/config/getall"
        assert request.headers["X-MBX-APIKEY"] == KEYS["BINANCE_API_KEY"]
        query, _, signature = request.query_string.rpartition("&signature=")
        assert signature == _hex(KEYS["BINANCE_API_SECRET"], query) and "timestamp=" in query
        networks = [
            {"network": "TRX", "coin": "USDT", "withdrawIntegerMultiple": "0.000001", "isDefault": False,
             "depositEnable": True, "withdrawEnable": True, "depositDesc": "", "withdrawDesc": "",
             "specialTips": "", "name": "Tron (TRC20)", "resetAddressStatus": False,
             "addressRegex": "^T[1-9A-HJ-NP-Za-km-z]{33}$", "memoRegex": "", "withdrawFee": self.fee,
             "withdrawMin": "10", "withdrawMax": "9999999", "minConfirm": 1, "unLockConfirm": 0,
             "sameAddress": False, "estimatedArrivalTime": 1, "busy": False},
            {"network": "ETH", "coin": "USDT", "depositEnable": True, "withdrawEnable": False,
             "withdrawDesc": "Wallet maintenance", "withdrawFee": "4.5", "withdrawMin": "20",
             "name": "Ethereum (ERC20)", "minConfirm": 6, "unLockConfirm": 64},
        ]
        if self.drop_eth:
            networks = networks[:1]
        return [
            {"coin": "BTC", "depositAllEnable": True, "withdrawAllEnable": True, "name": "Bitcoin", "free": "0",
             "locked": "0", "freeze": "0", "withdrawing": "0", "ipoing": "0", "ipoable": "0", "storage": "0",
             "isLegalMoney": False, "trading": True,
             "networkList": [{"network": "BTC", "coin": "BTC", "withdrawFee": "0.0002", "withdrawMin": "0.001",
                              "depositEnable": True, "withdrawEnable": True}]},
            {"coin": "USDT", "depositAllEnable": True, "withdrawAllEnable": True, "name": "TetherUS", "free": "0",
             "locked": "0", "freeze": "0", "withdrawing": "0", "ipoing": "0", "ipoable": "0", "storage": "0",
             "isLegalMoney": False, "trading": True, "networkList": networks},
        ]

    def _chance(self, request: web.Request, path: str, exchange: str, digest: Any) -> Any:
        assert path == "/v1/withdraws/chance"
        token = request.headers["Authorization"].removeprefix("Bearer ")
        claims = _jwt_claims(token, KEYS[f"{exchange.upper()}_API_SECRET"], digest)
        assert claims["access_key"] == KEYS[f"{exchange.upper()}_API_KEY"]
        assert claims["query_hash"] == hashlib.sha512(request.query_string.encode()).hexdigest()
        net_type = request.query["net_type"]
        state = "working" if net_type == "TRX" else "deposit_only"
        return {
            "member_level": {"security_level": 3, "fee_level": 0, "email_verified": True,
                             "identity_auth_verified": True, "bank_account_verified": True,
                             "two_factor_auth_verified": True, "locked": False, "wallet_locked": False},
            "currency": {"code": request.query["currency"], "withdraw_fee": self.fee if net_type == "TRX" else "5",
                         "is_coin": True, "wallet_state": state, "wallet_support": ["deposit", "withdraw"]},
            "account": {"currency": "USDT", "balance": "10.0", "locked": "0.0", "avg_buy_price": "1380",
                        "avg_buy_price_modified": False, "unit_currency": "KRW"},
            "withdraw_limit": {"currency": "USDT", "minimum": "10" if net_type == "TRX" else None,
                               "onetime": None, "daily": "100000", "remaining_daily": "100000",
                               "remaining_daily_krw": "0.0", "fixed": 6, "can_withdraw": True},
        }

    def upbit(self, request: web.Request, path: str) -> Any:
        return self._chance(request, path, "upbit", hashlib.sha512)

    def bithumb(self, request: web.Request, path: str) -> Any:
        return self._chance(request, path, "bithumb", hashlib.sha256)

    def okx(self, request: web.Request, path: str) -> Any:
        assert path == "/api/v5/asset/currencies"
        h = request.headers
        prehash = f"{h['OK-ACCESS-TIMESTAMP']}GET{path}?{request.query_string}"
        expected = base64.b64encode(hmac.new(KEYS["OKX_API_SECRET"].encode(), prehash.encode(),
                                             hashlib.sha256).digest()).decode()
        assert h["OK-ACCESS-SIGN"] == expected and h["OK-ACCESS-PASSPHRASE"] == KEYS["OKX_API_PASSPHRASE"]
        assert h["OK-ACCESS-KEY"] == KEYS["OKX_API_KEY"] and h["OK-ACCESS-TIMESTAMP"].endswith("Z")
        common = {"ccy": "USDT", "name": "Tether", "logoLink": "", "ctAddr": "", "canInternal": True,
                  "depEstOpenTime": "", "wdEstOpenTime": "", "minDep": "0.00000001", "minInternal": "0.01",
                  "maxWd": "9999999", "wdTickSz": "6", "wdQuota": "10000000", "usedWdQuota": "0",
                  "minFee": "", "maxFee": "", "burningFeeRate": "", "mainNet": False, "needTag": False}
        return {"code": "0", "msg": "", "data": [
            {**common, "chain": "USDT-TRC20", "canDep": True, "canWd": True, "minWd": "10", "fee": self.fee},
            {**common, "chain": "USDT-ERC20", "canDep": False, "canWd": True, "minWd": "20", "fee": "3.5"},
        ]}

    def bybit(self, request: web.Request, path: str) -> Any:
        assert path == "/v5/asset/coin/query-info"
        h = request.headers
        prehash = f"{h['X-BAPI-TIMESTAMP']}{KEYS['BYBIT_API_KEY']}{h['X-BAPI-RECV-WINDOW']}{request.query_string}"
        assert h["X-BAPI-SIGN"] == _hex(KEYS["BYBIT_API_SECRET"], prehash)
        return {"retCode": 0, "retMsg": "", "result": {"rows": [{
            "name": "USDT", "coin": "USDT", "remainAmount": "150000", "chains": [
                {"chainType": "TRC20", "confirmation": "100", "withdrawFee": self.fee, "depositMin": "0",
                 "withdrawMin": "10", "chain": "TRX", "chainDeposit": "1", "chainWithdraw": "1",
                 "minAccuracy": "6", "withdrawPercentageFee": "0", "contractAddress": "", "safeConfirmNumber": "100"},
                {"chainType": "ERC20", "confirmation": "64", "withdrawFee": "", "depositMin": "0",
                 "withdrawMin": "20", "chain": "ETH", "chainDeposit": "1", "chainWithdraw": "1",
                 "minAccuracy": "6", "withdrawPercentageFee": "0", "contractAddress": "", "safeConfirmNumber": "64"},
            ]}]}, "retExtInfo": {}, "time": 1672194582264}

    def kucoin(self, request: web.Request, path: str) -> Any:
        assert path == "/api/v3/currencies/USDT"
        return {"code": "200000", "data": {
            "currency": "USDT", "name": "USDT", "fullName": "Tether", "precision": 8, "confirms": None,
            "contractAddress": None, "isMarginEnabled": True, "isDebitEnabled": True, "chains": [
                {"chainName": "TRC20", "withdrawalMinSize": "10", "depositMinSize": "1",
                 "withdrawFeeRate": "0", "withdrawalMinFee": self.fee, "isWithdrawEnabled": True,
                 "isDepositEnabled": True, "confirms": 1, "preConfirms": 1, "contractAddress": "", "chainId": "trx"},
                {"chainName": "ERC20", "withdrawalMinSize": "20", "depositMinSize": "1",
                 "withdrawFeeRate": "0", "withdrawalMinFee": "6", "isWithdrawEnabled": False,
                 "isDepositEnabled": True, "confirms": 12, "preConfirms": 12, "contractAddress": "",
                 "chainId": "eth"}]}}

    def gateio(self, request: web.Request, path: str) -> Any:
        assert path == "/api/v4/wallet/withdraw_status"
        h = request.headers
        payload = f"GET\n{path}\n{request.query_string}\n{hashlib.sha512(b'').hexdigest()}\n{h['Timestamp']}"
        assert h["SIGN"] == _hex(KEYS["GATEIO_API_SECRET"], payload, hashlib.sha512)
        assert h["KEY"] == KEYS["GATEIO_API_KEY"]
        return [{"currency": "USDT", "name": "Tether", "name_cn": "泰达币", "deposit": "0",
                 "withdraw_percent": "0%", "withdraw_fix": "1", "withdraw_day_limit": "500000",
                 "withdraw_amount_mini": "10", "withdraw_day_limit_remain": "500000",
                 "withdraw_eachtime_limit": "500000",
                 "withdraw_fix_on_chains": {"TRX": self.fee, "ETH": "4"},
                 "withdraw_percent_on_chains": {"TRX": "0%", "ETH": "0.1%"}}]

    def bitget(self, request: web.Request, path: str) -> Any:
        assert path == "/api/v2/spot/public/coins" and request.query["coin"] == "USDT"
        return {"code": "00000", "msg": "success", "requestTime": 1695799900330, "data": [{
            "coinId": "2", "coin": "USDT", "transfer": "true", "areaCoin": "no", "chains": [
                {"chain": "TRC20", "needTag": "false", "withdrawable": "true", "rechargeable": "true",
                 "withdrawFee": self.fee, "extraWithdrawFee": "0", "depositConfirm": "1", "withdrawConfirm": "1",
                 "minDepositAmount": "1", "minWithdrawAmount": "10", "browserUrl": "", "contractAddress": "",
                 "withdrawStep": "0", "withdrawMinScale": "6", "congestion": "normal"},
                {"chain": "ERC20", "needTag": "false", "withdrawable": "false", "rechargeable": "true",
                 "withdrawFee": "2", "extraWithdrawFee": "0", "depositConfirm": "12", "withdrawConfirm": "64",
                 "minDepositAmount": "1", "minWithdrawAmount": "20", "browserUrl": "", "contractAddress": "",
                 "withdrawStep": "0", "withdrawMinScale": "6", "congestion": "normal"}]}]}


@pytest.fixture
async def wallet() -> AsyncIterator[tuple[WalletServer, str]]:
    server = WalletServer()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


# What each exchange's answer above says about (TRON, ETH): (fee, min, withdraw open, deposit open).
EXPECTED = {
    "binance": (("1", "10", True, True), ("4.5", "20", False, True)),
    "upbit": (("1", "10", True, True), ("5", "0", False, True)),
    "bithumb": (("1", "10", True, True), ("5", "0", False, True)),
    "okx": (("1", "10", True, True), ("3.5", "20", True, False)),
    "bybit": (("1", "10", True, True), ("9", "20", False, True)),
    "kucoin": (("1", "10", True, True), ("6", "20", False, True)),
    "gateio": (("1", "10", True, True), ("4", "10", True, True)),
    "bitget": (("1", "10", True, True), ("2", "20", False, True)),
}


@pytest.mark.parametrize("exchange", EXCHANGES)
async def test_each_exchange_wallet_endpoint_is_read_and_signed_as_documented(wallet, exchange: str) -> None:
    server, url = wallet
    base = TransferNetworkTable.from_settings(networks_config().rebalancer)
    async with aiohttp.ClientSession() as http:
        updates = await fetch_network_updates(http, exchange, base, SECRETS, f"{url}/{exchange}")
    table, report = base.refreshed(updates, [exchange])
    assert server.seen and set(server.seen) == {exchange}
    assert report.missing == []
    for network, (fee, minimum, can_withdraw, can_deposit) in zip(("TRON", "ETH"), EXPECTED[exchange], strict=True):
        row = table.get(exchange, "USDT", network)
        assert (row.withdraw_fee, row.withdraw_min, row.withdraw_enabled, row.deposit_enabled) == (
            D(fee), D(minimum), can_withdraw, can_deposit), network
    if exchange == "gateio":
        assert table.get("gateio", "USDT", "ETH").withdraw_fee_rate == D("0.001")
    if exchange == "okx":  # configured without labels: matched by chain, labelled as OKX names it
        assert (table.get("okx", "USDT", "TRON").label, table.get("okx", "USDT", "ETH").label) == (
            "USDT-TRC20", "USDT-ERC20")
    untouched = table.get("kucoin" if exchange != "kucoin" else "binance", "USDT", "TRON")
    assert untouched.withdraw_fee == D("9")  # other exchanges keep their configured values


async def test_a_negative_fee_from_an_exchange_is_refused_and_the_table_keeps_its_values(wallet) -> None:
    server, url = wallet
    server.fee = "-1"
    base = TransferNetworkTable.from_settings(networks_config().rebalancer)
    async with aiohttp.ClientSession() as http:
        updates = await fetch_network_updates(http, "binance", base, SECRETS, f"{url}/binance")
    with pytest.raises(NetworkTableError, match="binance USDT TRON: withdraw_fee -1 must be a non-negative"):
        base.refreshed(updates, ["binance"])
    assert base.get("binance", "USDT", "TRON").withdraw_fee == D("9")


async def test_a_network_the_exchange_no_longer_lists_is_closed(wallet) -> None:
    server, url = wallet
    server.drop_eth = True
    base = TransferNetworkTable.from_settings(networks_config().rebalancer)
    async with aiohttp.ClientSession() as http:
        updates = await fetch_network_updates(http, "binance", base, SECRETS, f"{url}/binance")
    table, report = base.refreshed(updates, ["binance"])
    assert report.missing == [("binance", "USDT", "ETH")]
    eth = table.get("binance", "USDT", "ETH")
    assert not eth.withdraw_enabled and not eth.deposit_enabled


async def test_refusals_name_exchange_and_status_but_never_the_credentials(wallet) -> None:
    server, url = wallet
    server.status = 401
    base = TransferNetworkTable.from_settings(networks_config().rebalancer)
    for exchange in ("binance", "okx", "upbit"):
        async with aiohttp.ClientSession() as http:
            with pytest.raises(WalletError) as err:
                await fetch_network_updates(http, exchange, base, SECRETS, f"{url}/{exchange}")
        text = str(err.value)
        assert text.startswith(exchange) and "HTTP 401" in text and "-2015" in text
        assert not any(secret in text for secret in KEYS.values())


async def test_a_signed_endpoint_without_keys_says_which_variables_to_set(wallet) -> None:
    _, url = wallet
    base = TransferNetworkTable.from_settings(networks_config().rebalancer)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(WalletError, match="set OKX_API_KEY, OKX_API_SECRET, OKX_API_PASSPHRASE"):
            await fetch_network_updates(http, "okx", base, Secrets({}), f"{url}/okx")
        # public endpoints need nothing
        assert await fetch_network_updates(http, "kucoin", base, Secrets({}), f"{url}/kucoin")


async def test_service_refresh_applies_good_answers_and_keeps_the_last_good_state_on_bad_ones(
    wallet, redis_url: str, namespace: str
) -> None:
    server, url = wallet
    env = {"REDIS_URL": redis_url, "ARB_SESSION": namespace, "ARB_REDIS__STREAM_PREFIX": f"{namespace}:",
           "ARB_HTTP__BASE_PORT": "0"}
    cfg = networks_config(env, rest_url=url)
    service = RebalancerService(cfg, SECRETS)
    bus = Bus.from_url(redis_url, prefix=f"{namespace}:", keys=service.bus.keys)
    try:
        async with aiohttp.ClientSession() as http:
            await service.refresh_networks(http)
            assert service.networks.get("okx", "USDT", "TRON").withdraw_fee == D("1")
            assert service.networks.get("binance", "USDT", "ETH").withdraw_enabled is False
            server.fee = "-1"  # every exchange now answers nonsense for TRON
            await service.refresh_networks(http)
        await service.producer.flush()
        for exchange in EXCHANGES:
            assert service.networks.get(exchange, "USDT", "TRON").withdraw_fee == Decimal("1"), exchange
        entries = await bus.redis.xrange(bus.stream(ALERTS))
        alerts = [msgspec.json.decode(f[FIELD], type=Alert) for _, f in entries]
        refused = {a.labels["exchange"] for a in alerts if a.kind == "refresh"}
        assert refused == set(EXCHANGES)
        assert all("withdraw_fee -1" in a.message for a in alerts if a.kind == "refresh")
    finally:
        await service.bus.close()
        await bus.close()
