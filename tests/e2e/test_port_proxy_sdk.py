"""The gateway as the one listener for everything, through the official `e2b` SDK against a real
`coppice serve`: the SDK's API calls reach the lifecycle API through the gateway (Host
`api.<domain>`), and servers started inside a sandbox answer on `<port>-<id>.<domain>` — a
directory listing, a stream that arrives chunk by chunk, a WebSocket echo — and a sandbox made
without public traffic wants its traffic token there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import httpx
import pytest
from e2b import Sandbox
from fixtures.stack import Stack

pytestmark = pytest.mark.slow

DOMAIN = "coppice.lan"
# A tornado app (the code interpreter's template has it, for ipykernel): a WebSocket echo and a
# stream that sends its second chunk only once the test has seen the first.
SERVER = """
import asyncio, os
import tornado.web, tornado.websocket

class Echo(tornado.websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message(("echo " + message) if isinstance(message, str) else message[::-1],
                           binary=not isinstance(message, str))

class Stream(tornado.web.RequestHandler):
    async def get(self):
        self.set_header("content-type", "text/event-stream")
        self.write("data: one\\n\\n")
        await self.flush()
        while not os.path.exists("/tmp/release"):
            await asyncio.sleep(0.05)
        self.write("data: two\\n\\n")

async def main():
    tornado.web.Application([("/ws", Echo), ("/stream", Stream)]).listen(8002)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def _options(stack: Stack) -> dict[str, object]:
    """The SDK's connection, its API calls sent to the gateway as `api.<domain>`."""
    return {
        "api_key": stack.api_key,
        "api_url": stack.sandbox_url,
        "api_headers": {"Host": f"api.{DOMAIN}"},
        "sandbox_url": stack.sandbox_url,
        "domain": DOMAIN,
    }


def _host(sandbox: Sandbox, port: int) -> dict[str, str]:
    return {"host": f"{port}-{sandbox.sandbox_id}.{DOMAIN}"}


def _wait_for_port(stack: Stack, sandbox: Sandbox, port: int, **headers: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.get(stack.sandbox_url + "/", headers={**_host(sandbox, port), **headers})
        if response.status_code != 502:
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port}: {response.text}")


@pytest.fixture(scope="module")
def sbx(coppice_stack: Stack) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(template="code-interpreter-v1", timeout=300, **_options(coppice_stack))  # type: ignore[arg-type]
    try:
        sandbox.files.write("/tmp/site/hello.txt", "hello from the sandbox\n")
        sandbox.commands.run("cd /tmp/site && python3 -m http.server 8001", background=True)
        sandbox.files.write("/tmp/server.py", SERVER)
        sandbox.commands.run("python3 /tmp/server.py", background=True)
        yield sandbox
    finally:
        sandbox.kill()


def test_sdk_lifecycle_through_the_gateway(coppice_stack: Stack, sbx: Sandbox) -> None:
    options = _options(coppice_stack)
    listed = Sandbox.list(**options).next_items()  # type: ignore[arg-type]
    assert sbx.sandbox_id in {s.sandbox_id for s in listed}
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    # An error comes back as the API words it: JSON {code, message}.
    response = httpx.get(
        coppice_stack.sandbox_url + "/sandboxes/nosuchsandbox00000000",
        headers={"host": f"api.{DOMAIN}", "x-api-key": coppice_stack.api_key},
    )
    assert response.status_code == 404
    assert response.json()["code"] == 404
    assert isinstance(response.json()["message"], str)


def test_http_server_in_the_sandbox(coppice_stack: Stack, sbx: Sandbox) -> None:
    _wait_for_port(coppice_stack, sbx, 8001)
    response = httpx.get(coppice_stack.sandbox_url + "/", headers=_host(sbx, 8001))
    assert response.status_code == 200
    assert "hello.txt" in response.text  # http.server's directory listing
    file = httpx.get(coppice_stack.sandbox_url + "/hello.txt", headers=_host(sbx, 8001))
    assert file.text == "hello from the sandbox\n"


def test_nothing_listening_is_e2b_s_502(coppice_stack: Stack, sbx: Sandbox) -> None:
    response = httpx.get(coppice_stack.sandbox_url + "/", headers=_host(sbx, 8999))
    assert response.status_code == 502
    assert response.json() == {
        "message": "The sandbox is running but port is not open",
        "code": 502,
        "sandboxId": sbx.sandbox_id,
        "port": 8999,
    }


def test_a_stream_arrives_chunk_by_chunk(coppice_stack: Stack, sbx: Sandbox) -> None:
    _wait_for_port(coppice_stack, sbx, 8002)
    sbx.commands.run("rm -f /tmp/release")
    url = coppice_stack.sandbox_url + "/stream"
    with httpx.stream("GET", url, headers=_host(sbx, 8002), timeout=30) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        assert next(chunks) == b"data: one\n\n"  # the second is held until /tmp/release exists
        sbx.files.write("/tmp/release", "")
        assert b"".join(chunks) == b"data: two\n\n"


def test_websocket_echo(coppice_stack: Stack, sbx: Sandbox) -> None:
    _wait_for_port(coppice_stack, sbx, 8002)

    async def talk() -> tuple[str, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(coppice_stack.sandbox_url + "/ws", headers=_host(sbx, 8002)) as ws,
        ):
            await ws.send_str("hi")
            text = await ws.receive_str(timeout=10)
            await ws.send_bytes(b"abc")
            return text, await ws.receive_bytes(timeout=10)

    assert asyncio.run(talk()) == ("echo hi", b"cba")


def test_without_public_traffic_the_token_is_required(coppice_stack: Stack) -> None:
    sandbox = Sandbox.create(
        template="code-interpreter-v1",
        timeout=120,
        secure=True,
        network={"allow_public_traffic": False},
        **_options(coppice_stack),  # type: ignore[arg-type]
    )
    try:
        token = sandbox.traffic_access_token
        assert token
        sandbox.commands.run("cd /tmp && python3 -m http.server 8001", background=True)
        _wait_for_port(coppice_stack, sandbox, 8001, **{"e2b-traffic-access-token": token})
        url = coppice_stack.sandbox_url + "/"
        missing = httpx.get(url, headers=_host(sandbox, 8001))
        assert missing.status_code == 403
        assert missing.json() == {
            "sandboxId": sandbox.sandbox_id,
            "message": "Sandbox is secured with traffic access token. "
            "Token header 'e2b-traffic-access-token' is missing",
            "code": 403,
        }
        wrong = httpx.get(url, headers={**_host(sandbox, 8001), "e2b-traffic-access-token": "x"})
        assert wrong.status_code == 403
        right = httpx.get(url, headers={**_host(sandbox, 8001), "e2b-traffic-access-token": token})
        assert right.status_code == 200
        # envd's own port keeps its own gate (the envd access token), not the traffic token.
        assert sandbox.commands.run("echo ok").stdout == "ok\n"
    finally:
        sandbox.kill()
