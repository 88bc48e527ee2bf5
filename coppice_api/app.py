"""The lifecycle REST service: E2B's control-plane API as an aiohttp application."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from coppice_api.auth import api_key_middleware
from coppice_api.context import API_CONTEXT, ApiContext
from coppice_api.errors import json_errors
from coppice_api.openapi import openapi_document
from coppice_api.routes import sandboxes, templates
from coppice_api.schemas import MAX_BODY_BYTES
from coppice_jails.manager import SandboxManager

HEALTHY = "Health check successful"


async def health(request: web.Request) -> web.Response:
    return web.Response(text=HEALTHY)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(f"{request.scheme}://{request.host}"))


def build_app(manager: SandboxManager, keys: Sequence[str], domain: str | None) -> web.Application:
    """The API over a (started) manager; every route but /health and /openapi.json needs one
    of `keys` in X-API-Key. `domain` is the sandbox domain returned to clients."""
    if not keys:
        raise ValueError("at least one API key is required")
    app = web.Application(
        middlewares=[json_errors, api_key_middleware(keys)],
        client_max_size=MAX_BODY_BYTES,
    )
    app[API_CONTEXT] = ApiContext(manager=manager, domain=domain)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_routes(sandboxes.routes)
    app.router.add_routes(templates.routes)
    return app


async def start_api(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port until `await runner.cleanup()`; port 0 picks a free one
    (read it back with `bound_port`)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the API is not listening on a TCP port")
