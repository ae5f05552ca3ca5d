"""The local exchange simulator speaks each exchange's protocol over real sockets."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import websockets
from aiohttp import web

from shared.simulator import Faults, simulator
from tests.collector_helpers import CAPTURES, METADATA, paths, records
from tests.collector_reference import Book


async def _recv_json(ws: websockets.ClientConnection, timeout: float = 5.0) -> object:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_binance_acknowledges_subscriptions_and_streams_combined_frames() -> None:
    async with simulator("binance", paths(CAPTURES["binance"][0])) as sim:
        async with websockets.connect(sim.ws_url + "/stream", close_timeout=0.5) as ws:
            await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@depth@100ms"],"id":7}')
            assert await _recv_json(ws) == {"result": None, "id": 7}
            frame = await _recv_json(ws)
            assert isinstance(frame, dict) and frame["stream"] == "btcusdt@depth@100ms"
            await ws.send('{"method":"NOPE","id":8}')
        async with websockets.connect(sim.ws_url + "/ws/btcusdt@trade", close_timeout=0.5) as raw:
            first = await _recv_json(raw)
            assert isinstance(first, dict) and first["e"] == "trade"  # /ws sends payloads unwrapped


async def test_binance_depth_is_the_recording_first_then_the_book_moved_forward() -> None:
    async with simulator("binance", paths(CAPTURES["binance"][0])) as sim, aiohttp.ClientSession() as http:
        url = sim.rest_url + "/api/v3/depth?symbol=BTCUSDT&limit=1000"
        async with http.get(url) as r:
            first = await r.read()
        async with websockets.connect(sim.ws_url + "/stream?streams=btcusdt@depth@100ms", close_timeout=0.5) as ws:
            diffs = [await _recv_json(ws) for _ in range(30)]
            async with http.get(url) as r:
                later = await r.json()
        async with http.get(sim.rest_url + "/api/v3/depth?symbol=NOPE") as r:
            assert r.status == 400
    assert first.startswith(b'{"lastUpdateId":50093239218,')  # the recorded body, byte for byte
    assert later["lastUpdateId"] >= diffs[-1]["data"]["u"]  # type: ignore[index]
    # The later answer is the recorded snapshot moved forward by every recorded diff up to its id.
    book = Book()
    snap = json.loads(first)
    book.load(snap["bids"], snap["asks"])
    for record in records(CAPTURES["binance"][0]):
        if b"depthUpdate" in record.data[:80]:
            d = json.loads(record.data)["data"]
            if snap["lastUpdateId"] < d["u"] <= later["lastUpdateId"]:
                book.apply(d["b"], d["a"])
    bids, asks = book.top(20)
    assert [(float(p), float(q)) for p, q in later["bids"][:20]] == bids
    assert [(float(p), float(q)) for p, q in later["asks"][:20]] == asks


async def test_okx_answers_ping_and_sends_a_consistent_snapshot_on_resubscription() -> None:
    async with simulator("okx", paths(CAPTURES["okx"][0])) as sim, \
            websockets.connect(sim.ws_url + "/ws/v5/public", close_timeout=0.5) as ws:
        await ws.send("ping")
        assert await asyncio.wait_for(ws.recv(), 5) == "pong"
        sub = '{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}'
        await ws.send(sub)
        ack = await _recv_json(ws)
        assert ack == {"event": "subscribe", "arg": {"channel": "books", "instId": "BTC-USDT"}, "connId": ack["connId"]}  # type: ignore[index]
        for _ in range(20):
            await ws.recv()
        await ws.send('{"op":"unsubscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}')
        await ws.send(sub)
        snapshot = None
        while snapshot is None:
            msg = await _recv_json(ws)
            if isinstance(msg, dict) and msg.get("action") == "snapshot":
                snapshot = msg
        data = snapshot["data"][0]
        book = Book()
        book.load(data["bids"], data["asks"])
        assert book.okx_checksum() == data["checksum"]


async def test_upbit_streams_binary_frames_in_the_format_asked_and_answers_ping() -> None:
    async with simulator("upbit", paths(CAPTURES["upbit"][0])) as sim, \
            websockets.connect(sim.ws_url + "/websocket/v1", close_timeout=0.5) as ws:
        await ws.send("PING")
        assert await asyncio.wait_for(ws.recv(), 5) == b'{"status":"UP"}'
        await ws.send('[{"ticket":"t"},{"type":"orderbook","codes":["KRW-LAMB.15"]},{"format":"DEFAULT"}]')
        frame = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(frame, bytes)
        msg = json.loads(frame)
        assert msg["type"] == "orderbook" and msg["code"] == "KRW-LAMB" and "ask_price" in msg["orderbook_units"][0]


async def test_bybit_answers_ping_and_subscribe_like_v5() -> None:
    async with simulator("bybit", paths(CAPTURES["bybit"][1])) as sim, \
            websockets.connect(sim.ws_url + "/v5/public/spot", close_timeout=0.5) as ws:
        await ws.send('{"op":"ping","req_id":"p1"}')
        pong = await _recv_json(ws)
        assert isinstance(pong, dict) and (pong["ret_msg"], pong["req_id"], pong["success"]) == ("pong", "p1", True)
        await ws.send('{"op":"subscribe","args":["orderbook.1.OPUSDC"],"req_id":"s"}')
        assert (await _recv_json(ws))["ret_msg"] == "subscribe"  # type: ignore[index]
        frame = await _recv_json(ws)
        assert isinstance(frame, dict) and frame["topic"] == "orderbook.1.OPUSDC"


async def test_extra_rest_routes_plug_into_the_same_server() -> None:
    async def place(request: web.Request) -> web.Response:
        return web.json_response({"orderId": 1, "symbol": (await request.post()).get("symbol")})

    def routes(app: web.Application) -> None:
        app.router.add_post("/api/v3/order", place)

    async with simulator("binance", paths([METADATA["binance"]]), extra_routes=[routes]) as sim, \
            aiohttp.ClientSession() as http:
        async with http.post(sim.rest_url + "/api/v3/order", data={"symbol": "BTCUSDT"}) as r:
            assert await r.json() == {"orderId": 1, "symbol": "BTCUSDT"}
        async with http.get(sim.rest_url + "/api/v3/exchangeInfo") as r:
            assert (await r.json())["timezone"] == "UTC"  # recorded body still served
        async with http.get(sim.rest_url + "/api/v3/unknown") as r:
            assert r.status == 404


async def test_faults_drop_frames_and_close_connections_where_asked() -> None:
    sim = simulator("okx", paths(CAPTURES["okx"][0]))
    books = sim.indices(lambda r: b'"instId":"BTC-USDT"},"action"' in r.data[:80])
    sim.faults = Faults(drop={books[1]}, close_at={books[3]})
    async with sim, websockets.connect(sim.ws_url + "/ws/v5/public", close_timeout=0.5) as ws:
        await ws.send('{"op":"subscribe","args":[{"channel":"books","instId":"BTC-USDT"}]}')
        got = []
        try:
            while True:
                msg = await _recv_json(ws)
                if isinstance(msg, dict) and "action" in msg:
                    got.append(msg)
        except websockets.ConnectionClosed:
            pass
        assert len(got) == 3  # books[0], books[2], books[3]: then closed
        assert sim.sent[-1] == books[3] and books[1] not in sim.sent
