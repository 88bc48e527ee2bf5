"""The gateway app: routing by Host and E2B headers, the interpreter port, the token gate, CORS,
envd's small routes, and bad input that must be answered while the gateway keeps serving."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures.gateway import RunningGateway, connect_unary, envelope, read_envelopes, start_gateway

from coppice_envd.http.asgi import Receive, Scope, Send, send_json
from coppice_envd.request import current_sandbox
from coppice_envd.routing import sandbox_from_host
from coppice_envd.testing import StaticLookup, make_sandbox

STAT = "filesystem.Filesystem/Stat"


def test_sandbox_from_host() -> None:
    assert sandbox_from_host("49983-abc123.coppice.lan") == ("49983", "abc123")
    assert sandbox_from_host("49999-abc123.coppice.lan:49999") == ("49999", "abc123")
    assert sandbox_from_host("8080-x.e2b.app") == ("8080", "x")
    for host in ("localhost:49983", "127.0.0.1:8000", "", "my-host.lan", "49983-.lan", "4-x"):
        assert sandbox_from_host(host) is None, host


async def interpreter_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A stand-in interpreter: tells which sandbox the gateway routed to it."""
    if scope["type"] == "http":
        body = {"interpreter": current_sandbox().sandbox_id, "path": scope["path"]}
        await send_json(send, 200, body)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[RunningGateway, Path, Path]]:
    a_root, b_root = tmp_path / "aaa111", tmp_path / "bbb222"
    lookup = StaticLookup(
        [
            make_sandbox(a_root, env_vars={"A": "1"}),
            make_sandbox(b_root, access_token="tok-b", env_vars={"B": "2"}),
        ]
    )
    (a_root / "root/in-a").write_text("a")
    (b_root / "root/in-b").write_text("b")
    with start_gateway(lookup, interpreter=interpreter_app) as gw:
        yield gw, a_root, b_root


def _names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [e["name"] for e in response.json()["entries"]]


def test_two_sandboxes_by_host_name(two: tuple[RunningGateway, Path, Path]) -> None:
    """The seed's worked example: each sandbox reached by its own Host lists its own /root."""
    gw, _, _ = two
    for port in (49999, 49983):
        a = httpx.get(
            f"{gw.url}/files/list?path=/root",
            headers={"host": f"{port}-aaa111.coppice.lan:{port}"},
        )
        b = httpx.get(
            f"{gw.url}/files/list?path=/root",
            headers={"host": f"{port}-bbb222.coppice.lan:{port}", "x-access-token": "tok-b"},
        )
        assert (_names(a), _names(b)) == (["in-a"], ["in-b"])


def test_header_routing_and_fallbacks(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two

    def root_entries(**headers: str) -> httpx.Response:
        return httpx.get(f"{gw.url}/files/list?path=/root", headers=headers)

    assert _names(root_entries(**{"e2b-sandbox-id": "aaa111", "e2b-sandbox-port": "49983"})) == [
        "in-a"
    ]
    # Nothing names a sandbox (debug mode's id, or none): the most recently started one.
    assert _names(root_entries(**{"e2b-sandbox-id": "debug_sandbox_id", "x-access-token": "tok-b"}))
    assert _names(root_entries(**{"x-access-token": "tok-b"})) == ["in-b"]
    # Worded as E2B's proxy does: the SDKs read "was not found" as a sandbox that is gone.
    gone = {"sandboxId": "gone", "message": "The sandbox was not found", "code": 502}
    for headers, body in (
        ({"host": "49983-gone.coppice.lan"}, gone),
        ({"e2b-sandbox-id": "gone"}, gone),
        (
            {"host": "8080-aaa111.coppice.lan"},
            {
                "sandboxId": "aaa111",
                "port": 8080,
                "message": "The sandbox is running but port is not open",
                "code": 502,
            },
        ),
    ):
        response = root_entries(**headers)
        assert response.status_code == 502
        assert response.json() == body


def test_no_sandbox_at_all_is_502(tmp_path: Path) -> None:
    with start_gateway(StaticLookup([])) as gw:
        response = httpx.get(f"{gw.url}/health")
        assert response.status_code == 502
        assert response.json() == {
            "code": 502,
            "message": "The sandbox was not found: no sandbox is running",
        }


def test_interpreter_port(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two
    response = httpx.post(f"{gw.url}/execute", headers={"host": "49999-aaa111.coppice.lan"})
    assert response.json() == {"interpreter": "aaa111", "path": "/execute"}
    response = httpx.get(
        f"{gw.url}/contexts", headers={"e2b-sandbox-id": "bbb222", "e2b-sandbox-port": "49999"}
    )
    assert response.json() == {"interpreter": "bbb222", "path": "/contexts"}
    # Without a port label the listener's port decides: this one is not 49999, so envd.
    assert httpx.get(f"{gw.url}/health", headers={"e2b-sandbox-id": "aaa111"}).status_code == 204


def test_token_gate(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two
    on_b = {"e2b-sandbox-id": "bbb222"}
    unauthorized = {
        "code": 401,
        "message": "unauthorized access, please provide a valid access token or method "
        "signing if supported",
    }
    assert connect_unary(gw.url, STAT, {"path": "/"}, on_b) == (401, unauthorized)
    status, _ = connect_unary(gw.url, STAT, {"path": "/"}, {**on_b, "x-access-token": "tok-b"})
    assert status == 200
    assert httpx.get(f"{gw.url}/envs", headers=on_b).status_code == 401
    assert httpx.get(f"{gw.url}/health", headers=on_b).status_code == 204
    response = httpx.post(
        f"{gw.url}/filesystem.Filesystem/WatchDir",
        content=envelope({"path": "/"}),
        headers={**on_b, "content-type": "application/connect+json"},
    )
    assert (response.status_code, response.json()) == (401, unauthorized)
    # Sandbox a is open, but b's token opens nothing of a's... and a's nothing of b's.
    assert httpx.get(f"{gw.url}/envs", headers={"e2b-sandbox-id": "aaa111"}).json() == {
        "E2B_SANDBOX": "true",
        "E2B_SANDBOX_ID": "aaa111",
        "A": "1",
    }
    other = {"e2b-sandbox-id": "bbb222", "x-access-token": "tok-a"}
    assert httpx.get(f"{gw.url}/envs", headers=other).status_code == 401
    assert (
        httpx.get(f"{gw.url}/envs", headers={**on_b, "x-access-token": "tok-b"}).json()["B"] == "2"
    )


def test_small_routes(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two
    on_a = {"e2b-sandbox-id": "aaa111"}
    health = httpx.get(f"{gw.url}/health", headers=on_a)
    assert (health.status_code, health.content) == (204, b"")
    assert health.headers["cache-control"] == "no-store"
    metrics = httpx.get(f"{gw.url}/metrics", headers=on_a).json()
    assert {"ts", "cpu_count", "cpu_used_pct", "mem_total", "disk_total", "disk_used"} <= set(
        metrics
    )
    init = httpx.post(f"{gw.url}/init", headers=on_a, json={"envVars": {"X": "1"}})
    assert (init.status_code, init.headers["x-envd-version"]) == (204, "0.6.13")
    assert httpx.post(f"{gw.url}/init", headers=on_a, content=b"{not json").status_code == 400
    on_b = {"e2b-sandbox-id": "bbb222"}
    assert httpx.post(f"{gw.url}/init", headers=on_b, json={"accessToken": "x"}).status_code == 401
    assert httpx.post(
        f"{gw.url}/init", headers=on_b, json={"accessToken": "tok-b"}
    ).status_code == (204)
    assert httpx.post(f"{gw.url}/health", headers=on_a).status_code == 405
    assert httpx.head(f"{gw.url}/health", headers=on_a).status_code == 405
    missing = httpx.get(f"{gw.url}/no/such/route", headers=on_a)
    assert (missing.status_code, missing.text) == (404, "404 page not found\n")


def test_cors(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two
    preflight = httpx.options(
        f"{gw.url}/filesystem.Filesystem/Stat",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-access-token",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert preflight.headers["access-control-allow-methods"] == "POST"
    assert preflight.headers["access-control-allow-headers"] == "content-type,x-access-token"
    assert preflight.headers["access-control-max-age"] == "7200"
    response = httpx.get(
        f"{gw.url}/health", headers={"origin": "https://app.example", "e2b-sandbox-id": "aaa111"}
    )
    assert response.headers["access-control-allow-origin"] == "*"
    assert "Grpc-Status" in response.headers["access-control-expose-headers"]


def test_bad_input_gets_errors_and_the_gateway_keeps_serving(
    two: tuple[RunningGateway, Path, Path],
) -> None:
    gw, _, _ = two
    url = f"{gw.url}/filesystem.Filesystem"
    on_a = {"e2b-sandbox-id": "aaa111"}
    unary = {**on_a, "content-type": "application/json"}
    stream = {**on_a, "content-type": "application/connect+json"}

    bad_json = httpx.post(f"{url}/Stat", headers=unary, content=b"{nope")
    assert (bad_json.status_code, bad_json.json()["code"]) == (400, "invalid_argument")
    empty = httpx.post(f"{url}/Stat", headers=unary, content=b"")
    assert empty.json() == {
        "code": "invalid_argument",
        "message": "zero-length payload is not a valid JSON object",
    }
    wrong_type = httpx.post(
        f"{url}/Stat", headers={**on_a, "content-type": "text/plain"}, content=b"{}"
    )
    assert wrong_type.status_code == 415
    assert "application/json" in wrong_type.headers["accept-post"]
    unary_as_stream = httpx.post(f"{url}/Stat", headers=stream, content=envelope({"path": "/"}))
    assert unary_as_stream.status_code in (200, 415)  # connectrpc serves it enveloped
    oversized = httpx.post(
        f"{url}/Stat", headers=unary, content=json.dumps({"path": "x" * (33 * 1024 * 1024)})
    )
    assert (oversized.status_code, oversized.json()["code"]) == (429, "resource_exhausted")
    bad_gzip = httpx.post(
        f"{url}/Stat", headers={**unary, "content-encoding": "gzip"}, content=b"not gzip"
    )
    assert (bad_gzip.status_code, bad_gzip.json()["code"]) == (400, "invalid_argument")
    bad_gzip_frame = httpx.post(
        f"{url}/WatchDir",
        headers={**stream, "connect-content-encoding": "gzip"},
        content=b"\x01\x00\x00\x00\x03abc",
    )
    ((_, end),) = read_envelopes(bad_gzip_frame.content)
    assert end["error"]["code"] == "invalid_argument"
    bad_timeout = httpx.post(
        f"{url}/Stat", headers={**unary, "connect-timeout-ms": "soon"}, content=b"{}"
    )
    assert bad_timeout.json()["code"] == "invalid_argument"
    unknown_encoding = httpx.post(
        f"{url}/Stat", headers={**unary, "content-encoding": "snappy"}, content=b"{}"
    )
    assert unknown_encoding.json()["code"] == "unimplemented"
    good_gzip = httpx.post(
        f"{url}/Stat",
        headers={**unary, "content-encoding": "gzip"},
        content=gzip.compress(b'{"path":"/root"}'),
    )
    assert good_gzip.json()["entry"]["path"] == "/root"
    truncated = httpx.post(f"{url}/WatchDir", headers=stream, content=envelope({"path": "/"})[:7])
    assert truncated.status_code == 200
    ((flags, end),) = read_envelopes(truncated.content)
    assert flags == 2
    assert end["error"]["code"] in ("invalid_argument", "unimplemented", "internal")
    bad_envelope_json = httpx.post(
        f"{url}/WatchDir", headers=stream, content=b"\x00\x00\x00\x00\x03{x}"
    )
    ((_, end),) = read_envelopes(bad_envelope_json.content)
    assert end["error"]["code"] == "invalid_argument"
    unknown_method = httpx.post(f"{url}/Nope", headers=unary, content=b"{}")
    assert (unknown_method.status_code, unknown_method.text) == (404, "404 page not found\n")
    unknown_service = httpx.post(f"{gw.url}/nope.Nope/Stat", headers=unary, content=b"{}")
    assert unknown_service.status_code == 404
    get = httpx.get(f"{url}/Stat", headers=on_a)
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    bad_protocol = httpx.post(
        f"{url}/Stat", headers={**unary, "connect-protocol-version": "2"}, content=b"{}"
    )
    assert bad_protocol.status_code == 400
    # ...and after all that, a normal call still works.
    assert connect_unary(gw.url, STAT, {"path": "/root"}, on_a)[0] == 200


def test_connect_over_h2c(two: tuple[RunningGateway, Path, Path]) -> None:
    gw, _, _ = two
    with httpx.Client(http1=False, http2=True) as client:
        response = client.post(
            f"{gw.url}/{STAT}",
            headers={"content-type": "application/json", "e2b-sandbox-id": "aaa111"},
            content=b'{"path":"/root/in-a"}',
        )
    assert response.http_version == "HTTP/2"
    assert response.json()["entry"]["name"] == "in-a"


def test_interpreter_lifespan_runs_with_the_gateway(tmp_path: Path) -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        else:
            await interpreter_app(scope, receive, send)

    with start_gateway(StaticLookup([make_sandbox(tmp_path / "s")]), interpreter=app) as gw:
        assert events == ["lifespan.startup"]
        response = httpx.get(f"{gw.url}/contexts", headers={"e2b-sandbox-port": "49999"})
        assert response.json() == {"interpreter": "s", "path": "/contexts"}
    assert events == ["lifespan.startup", "lifespan.shutdown"]
