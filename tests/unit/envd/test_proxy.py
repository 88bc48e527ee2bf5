"""The gateway's proxy to a sandbox's other ports and to the lifecycle API, against a real
upstream server (aiohttp, on loopback, where a stand-in sandbox's jail address points): bodies
streamed both ways, keep-alive reuse, WebSocket, h2 clients, the 502 and 403 answers of E2B's
proxy, and bad input answered while the gateway keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from fixtures.gateway import RunningGateway, start_gateway

from coppice_envd.routing import (
    TRAFFIC_TOKEN_HEADER,
    Route,
    RoutingError,
    is_api_host,
    route_request,
    traffic_refusal,
)
from coppice_envd.sandboxes import SandboxView
from coppice_envd.testing import StaticLookup, make_sandbox

SANDBOX = "sbx123"


@dataclass
class Upstream:
    """A server "inside the sandbox": what it saw, and a gate for the streaming test."""

    port: int
    peers: list[object] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    release_second_chunk: threading.Event = field(default_factory=threading.Event)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _upstream_app(upstream: Upstream) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        upstream.peers.append(peer)
        upstream.seen_headers.append(dict(request.headers))
        return web.Response(
            text=f"hello {request.path_qs}",
            headers={"x-upstream": "yes", "Server": "in-sandbox/1.0"},
        )

    async def echo(request: web.Request) -> web.StreamResponse:
        upstream.seen_headers.append(dict(request.headers))
        response = web.StreamResponse(headers={"x-echo": request.headers.get("x-tag", "")})
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        released = await asyncio.to_thread(upstream.release_second_chunk.wait, 10)
        await response.write(b"data: two\n\n" if released else b"data: timeout\n\n")
        await response.write_eof()
        return response

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse(protocols=("echo.v1",))
        await socket_.prepare(request)
        async for message in socket_:
            if message.type == aiohttp.WSMsgType.TEXT:
                if message.data == "close":
                    await socket_.close(code=4001, message=b"asked to")
                else:
                    await socket_.send_str("echo " + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(message.data[::-1])
        return socket_

    async def no_ws(request: web.Request) -> web.Response:
        return web.json_response({"no": "websocket"}, status=418)

    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", ws)
    app.router.add_get("/no-ws", no_ws)
    return app


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    upstream = Upstream(_free_port())
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_upstream_app(upstream), access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", upstream.port).start()

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def gateway(tmp_path: Path, upstream: Upstream) -> Iterator[RunningGateway]:
    lookup = StaticLookup(
        [
            make_sandbox(tmp_path / SANDBOX),
            _with_traffic_token(make_sandbox(tmp_path / "locked1"), "traffic-secret"),
        ]
    )
    with start_gateway(lookup, api=("127.0.0.1", upstream.port), host_ports=(3000,)) as gw:
        yield gw


def _with_traffic_token(view: SandboxView, token: str) -> SandboxView:
    return dataclasses.replace(view, traffic_access_token=token)


def _host(port: int, sandbox: str = SANDBOX) -> dict[str, str]:
    return {"host": f"{port}-{sandbox}.coppice.lan"}


# Routing, pure -------------------------------------------------------------------------------
def test_api_host_names() -> None:
    assert is_api_host("api.coppice.lan", "coppice.lan")
    assert is_api_host("api.coppice.lan:49443", "coppice.lan:49443")
    assert is_api_host("API.Coppice.LAN:443", "coppice.lan")
    for host in ("49983-x.coppice.lan", "api.other.lan", "api.coppice.lan.evil", "", "[::1]:80"):
        assert not is_api_host(host, "coppice.lan"), host


def test_any_port_routes_and_bad_ports_do_not(tmp_path: Path) -> None:
    lookup = StaticLookup([make_sandbox(tmp_path / SANDBOX)])
    route = route_request(_host(8001), None, lookup)
    assert (route.port, route.proxied) == (8001, True)
    assert not route_request(_host(49983), None, lookup).proxied
    assert not route_request(_host(49999), None, lookup).proxied
    for label in ("0", "65536", "999999999999"):
        with pytest.raises(RoutingError) as caught:
            route_request(_host(0) | {"host": f"{label}-{SANDBOX}.coppice.lan"}, None, lookup)
        assert caught.value.body()["message"] == "The sandbox is running but port is not open"


def test_traffic_refusal_wording(tmp_path: Path) -> None:
    view = _with_traffic_token(make_sandbox(tmp_path / SANDBOX), "t0k")
    route = Route(sandbox=view, port=8001)
    assert traffic_refusal(route, {TRAFFIC_TOKEN_HEADER: "t0k"}) is None
    assert traffic_refusal(route, {}) == {
        "sandboxId": SANDBOX,
        "message": "Sandbox is secured with traffic access token. "
        "Token header 'e2b-traffic-access-token' is missing",
        "code": 403,
    }
    wrong = traffic_refusal(route, {TRAFFIC_TOKEN_HEADER: "nope"})
    assert wrong is not None
    assert "is invalid" in str(wrong["message"])
    # envd's port has its own access token; the interpreter's needs the traffic token as upstream.
    assert traffic_refusal(Route(sandbox=view, port=49983), {}) is None
    assert traffic_refusal(Route(sandbox=view, port=49999), {}) is not None


# HTTP through the gateway --------------------------------------------------------------------
def test_get_is_proxied_unchanged(gateway: RunningGateway, upstream: Upstream) -> None:
    response = httpx.get(
        f"{gateway.url}/hello?a=1&b=%20",
        headers={
            **_host(upstream.port),
            "origin": "http://x",
            "connection": "keep-alive, x-hop",
            "x-hop": "1",
            "x-end": "2",
        },
    )
    assert response.status_code == 200
    assert response.text == "hello /hello?a=1&b=%20"
    assert response.headers["x-upstream"] == "yes"
    assert response.headers.get_list("server") == ["in-sandbox/1.0"]
    assert "access-control-allow-origin" not in response.headers  # envd's CORS is not added
    seen = upstream.seen_headers[-1]
    assert seen["Host"] == f"{upstream.port}-{SANDBOX}.coppice.lan"
    assert seen["x-end"] == "2"
    assert "x-hop" not in seen


def test_upload_streams_through_chunked(gateway: RunningGateway, upstream: Upstream) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(blob), 100_000):
            yield blob[offset : offset + 100_000]

    response = httpx.post(
        f"{gateway.url}/echo", content=chunks(), headers={**_host(upstream.port), "x-tag": "t"}
    )
    assert response.status_code == 200
    assert response.content == blob
    assert response.headers["x-echo"] == "t"
    assert upstream.seen_headers[-1].get("Transfer-Encoding") == "chunked"
    sized = httpx.post(f"{gateway.url}/echo", content=b"abc", headers=_host(upstream.port))
    assert sized.content == b"abc"
    assert upstream.seen_headers[-1]["Content-Length"] == "3"


def test_streaming_response_arrives_chunk_by_chunk(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    upstream.release_second_chunk.clear()
    with httpx.stream("GET", f"{gateway.url}/stream", headers=_host(upstream.port)) as response:
        assert response.headers["content-type"] == "text/event-stream"
        parts = response.iter_raw()
        assert next(parts) == b"data: one\n\n"  # while the server still holds the second
        upstream.release_second_chunk.set()
        assert b"".join(parts) == b"data: two\n\n"


def test_keep_alive_reuses_the_upstream_connection(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    with httpx.Client() as client:
        before = len(upstream.peers)
        for _ in range(5):
            assert (
                client.get(f"{gateway.url}/hello", headers=_host(upstream.port)).status_code == 200
            )
    assert len(set(upstream.peers[before:])) == 1


def test_h2_client_is_proxied(gateway: RunningGateway, upstream: Upstream) -> None:
    with httpx.Client(http1=False, http2=True) as client:
        response = client.post(
            f"{gateway.url}/echo", content=b"over h2", headers=_host(upstream.port)
        )
        assert response.http_version == "HTTP/2"
        assert (response.status_code, response.content) == (200, b"over h2")
        response = client.get(f"{gateway.url}/hello", headers=_host(upstream.port))
        assert response.text == "hello /hello"


def test_nothing_listening_is_502_as_e2b(gateway: RunningGateway) -> None:
    port = _free_port()
    for _ in range(2):  # and the gateway keeps serving
        response = httpx.get(f"{gateway.url}/", headers=_host(port))
        assert response.status_code == 502
        assert response.json() == {
            "message": "The sandbox is running but port is not open",
            "code": 502,
            "sandboxId": SANDBOX,
            "port": port,
        }
    # One of the service's own ports is never reached through a jail on the host's loopback.
    assert httpx.get(f"{gateway.url}/", headers=_host(3000)).status_code == 502
    assert httpx.get(f"{gateway.url}/health", headers=_host(49983)).status_code == 204


def test_traffic_token_is_required_on_proxied_ports(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    url = f"{gateway.url}/hello"
    missing = httpx.get(url, headers=_host(upstream.port, "locked1"))
    assert missing.status_code == 403
    assert missing.json()["message"].endswith("Token header 'e2b-traffic-access-token' is missing")
    wrong = httpx.get(url, headers={**_host(upstream.port, "locked1"), TRAFFIC_TOKEN_HEADER: "x"})
    assert wrong.status_code == 403
    assert "invalid" in wrong.json()["message"]
    right = httpx.get(
        url, headers={**_host(upstream.port, "locked1"), TRAFFIC_TOKEN_HEADER: "traffic-secret"}
    )
    assert right.status_code == 200
    envd = httpx.get(f"{gateway.url}/health", headers=_host(49983, "locked1"))
    assert envd.status_code == 204


def test_api_host_goes_to_the_api(gateway: RunningGateway, upstream: Upstream) -> None:
    response = httpx.get(f"{gateway.url}/hello", headers={"host": "api.coppice.lan:1234"})
    assert (response.status_code, response.text) == (200, "hello /hello")
    assert upstream.seen_headers[-1]["Host"] == "api.coppice.lan:1234"


def test_api_down_is_a_json_502(tmp_path: Path) -> None:
    lookup = StaticLookup([make_sandbox(tmp_path / SANDBOX)])
    with start_gateway(lookup, api=("127.0.0.1", _free_port())) as gw:
        response = httpx.get(f"{gw.url}/v2/sandboxes", headers={"host": "api.coppice.lan"})
        assert response.status_code == 502
        assert response.json() == {"code": 502, "message": "The sandbox API is not reachable"}


def test_client_that_leaves_mid_stream_frees_the_gateway(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    upstream.release_second_chunk.clear()
    with httpx.stream("GET", f"{gateway.url}/stream", headers=_host(upstream.port)) as response:
        assert next(response.iter_raw()) == b"data: one\n\n"
    upstream.release_second_chunk.set()
    time.sleep(0.1)
    assert httpx.get(f"{gateway.url}/hello", headers=_host(upstream.port)).status_code == 200


# WebSocket through the gateway ---------------------------------------------------------------
async def test_websocket_echo(gateway: RunningGateway, upstream: Upstream) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{gateway.url}/ws", headers=_host(upstream.port), protocols=("echo.v1",)
        ) as ws,
    ):
        assert ws.protocol == "echo.v1"
        await ws.send_str("hi")
        assert await ws.receive_str(timeout=5) == "echo hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert await ws.receive_bytes(timeout=5) == b"\x03\x02\x01"
        await ws.send_str("close")
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001


async def test_websocket_refusals(gateway: RunningGateway, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(f"{gateway.url}/no-ws", headers=_host(upstream.port))
        assert caught.value.status == 418
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(f"{gateway.url}/ws", headers=_host(_free_port()))
        assert caught.value.status == 502
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(f"{gateway.url}/ws", headers=_host(upstream.port, "locked1"))
        assert caught.value.status == 403
        async with session.ws_connect(
            f"{gateway.url}/ws",
            headers={**_host(upstream.port, "locked1"), TRAFFIC_TOKEN_HEADER: "traffic-secret"},
        ) as ws:
            await ws.send_str("ok")
            assert await ws.receive_str(timeout=5) == "echo ok"
