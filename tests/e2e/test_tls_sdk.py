"""End to end: the official Python and Node SDKs reach `coppice serve --tls`'s gateway over TLS,
trusting our local CA only through what `coppice env --tls --json` prints."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import REPO
from fixtures.stack import COPPICE, Stack, running_stack

pytestmark = pytest.mark.slow

# Run in a fresh interpreter: the SDK's transports (rustls with the native roots) read
# SSL_CERT_FILE once per process, and other tests' SDK calls share this one.
CLIENT = """
from e2b import Sandbox
with Sandbox.create(template="base", timeout=60) as sandbox:
    print(sandbox.commands.run("echo ok").stdout, end="")
    sandbox.files.write("/home/user/tls.txt", "over tls")
    print(sandbox.files.read("/home/user/tls.txt"))
"""


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[Stack]:
    with running_stack(tls=True) as stack:
        yield stack


def _coppice_env_output(stack: Stack, output: str) -> str:
    """`coppice env --tls OUTPUT` with the ports this stack was started with."""
    assert stack.tls_port is not None
    argv: list[str | Path] = [COPPICE, "env", "--data-dir", str(stack.data_dir), output, "--tls"]
    argv += ["--tls-port", str(stack.tls_port), "--api-port", str(stack.api_port)]
    argv += ["--gateway-port", str(stack.envd_port)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _coppice_env(stack: Stack) -> dict[str, str]:
    env: dict[str, str] = json.loads(_coppice_env_output(stack, "--json"))
    return env


def _run_client(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SSL_CERT"))}
    return subprocess.run(
        [sys.executable, "-c", CLIENT],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_coppice_env_points_the_sdk_at_the_tls_gateway(tls_stack: Stack) -> None:
    env = _coppice_env(tls_stack)
    tls = tls_stack.data_dir / "tls"
    assert env == {
        "E2B_DOMAIN": "coppice.lan",
        "E2B_API_KEY": tls_stack.api_key,
        "SSL_CERT_FILE": str(tls / "ca-bundle.pem"),
        "NODE_EXTRA_CA_CERTS": str(tls / "ca.pem"),
        "E2B_API_URL": tls_stack.api_url,
        "E2B_SANDBOX_URL": f"https://127.0.0.1:{tls_stack.tls_port}",
    }


def test_the_serve_banner_prints_what_coppice_env_prints(tls_stack: Stack) -> None:
    assert _coppice_env_output(tls_stack, "--shell") in tls_stack.log_path.read_text()


def test_the_python_sdk_runs_a_command_and_holds_files_over_tls(tls_stack: Stack) -> None:
    result = _run_client(_coppice_env(tls_stack))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\nover tls\n"


def test_the_node_sdk_trusts_our_ca_by_node_extra_ca_certs(tls_stack: Stack) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SSL_CERT"))}
    result = subprocess.run(
        ["node", "envd_tour.mjs"],
        cwd=REPO / "tests" / "node",
        env={**environ, **_coppice_env(tls_stack)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["read"] == "written by node"


def test_the_sdk_refuses_the_gateway_without_our_ca(tls_stack: Stack) -> None:
    """With the system's roots alone (a bundle without our CA) the TLS handshake fails."""
    env = _coppice_env(tls_stack)
    env["SSL_CERT_FILE"] = "/etc/ssl/certs/ca-certificates.crt"
    result = _run_client(env)
    assert result.returncode != 0
    assert "invalid peer certificate: UnknownIssuer" in result.stderr, result.stderr


def test_the_tls_port_speaks_h2_and_http11_by_alpn(tls_stack: Stack) -> None:
    assert tls_stack.tls_port is not None
    for protocol in ("h2", "http/1.1"):
        context = ssl.create_default_context(cafile=tls_stack.data_dir / "tls" / "ca.pem")
        context.set_alpn_protocols([protocol])
        with (
            socket.create_connection(("127.0.0.1", tls_stack.tls_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="49983-abc.coppice.lan") as tls,
        ):
            assert tls.selected_alpn_protocol() == protocol


def test_the_plain_gateway_port_stays_plain_http(tls_stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", tls_stack.envd_port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1 ")


def test_the_keys_are_private(tls_stack: Stack) -> None:
    tls = tls_stack.data_dir / "tls"
    for key in ("ca-key.pem", "server-key.pem"):
        assert (tls / key).stat().st_mode & 0o777 == 0o600
