"""What every handler reads from the application: the manager and the sandbox domain."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from coppice_jails.manager import SandboxManager


@dataclass(frozen=True)
class ApiContext:
    manager: SandboxManager
    domain: str | None  # returned in create/connect answers; None: the client's E2B_DOMAIN


API_CONTEXT = web.AppKey("api_context", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.app[API_CONTEXT]
