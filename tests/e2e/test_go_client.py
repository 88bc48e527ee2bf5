"""End to end: a Go gRPC client, its stubs generated from proto/ by protoc with Debian's Go
plugins (clients/go/build), lists a directory and runs a command in a real sandbox of a real
`coppice serve`, routed by `:authority` or by the sandbox headers, with the access token."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import REPO
from fixtures.stack import Stack, running_stack

pytestmark = pytest.mark.slow

# Compiled packages (grpc-go and protobuf from /usr/share/gocode, the generated stubs) stay here
# between runs: a rebuild takes well under a second instead of ~10 s.
GO_CACHE = Path("/var/cache/coppice-test/go-build")
FAILED_CALL = 125  # the client's exit status when a call (not the command) fails
SCRIPT = "echo out $(hostname) $(whoami); echo err >&2; exit 3"
WRITE = 'mkdir -p ~/from-go && printf "written by go\\n" > ~/from-go/a.txt'


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("go-client")
    GO_CACHE.mkdir(parents=True, exist_ok=True)
    binary = work / "client"
    result = subprocess.run(
        [REPO / "clients/go/build", binary, work],
        env={**os.environ, "GOCACHE": str(GO_CACHE)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return binary


def _create(stack: Stack) -> tuple[str, str]:
    """A secured sandbox of the base template: (sandbox id, envd access token)."""
    status, body = stack.api("POST", "/sandboxes", {"templateID": "base", "secure": True})
    assert status == 201, body
    assert isinstance(body, dict)
    return body["sandboxID"], body["envdAccessToken"]


@pytest.fixture(scope="module")
def sandboxes(coppice_stack: Stack) -> Iterator[tuple[str, str]]:
    """(target id, its token); a decoy is started after it, so the most recent one is not it."""
    target, token = _create(coppice_stack)
    decoy, _ = _create(coppice_stack)
    yield target, token
    for sandbox_id in (target, decoy):
        coppice_stack.api("DELETE", f"/sandboxes/{sandbox_id}")


def _run(
    client: Path, env: dict[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SSL_CERT"))}
    return subprocess.run(
        [client, *argv],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _listing(stdout: str) -> dict[str, str]:
    """path → '<type> <size> <permissions>' of the client's ListDir lines."""
    block = stdout.split("== Start", 1)[0].splitlines()
    assert block[0].startswith("== ListDir "), stdout
    return {line.rsplit(" ", 1)[1]: line.rsplit(" ", 1)[0] for line in block[1:]}


def test_routed_by_authority_lists_and_runs(
    go_client: Path, coppice_stack: Stack, sandboxes: tuple[str, str]
) -> None:
    target, token = sandboxes
    env = {"E2B_SANDBOX_URL": coppice_stack.sandbox_url, "E2B_DOMAIN": "coppice.lan"}
    env |= {"E2B_SANDBOX_ID": target, "E2B_ACCESS_TOKEN": token}
    result = _run(go_client, env, "-dir", "/", "--", "/bin/bash", "-c", SCRIPT)
    assert result.returncode == 3, result.stdout + result.stderr
    listing = _listing(result.stdout)
    assert listing["/home"].startswith("directory ")
    assert listing["/etc"].startswith("directory ")
    command_output = result.stdout.split("\n", 1 + len(listing))[-1]
    assert command_output == (
        f"== Start /bin/bash -c {SCRIPT}\nout {target} user\n== exit code 3\n"
    )
    assert result.stderr == "err\n"


def test_routed_by_headers_as_another_user(
    go_client: Path, coppice_stack: Stack, sandboxes: tuple[str, str]
) -> None:
    """No domain: the E2b-Sandbox-Id/-Port headers name the sandbox; a second run lists the file
    the first one's command wrote (the same sandbox, not the decoy)."""
    target, token = sandboxes
    env = {"E2B_SANDBOX_URL": coppice_stack.sandbox_url, "E2B_SANDBOX_ID": target}
    write = _run(go_client, env, "-token", token, "/bin/bash", "-c", WRITE)
    assert write.returncode == 0, write.stdout + write.stderr
    argv = ["-token", token, "-user", "root", "-dir", "/home/user/from-go", "hostname"]
    result = _run(go_client, env, *argv)
    assert result.returncode == 0, result.stdout + result.stderr
    listing = _listing(result.stdout)
    assert list(listing) == ["/home/user/from-go/a.txt"]
    assert re.fullmatch(r"file 14 -rw-r--r--", listing["/home/user/from-go/a.txt"])
    assert result.stdout.endswith(f"== Start hostname\n{target}\n== exit code 0\n")
    whoami = _run(go_client, env, "-token", token, "-user", "root", "whoami")
    assert whoami.returncode == 0, whoami.stderr
    assert whoami.stdout.endswith("== Start whoami\nroot\n== exit code 0\n")
    killed = _run(go_client, env, "-token", token, "/bin/bash", "-c", "kill -KILL $$")
    assert killed.stdout.endswith("== exit code -1\n"), killed.stdout + killed.stderr
    assert killed.stderr == "client: the process did not exit: signal: killed\n"
    assert killed.returncode == 255


def test_without_the_token_the_gateway_refuses(
    go_client: Path, coppice_stack: Stack, sandboxes: tuple[str, str]
) -> None:
    target, _ = sandboxes
    env = {"E2B_SANDBOX_URL": coppice_stack.sandbox_url, "E2B_SANDBOX_ID": target}
    result = _run(go_client, env, "true")
    assert result.returncode == FAILED_CALL
    assert "client: ListDir /home/user: rpc error: code = Unauthenticated" in result.stderr
    assert result.stdout == ""


def test_an_unknown_sandbox_is_not_found(go_client: Path, coppice_stack: Stack) -> None:
    env = {"E2B_SANDBOX_URL": coppice_stack.sandbox_url, "E2B_DOMAIN": "coppice.lan"}
    result = _run(go_client, env, "-sandbox", "nosuchsandbox", "true")
    assert result.returncode == FAILED_CALL
    assert "client: ListDir /home/user: rpc error:" in result.stderr


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[Stack]:
    with running_stack(tls=True) as stack:
        yield stack


def test_over_tls_trusting_the_ca_by_ssl_cert_file(go_client: Path, tls_stack: Stack) -> None:
    """https:// and h2 by ALPN; Go's roots come from SSL_CERT_FILE, as `coppice env --tls` sets."""
    target, token = _create(tls_stack)
    assert tls_stack.tls_port is not None
    env = {
        "E2B_SANDBOX_URL": f"https://127.0.0.1:{tls_stack.tls_port}",
        "E2B_DOMAIN": "coppice.lan",
    }
    env |= {"E2B_SANDBOX_ID": target, "E2B_ACCESS_TOKEN": token}
    trusted = env | {"SSL_CERT_FILE": str(tls_stack.data_dir / "tls" / "ca-bundle.pem")}
    result = _run(go_client, trusted, "-dir", "/home", "echo", "over", "tls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _listing(result.stdout)["/home/user"].startswith("directory ")
    assert result.stdout.endswith("== Start echo over tls\nover tls\n== exit code 0\n")
    # The system roots alone do not trust our CA: the handshake fails, no call is made.
    untrusted = _run(go_client, env, "-timeout", "5s", "true", timeout=60)
    assert untrusted.returncode == FAILED_CALL
    assert "code = Unavailable" in untrusted.stderr
    assert "certificate signed by unknown authority" in untrusted.stderr
    assert untrusted.stdout == ""
