"""End to end through the official `e2b` SDK against a real `coppice serve`: the `base` template
has what E2B's base has (python, pip, node, npm, sudo), and a user's server in a sandbox answers
(the network is shared with the host for now, so the port is one free on the host)."""

from __future__ import annotations

import secrets
import socket

import pytest
from e2b import CommandExitException, CommandHandle, Sandbox
from fixtures.stack import Stack

from coppice_jails.templates import NPM

pytestmark = pytest.mark.slow


def _free_host_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(sandbox: Sandbox, url: str, token: str) -> bool:
    """Whether `url` serves `token` within about 15 s, asked with curl from in the sandbox."""
    poll = (
        f'for i in $(seq 150); do [ "$(curl -s {url})" = {token} ] && exit 0; sleep 0.1; done;'
        " exit 1"
    )
    try:
        sandbox.commands.run(poll, timeout=30)
    except CommandExitException:
        return False
    return True


def _start_http_server(sandbox: Sandbox) -> tuple[int, CommandHandle]:
    """`python -m http.server` in the background, on a port that was free; another port if
    someone took it meanwhile (a token file proves the answer comes from our server)."""
    token = secrets.token_hex(8)
    sandbox.files.write(f"/home/user/www/{token}.txt", token)
    for _ in range(5):
        port = _free_host_port()
        handle = sandbox.commands.run(
            f"python -m http.server {port} --bind 127.0.0.1",
            background=True,
            cwd="/home/user/www",
            timeout=0,
        )
        if _wait_for(sandbox, f"http://127.0.0.1:{port}/{token}.txt", token):
            return port, handle
        handle.kill()
    raise AssertionError("python -m http.server never answered")


def test_base_has_python_node_npm_and_serves_http(sdk_env: Stack) -> None:
    with Sandbox.create(template="base", timeout=120) as sandbox:
        versions = {
            command: sandbox.commands.run(command).stdout.strip()
            for command in ("python --version", "node --version", "npm --version")
        }
        assert versions["python --version"].startswith("Python 3.11.")
        assert versions["node --version"].startswith("v18.")
        assert versions["npm --version"] == NPM.version
        assert sandbox.commands.run("pip --version").stdout.startswith("pip ")
        assert sandbox.commands.run("sudo -n whoami").stdout == "root\n"

        port, server = _start_http_server(sandbox)
        try:
            status = sandbox.commands.run(
                f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}/"
            )
            assert status.stdout == "200"
            listing = sandbox.commands.run(f"curl -s http://127.0.0.1:{port}/").stdout
            assert "Directory listing for /" in listing
        finally:
            assert server.kill()
