"""The REST app over a manager with in-memory fake backends: every endpoint, status codes, error
JSON, and bad input that leaves nothing behind."""

from __future__ import annotations

import io
import json
import re
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from coppice_api.app import build_app
from coppice_api.auth import load_api_keys, read_api_keys
from coppice_api.openapi import openapi_document
from coppice_jails.manager import SandboxManager
from coppice_jails.testing import Backends

KEY = "e2b_" + "ab" * 20
DOMAIN = "coppice.lan"


@dataclass
class Api:
    client: TestClient[Any, Any]
    backends: Backends
    manager: SandboxManager

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": KEY}

    async def call(self, method: str, path: str, **kwargs: Any) -> ClientResponse:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def create(self, **body: Any) -> dict[str, Any]:
        response = await self.call("POST", "/v2/sandboxes", json={"templateID": "base", **body})
        assert response.status == 201, await response.text()
        created: dict[str, Any] = await response.json()
        return created

    def assert_nothing_left(self) -> None:
        assert self.backends.storage.sandboxes == {}
        assert self.backends.runtime.jails == {}
        assert self.backends.runtime.leftovers == set()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    backends = Backends(tmp_path)
    async with backends.manager() as manager:
        app = build_app(manager, [KEY, "e2b_other"], DOMAIN)
        async with TestClient(TestServer(app)) as client:
            yield Api(client, backends, manager)


async def error_of(response: ClientResponse, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["code"] == status
    assert isinstance(body["message"], str)
    message: str = body["message"]
    return message


async def test_health_needs_no_key(api: Api) -> None:
    response = await api.client.get("/health")
    assert response.status == 200
    assert await response.text() == "Health check successful"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "e2b_wrong"}, {"X-API-Key": ""}])
async def test_wrong_or_missing_key_is_401_json(api: Api, headers: dict[str, str]) -> None:
    response = await api.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=headers)
    assert "API key" in await error_of(response, 401)
    api.assert_nothing_left()


async def test_every_configured_key_works(api: Api) -> None:
    response = await api.client.get("/v2/sandboxes", headers={"x-api-key": "e2b_other"})
    assert response.status == 200


async def test_create_answers_what_the_sdks_need(api: Api) -> None:
    body = await api.create(metadata={"k": "v"}, envVars={"A": "1"}, timeout=60)
    assert re.fullmatch(r"[a-z0-9]{20,}", body["sandboxID"])
    assert body["templateID"] == "base"
    assert body["clientID"] == "6532622b"
    assert body["envdVersion"] == "0.6.13"
    assert body["domain"] == DOMAIN
    assert len(body["envdAccessToken"]) >= 32  # v2: every sandbox is secured
    record = await api.manager.get(body["sandboxID"])
    assert record.metadata == {"k": "v"}
    assert record.env_vars == {"A": "1"}
    assert record.end_at - record.started_at == 60


async def test_seed_curl_create_on_v1_path_with_alias(api: Api) -> None:
    response = await api.call("POST", "/sandboxes", data=b'{"templateID":"default"}')
    assert response.status == 201
    body = await response.json()
    assert body["templateID"] == "base"
    assert body["alias"] == "default"


async def test_v1_create_is_secured_on_request_only(api: Api) -> None:
    plain = await api.call("POST", "/sandboxes", json={"templateID": "base"})
    assert "envdAccessToken" not in await plain.json()
    response = await api.call("POST", "/sandboxes", json={"templateID": "base", "secure": True})
    body = await response.json()
    assert len(body["envdAccessToken"]) >= 32
    detail = await (await api.call("GET", f"/sandboxes/{body['sandboxID']}")).json()
    assert detail["envdAccessToken"] == body["envdAccessToken"]


async def test_chunked_request_body_works(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"templateID":'
        yield b'"base","metadata":{"via":"chunked"}}'

    response = await api.call(
        "POST", "/v2/sandboxes", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status == 201, await response.text()
    assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
    sandbox_id = (await response.json())["sandboxID"]
    assert (await api.manager.get(sandbox_id)).metadata == {"via": "chunked"}


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{not json", 400, "parsing"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "object"),
        (b'{"timeout": 5}', 400, "templateID"),
        (b'{"templateID": 5}', 400, "templateID"),
        (b'{"templateID": "base", "timeout": "60"}', 400, "timeout"),
        (b'{"templateID": "base", "timeout": true}', 400, "timeout"),
        (b'{"templateID": "base", "timeout": -1}', 400, "Timeout"),
        (b'{"templateID": "base", "timeout": 0}', 400, "Timeout"),
        (b'{"templateID": "base", "timeout": 99999999}', 400, "Timeout"),
        (b'{"templateID": "base", "metadata": ["a"]}', 400, "metadata"),
        (b'{"templateID": "base", "metadata": {"a": 1}}', 400, "metadata.a"),
        (b'{"templateID": "base", "envVars": {"A": null}}', 400, "envVars.A"),
        (b'{"templateID": "base", "envVars": {"A=B": "x"}}', 400, "envVars"),
        (b'{"templateID": "base", "secure": "yes"}', 400, "secure"),
        (b'{"templateID": "nope"}', 404, "available: base, code-interpreter-v1, default"),
    ],
)
async def test_bad_create_input_is_4xx_json_and_leaves_nothing(
    api: Api, body: bytes, status: int, names: str
) -> None:
    response = await api.call("POST", "/v2/sandboxes", data=body)
    assert names in await error_of(response, status)
    api.assert_nothing_left()
    assert (await api.manager.registry.all_sandboxes()) == []


async def test_huge_metadata_and_bodies_are_refused(api: Api) -> None:
    many = {f"k{i}": "v" for i in range(1000)}
    response = await api.call(
        "POST", "/v2/sandboxes", json={"templateID": "base", "metadata": many}
    )
    assert "metadata" in await error_of(response, 400)
    long_value = {"k": "v" * 100_000}
    response = await api.call(
        "POST", "/v2/sandboxes", json={"templateID": "base", "metadata": long_value}
    )
    assert "metadata.k" in await error_of(response, 400)
    huge = json.dumps({"templateID": "base", "envVars": {"A": "x" * 2_000_000}}).encode()
    response = await api.call("POST", "/v2/sandboxes", data=io.BytesIO(huge))
    await error_of(response, 413)
    api.assert_nothing_left()


async def test_backend_failure_is_500_json_and_rolled_back(api: Api) -> None:
    api.backends.runtime.fail_start = True
    response = await api.call("POST", "/v2/sandboxes", json={"templateID": "base"})
    assert "jail start failed" in await error_of(response, 500)
    api.assert_nothing_left()


async def test_get_detail_and_unknown_ids(api: Api) -> None:
    created = await api.create(metadata={"a": "b"})
    sandbox_id = created["sandboxID"]
    response = await api.call("GET", f"/sandboxes/{sandbox_id}")
    assert response.status == 200
    detail = await response.json()
    for field in ("startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "envdVersion"):
        assert field in detail
    assert detail["state"] == "running"
    assert detail["metadata"] == {"a": "b"}
    assert detail["domain"] == DOMAIN
    assert detail["startedAt"].endswith("Z")
    legacy = await api.call("GET", f"/sandboxes/{sandbox_id}-6532622b")
    assert (await legacy.json())["sandboxID"] == sandbox_id

    missing = await api.call("GET", "/sandboxes/nosuchsandbox")
    assert await error_of(missing, 404) == (
        "Sandbox \"nosuchsandbox\" doesn't exist or you don't have access to it"
    )
    assert await error_of(await api.call("GET", "/sandboxes/Bad.ID"), 400) == "Invalid sandbox ID"
    await error_of(await api.call("GET", "/no/such/route"), 404)
    await error_of(await api.call("PUT", "/v2/sandboxes"), 405)


async def test_kill_is_204_then_404(api: Api) -> None:
    sandbox_id = (await api.create())["sandboxID"]
    assert (await api.call("DELETE", f"/sandboxes/{sandbox_id}")).status == 204
    await error_of(await api.call("DELETE", f"/sandboxes/{sandbox_id}"), 404)
    api.assert_nothing_left()


async def test_list_v2_pages_filters_and_headers(api: Api) -> None:
    ids = [(await api.create(metadata={"n": str(i), "k": "v w&x"}))["sandboxID"] for i in range(5)]
    await api.call("POST", f"/sandboxes/{ids[0]}/pause")
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params = {"limit": "2", **({"nextToken": token} if token else {})}
        response = await api.call("GET", "/v2/sandboxes", params=params)
        assert response.status == 200
        assert response.headers["X-Total-Running"] == "4"
        seen += [s["sandboxID"] for s in await response.json()]
        pages += 1
        token = response.headers.get("x-next-token")
        if token is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids)

    # The SDKs percent-encode keys and values inside the (again encoded) metadata parameter.
    inner = urllib.parse.urlencode({urllib.parse.quote("k"): urllib.parse.quote("v w&x")})
    response = await api.call("GET", "/v2/sandboxes", params={"metadata": inner})
    assert len(await response.json()) == 5
    inner = urllib.parse.urlencode({"n": "3"})
    response = await api.call("GET", "/v2/sandboxes", params={"metadata": inner})
    assert [s["sandboxID"] for s in await response.json()] == [ids[3]]
    response = await api.call("GET", "/v2/sandboxes", params={"state": "paused"})
    assert [(s["sandboxID"], s["state"]) for s in await response.json()] == [(ids[0], "paused")]
    response = await api.call("GET", "/v2/sandboxes", params={"state": "running,paused"})
    assert len(await response.json()) == 5

    for params in ({"state": "dead"}, {"limit": "0"}, {"limit": "x"}, {"nextToken": "!!"}):
        await error_of(await api.call("GET", "/v2/sandboxes", params=params), 400)


async def test_list_v1_shows_running_only(api: Api) -> None:
    running = (await api.create(metadata={"t": "1"}))["sandboxID"]
    paused = (await api.create(metadata={"t": "1"}))["sandboxID"]
    await api.call("POST", f"/sandboxes/{paused}/pause")
    response = await api.call("GET", "/sandboxes", params={"metadata": "t=1"})
    assert [s["sandboxID"] for s in await response.json()] == [running]


async def test_timeout_and_refreshes(api: Api) -> None:
    sandbox_id = (await api.create(timeout=600))["sandboxID"]
    path = f"/sandboxes/{sandbox_id}"
    response = await api.call("POST", f"{path}/timeout", json={"timeout": 30})
    assert response.status == 204
    record = await api.manager.get(sandbox_id)
    assert record.end_at - record.started_at < 60
    assert "timeout" in await error_of(
        await api.call("POST", f"{path}/timeout", json={"timeout": -5}), 400
    )
    assert "timeout" in await error_of(await api.call("POST", f"{path}/timeout", json={}), 400)
    await error_of(
        await api.call("POST", "/sandboxes/nosuchsandbox/timeout", json={"timeout": 5}), 404
    )
    assert (await api.call("POST", f"{path}/refreshes", json={"duration": 3000})).status == 204
    assert (await api.manager.get(sandbox_id)).end_at > record.end_at + 2000
    assert (await api.call("POST", f"{path}/refreshes")).status == 204
    await error_of(await api.call("POST", f"{path}/refreshes", json={"duration": 4000}), 400)


async def test_pause_connect_and_resume(api: Api) -> None:
    created = await api.create(secure=True)
    path = f"/sandboxes/{created['sandboxID']}"
    assert (await api.call("POST", f"{path}/pause")).status == 204
    assert api.backends.runtime.jails[created["sandboxID"]].frozen
    assert "already paused" in await error_of(await api.call("POST", f"{path}/pause"), 409)

    response = await api.call("POST", f"/v2{path}/connect", json={"timeout": 60})
    assert response.status == 201
    body = await response.json()
    assert body["sandboxID"] == created["sandboxID"]
    assert body["envdAccessToken"] == created["envdAccessToken"]
    assert not api.backends.runtime.jails[created["sandboxID"]].frozen
    assert (await api.call("POST", f"/v2{path}/connect", json={"timeout": 60})).status == 200
    assert (await api.call("POST", f"{path}/connect", json={"timeout": 60})).status == 200
    assert (await api.call("POST", f"{path}/connect")).status == 200

    await error_of(await api.call("POST", f"{path}/resume"), 409)
    await api.call("POST", f"{path}/pause", json={"memory": True})
    response = await api.call("POST", f"{path}/resume", json={"timeout": 30})
    assert response.status == 201
    await error_of(await api.call("POST", "/v2/sandboxes/nosuchsandbox/connect", json={}), 404)


async def test_snapshots_and_templates(api: Api) -> None:
    source = (await api.create())["sandboxID"]
    response = await api.call("POST", f"/sandboxes/{source}/snapshots", json={"name": "team/s:v1"})
    assert response.status == 201
    snapshot = await response.json()
    assert snapshot["names"] == ["team/s:v1"]
    unnamed = await (await api.call("POST", f"/sandboxes/{source}/snapshots")).json()
    assert unnamed["names"] == []

    child = await api.create(templateID=snapshot["snapshotID"])
    assert child["templateID"] == snapshot["snapshotID"]

    listed = await (await api.call("GET", "/snapshots", params={"sandboxID": source})).json()
    assert {s["snapshotID"] for s in listed} == {snapshot["snapshotID"], unnamed["snapshotID"]}
    page = await api.call("GET", "/snapshots", params={"limit": "1"})
    assert len(await page.json()) == 1
    assert page.headers.get("X-Next-Token")

    templates = await (await api.call("GET", "/templates")).json()
    assert {t["templateID"] for t in templates} == {
        "base",
        "code-interpreter-v1",
        snapshot["snapshotID"],
        unnamed["snapshotID"],
    }
    assert next(t for t in templates if t["templateID"] == "base")["aliases"] == ["default"]
    detail = await (await api.call("GET", "/templates/default")).json()
    assert detail["templateID"] == "base"
    assert detail["builds"][0]["status"] == "ready"
    await error_of(await api.call("GET", "/templates/nope"), 404)

    in_use = await api.call("DELETE", f"/templates/{snapshot['snapshotID']}")
    assert "used by" in await error_of(in_use, 409)
    await api.call("DELETE", f"/sandboxes/{child['sandboxID']}")
    encoded = urllib.parse.quote("team/s:v1", safe="")
    assert (await api.call("DELETE", f"/templates/{encoded}")).status == 204
    await error_of(await api.call("DELETE", f"/templates/{snapshot['snapshotID']}"), 404)
    assert snapshot["snapshotID"] not in api.backends.storage.templates


async def test_fork_answers_one_result_per_sandbox(api: Api) -> None:
    parent = (await api.create(metadata={"p": "1"}))["sandboxID"]
    response = await api.call("POST", f"/sandboxes/{parent}/fork", json={"count": 2, "timeout": 60})
    assert response.status == 201
    results = await response.json()
    assert len(results) == 2
    assert all("sandbox" in r and r["sandbox"]["envdVersion"] == "0.6.13" for r in results)
    api.backends.runtime.fail_start = True
    results = await (await api.call("POST", f"/sandboxes/{parent}/fork")).json()
    assert results[0]["error"]["code"] == 500
    await error_of(await api.call("POST", f"/sandboxes/{parent}/fork", json={"count": 0}), 400)
    await error_of(await api.call("POST", "/sandboxes/nosuchsandbox/fork", json={}), 404)


async def test_metrics(api: Api) -> None:
    sandbox_id = (await api.create())["sandboxID"]
    metrics = await (await api.call("GET", f"/sandboxes/{sandbox_id}/metrics")).json()
    assert metrics[0]["memUsed"] == 10 * 1024 * 1024
    assert set(metrics[0]) >= {"timestamp", "timestampUnix", "cpuUsedPct", "diskTotal"}
    both = await api.call("GET", "/sandboxes/metrics", params={"sandbox_ids": f"{sandbox_id},x"})
    assert list((await both.json())["sandboxes"]) == [sandbox_id]
    assert metrics[0]["diskUsed"] > 0
    start = metrics[0]["timestampUnix"]
    window = {"start": str(start), "end": str(start)}
    assert await (await api.call("GET", f"/sandboxes/{sandbox_id}/metrics", params=window)).json()
    before = {"start": str(start - 3600), "end": str(start - 1800)}
    path = f"/sandboxes/{sandbox_id}/metrics"
    assert await (await api.call("GET", path, params=before)).json() == []
    await api.call("POST", f"/sandboxes/{sandbox_id}/pause")  # what was sampled stays
    assert (await (await api.call("GET", path)).json())[: len(metrics)] == metrics
    await error_of(await api.call("GET", "/sandboxes/nosuchsandbox/metrics"), 404)


async def test_logs_v1_and_v2(api: Api) -> None:
    sandbox_id = (await api.create())["sandboxID"]
    await api.call("POST", f"/sandboxes/{sandbox_id}/pause")
    await api.manager.registry.append_event(sandbox_id, "info", "process started", {"pid": "7"})
    v1 = await (await api.call("GET", f"/sandboxes/{sandbox_id}/logs")).json()
    assert [entry["line"] for entry in v1["logs"]] == [
        "sandbox created",
        "sandbox paused",
        "process started",
    ]
    assert v1["logEntries"][2]["fields"] == {"pid": "7"}
    v2 = await api.call(
        "GET",
        f"/v2/sandboxes/{sandbox_id}/logs",
        params={"direction": "backward", "limit": "2", "search": "sandbox"},
    )
    assert [e["message"] for e in (await v2.json())["logs"]] == [
        "sandbox paused",
        "sandbox created",
    ]
    await error_of(await api.call("GET", "/v2/sandboxes/nosuchsandbox/logs"), 404)
    await error_of(await api.call("GET", f"/v2/sandboxes/{sandbox_id}/logs?level=loud"), 400)


def _implemented_routes(api: Api) -> set[tuple[str, str]]:
    routes = set()
    for route in api.client.app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource else ""
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: "{" + m.group(1) + "}", path)
        path = path.replace("{sandbox_id}", "{sandboxID}").replace("{template_id}", "{templateID}")
        routes.add((route.method.lower(), path))
    return routes


async def test_openapi_document_describes_exactly_the_routes(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.")
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == _implemented_routes(api)
    assert document == json.loads(json.dumps(openapi_document(document["servers"][0]["url"])))


def test_api_key_is_created_once_and_kept_private(tmp_path: Path) -> None:
    assert read_api_keys(tmp_path, {}) == ()
    first = load_api_keys(tmp_path, {})
    assert first.created is not None
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", first.created)
    assert (tmp_path / "api-keys").stat().st_mode & 0o777 == 0o600
    second = load_api_keys(tmp_path, {})
    assert second.created is None
    assert second.keys == first.keys
    assert read_api_keys(tmp_path, {}) == first.keys
    from_env = load_api_keys(tmp_path, {"COPPICE_API_KEYS": "a, b,,"})
    assert from_env.keys == ("a", "b")


async def test_no_public_traffic_gives_a_traffic_token(api: Api) -> None:
    """E2B's rule: `network.allowPublicTraffic: false` makes a traffic access token (the proxy
    then asks for it on the sandbox's ports); otherwise there is none."""
    open_body = await api.create(network={"allowPublicTraffic": True})
    assert open_body["trafficAccessToken"] is None
    assert (await api.create())["trafficAccessToken"] is None
    body = await api.create(secure=True, network={"allowPublicTraffic": False})
    token = body["trafficAccessToken"]
    assert isinstance(token, str)
    assert len(token) >= 32
    assert token != body["envdAccessToken"]
    assert (await api.manager.get(body["sandboxID"])).traffic_access_token == token
    detail = await (await api.call("GET", f"/sandboxes/{body['sandboxID']}")).json()
    assert detail["network"] == {"allowPublicTraffic": False}
    connected = await api.call(
        "POST", f"/sandboxes/{body['sandboxID']}/connect", json={"timeout": 60}
    )
    assert (await connected.json())["trafficAccessToken"] == token


@pytest.mark.parametrize("network", [[], "no", {"allowPublicTraffic": "false"}])
async def test_bad_network_is_400(api: Api, network: object) -> None:
    response = await api.call(
        "POST", "/v2/sandboxes", json={"templateID": "base", "network": network}
    )
    assert "network" in await error_of(response, 400)
    api.assert_nothing_left()
