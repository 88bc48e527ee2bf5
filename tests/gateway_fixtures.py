"""A real gateway on a free loopback port, over stand-in sandboxes whose roots are temp trees.

Reusable by every gateway-side test (process, interpreter, filesystem):

    from gateway_fixtures import StaticLookup, make_sandbox, start_gateway
    lookup = StaticLookup([make_sandbox(tmp_path / "a")])
    with start_gateway(lookup, process=MyProcessService()) as gw:
        httpx.get(gw.url + "/health")   # routes to the most recent sandbox

The server runs in its own thread and event loop (so sync SDK calls in a test do not deadlock
it); that loop runs in debug mode and `stop()` fails the test if any callback blocked it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from process import process_connect

from coppice_envd.app import build_gateway, serve_gateway
from coppice_envd.envd_api.routes import ASGIApp
from coppice_envd.filesystem.service import FilesystemService
from coppice_envd.sandboxes import SandboxLookup, SandboxView
from coppice_jails.runtime.base import ExecSpec, Jail, JailProcess, JailStats

USER_UID = 1000
# A callback running longer than this on the loop is a blocking call in disguise. Not lower:
# on 2 busy cores a thread holding the GIL (an SDK client in the test) stalls the loop ~0.3 s.
SLOW_CALLBACK_SECONDS = 0.5

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
user:x:1000:1000::/home/user:/bin/bash
"""
GROUP = """root:x:0:
daemon:x:1:
sudo:x:27:user
user:x:1000:
"""


class StubJail(Jail):
    """A jail that is only a root directory: enough for file operations, not for processes."""

    def __init__(self, sandbox_id: str, root: Path) -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.handle = f"stub:{sandbox_id}"

    async def exec(self, spec: ExecSpec) -> JailProcess:
        raise NotImplementedError("a stub jail runs no processes")

    async def signal(self, pid: int, signum: int) -> None:
        raise NotImplementedError

    async def freeze(self) -> None:
        raise NotImplementedError

    async def thaw(self) -> None:
        raise NotImplementedError

    async def stats(self) -> JailStats:
        return JailStats(cpu_usage_usec=0, memory_bytes=0, memory_limit_bytes=None, pids=0)

    def is_alive(self) -> bool:
        return True

    async def stop(self) -> None:
        pass


def make_root(root: Path, *, shadow: str = "sandbox-shadow\n") -> Path:
    """A minimal sandbox tree: /etc/{passwd,group,shadow}, /root, /tmp, /home/user (uid 1000)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/shadow").write_text(shadow)
    (root / "root").mkdir(mode=0o700)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    home = root / "home/user"
    home.mkdir(parents=True)
    os.chown(home, USER_UID, USER_UID)
    return root


def make_sandbox(
    root: Path,
    sandbox_id: str | None = None,
    *,
    access_token: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> SandboxView:
    make_root(root)
    sandbox_id = sandbox_id or root.name
    return SandboxView(
        sandbox_id=sandbox_id,
        jail=StubJail(sandbox_id, root),
        access_token=access_token,
        env_vars=env_vars or {},
    )


@dataclass
class StaticLookup(SandboxLookup):
    """Live sandboxes in start order; the last one is the most recent."""

    sandboxes: list[SandboxView] = field(default_factory=list)

    def get(self, sandbox_id: str) -> SandboxView | None:
        return next((s for s in self.sandboxes if s.sandbox_id == sandbox_id), None)

    def most_recent(self) -> SandboxView | None:
        return self.sandboxes[-1] if self.sandboxes else None


class _BlockedLoopCatcher(logging.Handler):
    """Collects asyncio's slow-callback warnings raised in one thread."""

    def __init__(self, thread_id: int) -> None:
        super().__init__(logging.WARNING)
        self.thread_id = thread_id
        self.slow: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # hypercorn's per-connection task only parses HTTP (the app runs in tasks of its own), so
        # a slow step there is this busy machine starving the thread, not a blocking call of ours.
        if (
            record.thread == self.thread_id
            and message.startswith("Executing ")
            and "coro=<worker_serve.<locals>._server_callback()" not in message
        ):
            self.slow.append(message)


@dataclass
class RunningGateway:
    url: str  # http://127.0.0.1:<port>
    port: int
    filesystem: FilesystemService


@contextmanager
def start_gateway(
    lookup: SandboxLookup,
    *,
    process: process_connect.Process | None = None,
    interpreter: ASGIApp | None = None,
    debug_loop: bool = True,
) -> Iterator[RunningGateway]:
    """Serve the real gateway app under hypercorn on a free 127.0.0.1 port, in a thread."""
    filesystem = FilesystemService()
    app = build_gateway(lookup, process=process, interpreter=interpreter, filesystem=filesystem)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    stopping = asyncio.Event()
    failure: list[BaseException] = []
    catchers: list[_BlockedLoopCatcher] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        if debug_loop:
            loop.set_debug(True)
            loop.slow_callback_duration = SLOW_CALLBACK_SECONDS
            catcher = _BlockedLoopCatcher(threading.get_ident())
            logging.getLogger("asyncio").addHandler(catcher)
            catchers.append(catcher)
        try:
            loop.run_until_complete(
                serve_gateway(app, sockets=[sock], shutdown_trigger=stopping.wait)
            )
        except BaseException as e:  # reported by stop()
            failure.append(e)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name=f"gateway-{port}", daemon=True)
    thread.start()
    _wait_until_listening(port)
    try:
        yield RunningGateway(url=f"http://127.0.0.1:{port}", port=port, filesystem=filesystem)
    finally:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=30)
        sock.close()
        for catcher in catchers:
            logging.getLogger("asyncio").removeHandler(catcher)
        if thread.is_alive():
            raise AssertionError("the gateway did not stop")
        if failure:
            raise AssertionError("the gateway failed") from failure[0]
        blocked = [m for c in catchers for m in c.slow]
        if blocked:
            raise AssertionError("the gateway's event loop was blocked:\n" + "\n".join(blocked))


def _wait_until_listening(port: int) -> None:
    # The socket listens already; this waits for hypercorn to accept (a request round trip).
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                if conn.recv(16):
                    return
        except OSError:
            pass
        threading.Event().wait(0.05)
    raise AssertionError("the gateway did not start")


def connect_unary(
    url: str, procedure: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    """One Connect unary call with the JSON codec: (HTTP status, decoded JSON body)."""
    response = httpx.post(
        f"{url}/{procedure}",
        content=json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=30,
    )
    return response.status_code, response.json()


def envelope(message: object, flags: int = 0) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def read_envelopes(data: bytes) -> list[tuple[int, dict[str, object]]]:
    """(flags, JSON) of every Connect envelope in a response body."""
    frames = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        frames.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return frames
