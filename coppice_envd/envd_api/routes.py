"""envd's plain-HTTP surface (envd-contract §3): the request as handlers see it, the
route table, and the small routes (`/health`, `/envs`, `/metrics`, `/init`).

Responses follow envd: errors are `{"code": <status>, "message": ...}` JSON, unknown paths get
chi's `404 page not found`, a known path with another method gets 405.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from coppice_envd.http import asgi
from coppice_envd.http.asgi import (
    Receive,
    Scope,
    Send,
    send_json,
    send_not_found,
    send_response,
)
from coppice_envd.permissions.auth import token_matches
from coppice_envd.request import RequestScope
from coppice_envd.sandboxes import SandboxStates, SandboxView, StateKind
from coppice_jails.envd_facts import ENVD_VERSION


@dataclass
class HTTPRequest:
    """One envd HTTP request as the route handlers see it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # http.asgi.request_headers
    receive: Receive
    scope: RequestScope

    @classmethod
    def from_asgi(
        cls, scope: Scope, receive: Receive, headers: dict[str, str], request_scope: RequestScope
    ) -> HTTPRequest:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        return cls(
            method=scope["method"],
            path=scope["path"],
            query=query,
            headers=headers,
            receive=receive,
            scope=request_scope,
        )

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def body(self) -> AsyncIterator[bytes]:
        return asgi.body_chunks(self.receive)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, or http.asgi.BodyTooLarge (a ValueError) past `limit`."""
        return await asgi.read_body(self.receive, limit)


Handler = Callable[[HTTPRequest, Send], Awaitable[None]]


@dataclass
class Routes:
    """Path → method → handler, answering 404/405 the way envd's chi router does."""

    table: dict[str, dict[str, Handler]] = field(default_factory=dict)

    def add(self, method: str, path: str, handler: Handler) -> None:
        self.table.setdefault(path, {})[method] = handler

    async def dispatch(self, request: HTTPRequest, send: Send) -> None:
        methods = self.table.get(request.path)
        if methods is None:
            await send_not_found(send)
            return
        handler = methods.get(request.method)
        if handler is None:
            await send_response(send, 405, headers=[("allow", ", ".join(sorted(methods)))])
            return
        await handler(request, send)


_NO_STORE = [("cache-control", "no-store")]


async def health(request: HTTPRequest, send: Send) -> None:
    await send_response(send, 204, headers=_NO_STORE)


async def envs(request: HTTPRequest, send: Send) -> None:
    await send_json(send, 200, request.scope.sandbox.global_env(), _NO_STORE)


@dataclass
class _CpuSample:
    """A sandbox's cpu usage at the previous `/metrics` call."""

    last: tuple[float, int] | None = None  # (monotonic time, usage in µs)

    async def close(self) -> None:
        """Nothing to release: forgetting the sample is all."""


def _no_sample(sandbox: SandboxView) -> _CpuSample:
    return _CpuSample()


_CPU_SAMPLE = StateKind("cpu sample", _no_sample)


@dataclass
class MetricsSampler:
    """envd's `/metrics`: cpu since the previous call, memory, and disk of the sandbox root.
    The previous calls' samples belong to `sandboxes` (the gateway's, from `build_gateway`)."""

    sandboxes: SandboxStates = field(default_factory=SandboxStates)

    async def __call__(self, request: HTTPRequest, send: Send) -> None:
        sandbox = request.scope.sandbox
        try:
            stats = await sandbox.jail.stats()
            disk = await asyncio.to_thread(os.statvfs, sandbox.jail.root)
        except (OSError, NotImplementedError):
            await send_response(send, 500)
            return
        now = time.monotonic()
        cpu_count = os.cpu_count() or 1
        sample = self.sandboxes.get(sandbox, _CPU_SAMPLE)
        last, sample.last = sample.last, (now, stats.cpu_usage_usec)
        cpu_pct = 0.0
        if last is not None and now > last[0]:
            used = (stats.cpu_usage_usec - last[1]) / 1e6
            cpu_pct = round(100.0 * used / ((now - last[0]) * cpu_count), 2)
        mem_total = stats.memory_limit_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES"
        )
        disk_total = disk.f_blocks * disk.f_frsize
        body = {
            "ts": int(time.time()),
            "cpu_count": cpu_count,
            "cpu_used_pct": cpu_pct,
            "mem_total_mib": mem_total // (1024 * 1024),
            "mem_used_mib": stats.memory_bytes // (1024 * 1024),
            "mem_total": mem_total,
            "mem_used": stats.memory_bytes,
            "mem_cache": 0,
            "disk_used": disk_total - disk.f_bavail * disk.f_frsize,
            "disk_total": disk_total,
        }
        await send_json(send, 200, body, _NO_STORE)


_INIT_BODY_LIMIT = 1024 * 1024


async def init(request: HTTPRequest, send: Send) -> None:
    """The orchestrator's `/init`. Coppice's registry already gives the gateway each sandbox's
    token, env vars, default user and workdir, so a valid call is acknowledged, not applied."""
    version = [("x-envd-version", ENVD_VERSION)]
    try:
        body: Mapping[str, Any] = json.loads(await request.read_body(_INIT_BODY_LIMIT) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        await send_response(send, 400, headers=version)
        return
    token = request.scope.sandbox.access_token
    given = body.get("accessToken")
    if token is not None and not token_matches(token, given if isinstance(given, str) else None):
        await send_response(
            send,
            401,
            b"access token validation failed",
            [*version, ("content-type", "text/plain; charset=utf-8")],
        )
        return
    await send_response(send, 204, headers=[*version, *_NO_STORE])
