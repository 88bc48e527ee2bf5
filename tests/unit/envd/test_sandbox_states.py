"""The gateway's per-sandbox state ends with its sandbox: a stopped sandbox's polling watchers
are closed and forgotten, its `/metrics` cpu sample too (sandboxes.SandboxStates)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from coppice_envd.app import Gateway
from coppice_envd.http.asgi import Message
from coppice_envd.server import build_gateway
from coppice_envd.testing import StaticLookup, make_sandbox
from coppice_jails.testing import FakeJail

FS = "/filesystem.Filesystem"


async def call(gateway: Gateway, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One request straight into the gateway app: (status, decoded JSON body)."""
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await asyncio.Future()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "server": ("127.0.0.1", 49983),
        "client": ("127.0.0.1", 50000),
    }
    await gateway(scope, receive, send)
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_stopped_sandboxs_watchers_and_metrics_are_closed_and_forgotten(
    tmp_path: Path,
) -> None:
    sandbox = make_sandbox(tmp_path / "s")
    assert isinstance(sandbox.jail, FakeJail)
    gateway = build_gateway(StaticLookup([sandbox]), process=None)
    # The accounts cache's inotify is the gateway's for good: made before counting.
    assert (await call(gateway, "POST", f"{FS}/Stat", {"path": "/home/user"}))[0] == 200
    before = open_fds()
    status, body = await call(gateway, "POST", f"{FS}/CreateWatcher", {"path": "/home/user"})
    assert status == 200
    watcher = {"watcherId": body["watcherId"]}
    assert (await call(gateway, "POST", f"{FS}/GetWatcherEvents", watcher))[0] == 200
    assert open_fds() > before  # the watcher's inotify

    await call(gateway, "GET", "/metrics")  # the first sample
    sandbox.jail.cpu_usage_usec += 10**6
    assert (await call(gateway, "GET", "/metrics"))[1]["cpu_used_pct"] > 0

    await gateway.sandbox_stopped(sandbox.sandbox_id)

    assert open_fds() == before
    status, body = await call(gateway, "POST", f"{FS}/GetWatcherEvents", watcher)
    assert (status, body["code"]) == (404, "not_found")
    sandbox.jail.cpu_usage_usec += 10**6
    assert (await call(gateway, "GET", "/metrics"))[1]["cpu_used_pct"] == 0.0
    await gateway.sandboxes.aclose()
