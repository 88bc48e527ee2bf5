"""Each sandbox's own network, through the official `e2b` SDK against a real `coppice serve`:
sandbox A cannot connect to a listener of sandbox B, nor to the host's services (on loopback or
on A's gateway address), while B's listener answers through the gateway."""

from __future__ import annotations

import urllib.request

import pytest
from e2b import Sandbox
from fixtures.stack import Stack

pytestmark = pytest.mark.slow

# Prints the sandbox's own address (the source of a route lookup; nothing is sent) and its gateway.
ADDRESSES = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("198.51.100.1", 9))
own = s.getsockname()[0]
gateway = own.rsplit(".", 1)[0] + "." + str(int(own.rsplit(".", 1)[1]) - 1)
print(own, gateway)
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def _connect(sandbox: Sandbox, address: str, port: int) -> str:
    return sandbox.commands.run(f"python3 -c '{CONNECT}' {address} {port}").stdout.strip()


def test_a_sandbox_reaches_neither_another_sandbox_nor_host_services(sdk_env: Stack) -> None:
    a = Sandbox.create(template="base", timeout=120)
    b = Sandbox.create(template="base", timeout=120)
    try:
        b_address, _ = b.commands.run(f"python3 -c '{ADDRESSES}'").stdout.split()
        a_address, a_gateway = a.commands.run(f"python3 -c '{ADDRESSES}'").stdout.split()
        assert a_address != b_address
        b.commands.run("cd /tmp && python3 -m http.server 8001", background=True)
        request = urllib.request.Request(
            f"{sdk_env.sandbox_url}/", headers={"Host": f"8001-{b.sandbox_id}.coppice.lan"}
        )
        for _ in range(100):  # the server is up once the gateway gets an answer through
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200
                break
            except OSError:
                continue
        # B's listener answers B itself and the gateway, but not A
        assert _connect(b, "127.0.0.1", 8001) == "connected"
        assert _connect(a, b_address, 8001) in ("TimeoutError", "timeout")
        # the host's services: the API and the gateway listen on the host's 127.0.0.1, which in
        # A is its own loopback; A's gateway address is the host's, and drops what A sends it
        for port in (sdk_env.api_port, sdk_env.envd_port):
            assert _connect(a, "127.0.0.1", port) == "ConnectionRefusedError"
            assert _connect(a, a_gateway, port) in ("TimeoutError", "timeout")
    finally:
        a.kill()
        b.kill()
