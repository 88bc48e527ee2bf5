"""Standard Connect/gRPC tooling against the gateway, routed by authority like a real client of
`49983-<id>.<domain>`: grpcurl and buf curl through server reflection, a grpcio client and a
connectrpc client from gen/ (gRPC over h2c, Connect over HTTP/1.1)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType
from filesystem import filesystem_connect, filesystem_pb2, filesystem_pb2_grpc
from fixtures import REPO
from fixtures.gateway import RunningGateway, start_gateway

from coppice_envd.testing import StaticLookup, make_sandbox

GRPCURL = Path(sys.executable).parent / "grpcurl"
BUF = REPO / "tests/node/node_modules/.bin/buf"
AUTHORITY = "49983-tools1.coppice.lan"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    base = tmp_path_factory.mktemp("tools")
    decoy = make_sandbox(base / "decoy")
    target = make_sandbox(base / "tools1")
    (base / "tools1/root/only-in-tools1").write_text("x")
    # The decoy is the most recent: only authority routing reaches tools1.
    with start_gateway(StaticLookup([target, decoy])) as gw:
        yield gw


def _run(*argv: str | Path) -> str:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_reflection(gateway: RunningGateway) -> None:
    address = f"127.0.0.1:{gateway.port}"
    base: list[str | Path] = [GRPCURL, "-plaintext", "-authority", AUTHORITY]
    services = _run(*base, address, "list").split()
    assert {"filesystem.Filesystem", "process.Process"} <= set(services)
    described = _run(*base, address, "describe", "filesystem.Filesystem")
    assert "rpc ListDir ( .filesystem.ListDirRequest ) returns ( .filesystem.ListDirResponse )" in (
        described
    )
    assert "rpc Start" in _run(*base, address, "describe", "process.Process")
    out = _run(*base, "-d", '{"path": "/root"}', address, "filesystem.Filesystem/ListDir")
    assert [e["name"] for e in json.loads(out)["entries"]] == ["only-in-tools1"]


def test_buf_curl_connect_and_grpc(gateway: RunningGateway) -> None:
    url = f"http://127.0.0.1:{gateway.port}/filesystem.Filesystem/ListDir"
    connect = _run(
        BUF, "curl", "--protocol", "connect", "-H", f"Host: {AUTHORITY}",
        "--reflect-header", f"Host: {AUTHORITY}", "-d", '{"path": "/root"}', url,
    )  # fmt: skip
    assert [e["name"] for e in json.loads(connect)["entries"]] == ["only-in-tools1"]
    # h2 has no Host header to set; the authority comes from the sandbox id header instead.
    grpc_out = _run(
        BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge",
        "-H", "E2b-Sandbox-Id: tools1", "--reflect-header", "E2b-Sandbox-Id: tools1",
        "-d", '{"path": "/root"}', url,
    )  # fmt: skip
    assert [e["name"] for e in json.loads(grpc_out)["entries"]] == ["only-in-tools1"]


def test_grpcio_client(gateway: RunningGateway) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{gateway.port}", options=[("grpc.default_authority", AUTHORITY)]
    ) as channel:
        stub = filesystem_pb2_grpc.FilesystemStub(channel)  # type: ignore[no-untyped-call]
        response = stub.ListDir(filesystem_pb2.ListDirRequest(path="/root"), timeout=30)
        assert [e.name for e in response.entries] == ["only-in-tools1"]
        with pytest.raises(grpc.RpcError) as raised:
            stub.Stat(filesystem_pb2.StatRequest(path="/nope"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_connectrpc_client(gateway: RunningGateway) -> None:
    headers = {"e2b-sandbox-id": "tools1"}
    for protocol in (ProtocolType.CONNECT, ProtocolType.GRPC_WEB):
        client = filesystem_connect.FilesystemClientSync(gateway.url, protocol=protocol)
        response = client.list_dir(filesystem_pb2.ListDirRequest(path="/root"), headers=headers)
        assert [e.name for e in response.entries] == ["only-in-tools1"]
        with pytest.raises(ConnectError) as raised:
            client.make_dir(filesystem_pb2.MakeDirRequest(path="/root"), headers=headers)
        assert raised.value.code == Code.ALREADY_EXISTS
