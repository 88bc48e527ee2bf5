"""End to end: the official Python and Node SDKs reach `coppice serve --tls`'s gateway with real
URLs — https://api.<domain> and https://<port>-<id>.<domain>, names resolved by wildcard DNS
(`coppice dns`, in a private mount namespace) — with nothing but what `coppice env --tls --json`
prints: no URL override, no debug mode, our local CA trusted through SSL_CERT_FILE or
NODE_EXTRA_CA_CERTS."""

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
from fixtures.dns import WildcardDns
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
# Over h2 (TLS, the SDK's choice by ALPN) a cut response must drop its connection too, or the
# SDK waits out its request timeout instead of learning that the sandbox was killed.
KILLED_DURING_RUN = """
import time
from e2b import Sandbox, TimeoutException
sandbox = Sandbox.create(template="base", timeout=60)
command = sandbox.commands.run("sleep 60", background=True)
sandbox.kill()
started = time.monotonic()
try:
    command.wait()
except TimeoutException as error:
    print(f"{time.monotonic() - started < 20} {error}")
"""
# The whole flow of the issue: ... and a server in the sandbox reached at get_host(port).
FULL_FLOW = """
import json, time, urllib.request
from e2b_code_interpreter import Sandbox
with Sandbox.create(template="code-interpreter-v1", timeout=120) as sandbox:
    run = sandbox.commands.run("echo py-$((6 * 7))")
    sandbox.files.write("/home/user/real-urls.txt", "via wildcard dns")
    read = sandbox.files.read("/home/user/real-urls.txt")
    execution = sandbox.run_code("21 * 2")
    sandbox.commands.run("cd /home/user && python3 -m http.server 8001", background=True)
    host = sandbox.get_host(8001)
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"https://{host}/", timeout=10) as response:
                status, listing = response.status, response.read().decode()
            break
        except OSError:
            time.sleep(0.1)
    print(json.dumps({"stdout": run.stdout, "read": read, "result": execution.text,
                      "host": host, "status": status, "listed": "real-urls.txt" in listing}))
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


def _client_environ(env: dict[str, str]) -> dict[str, str]:
    """This process's environment less anything that could point an SDK elsewhere, plus `env`."""
    prefixes = ("E2B_", "SSL_CERT", "NODE_EXTRA_CA")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **env}


def _run_client(
    dns: WildcardDns, env: dict[str, str], script: str = CLIENT
) -> subprocess.CompletedProcess[str]:
    return dns.run([sys.executable, "-c", script], env=_client_environ(env), timeout=180)


def _flow_result(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stdout + result.stderr
    flow: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return flow


def test_coppice_env_points_the_sdk_at_the_tls_gateway(tls_stack: Stack) -> None:
    env = _coppice_env(tls_stack)
    tls = tls_stack.data_dir / "tls"
    assert env == {
        "E2B_DOMAIN": f"coppice.lan:{tls_stack.tls_port}",
        "E2B_API_KEY": tls_stack.api_key,
        "SSL_CERT_FILE": str(tls / "ca-bundle.pem"),
        "NODE_EXTRA_CA_CERTS": str(tls / "ca.pem"),
    }


def test_the_serve_banner_prints_what_coppice_env_prints(tls_stack: Stack) -> None:
    assert _coppice_env_output(tls_stack, "--shell") in tls_stack.log_path.read_text()


def test_the_python_sdk_runs_a_command_and_holds_files_over_tls(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    result = _run_client(wildcard_dns, _coppice_env(tls_stack))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "ok\nover tls\n"


def _assert_full_flow(
    result: subprocess.CompletedProcess[str], stack: Stack, command_stdout: str
) -> None:
    """What FULL_FLOW and real_urls.mjs print: every step's result, and the get_host name."""
    flow = _flow_result(result)
    host = str(flow.pop("host"))
    assert host.startswith("8001-")
    assert host.endswith(f".coppice.lan:{stack.tls_port}")
    assert flow == {
        "stdout": command_stdout, "read": "via wildcard dns", "result": "42", "status": 200,
        "listed": True,
    }  # fmt: skip


def test_python_real_urls_commands_files_code_and_get_host(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    result = _run_client(wildcard_dns, _coppice_env(tls_stack), FULL_FLOW)
    _assert_full_flow(result, tls_stack, "py-42\n")


def test_a_sandbox_killed_during_a_command_is_reported_as_killed_over_h2(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    result = _run_client(wildcard_dns, _coppice_env(tls_stack), KILLED_DURING_RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("True "), result.stdout
    assert "sandbox was killed or reached its end of life" in result.stdout


def test_node_real_urls_commands_files_code_and_get_host(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    result = wildcard_dns.run(
        ["node", "real_urls.mjs"],
        cwd=REPO / "tests" / "node",
        env=_client_environ(_coppice_env(tls_stack)),
    )
    _assert_full_flow(result, tls_stack, "node-42\n")


def test_the_node_sdk_trusts_our_ca_by_node_extra_ca_certs(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    result = wildcard_dns.run(
        ["node", "envd_tour.mjs"],
        cwd=REPO / "tests" / "node",
        env=_client_environ(_coppice_env(tls_stack)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["read"] == "written by node"


def test_the_sdk_refuses_the_gateway_without_our_ca(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    """With the system's roots alone (a bundle without our CA) the TLS handshake fails."""
    env = _coppice_env(tls_stack)
    env["SSL_CERT_FILE"] = "/etc/ssl/certs/ca-certificates.crt"
    result = _run_client(wildcard_dns, env)
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


def test_example_02_persistent_kernel_prints_the_seed_transcript(
    tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    """With only `coppice env --tls` (no override, no E2B_DEBUG) where *.coppice.lan resolves;
    its failing DNS preflight is in tests/e2e/test_wildcard_dns.py."""
    result = wildcard_dns.run(
        [sys.executable, "examples/02-persistent-kernel.py"],
        env=_client_environ(_coppice_env(tls_stack)),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "dns: api.coppice.lan -> 127.0.0.1",
        *result.stdout.splitlines()[1:2],
        "[1] x = 42 stdout=[] results=0",
        "[2] print(x) stdout='42'",
        "[3] numpy result text='array([1, 2, 3])'",
        "[4] np still there text='60'",
        *result.stdout.splitlines()[6:7],
        "[6] print(x) after restart error.name='NameError'",
        "ok",
    ]
    assert result.stdout.splitlines()[1].startswith("sandbox id: ")
    assert result.stdout.splitlines()[6].startswith(
        "[5] kernel restarted via Sandbox.restart_code_context("
    )
