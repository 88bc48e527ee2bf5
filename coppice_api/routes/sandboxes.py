"""Routes of sandboxes: create, list, get, kill, timeouts, pause/connect/resume, fork, metrics,
logs."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coppice_api import schemas
from coppice_api.context import context
from coppice_api.errors import BadRequest, error_of
from coppice_jails.manager import DEFAULT_TIMEOUT_SECONDS, SandboxError
from coppice_jails.registry import SandboxQuery

# E2B's defaults where the body leaves a field out.
RESUME_DEFAULT_TIMEOUT = 15
REFRESH_DEFAULT_SECONDS = 15
REFRESH_MAX_SECONDS = 3600
MAX_METRICS_IDS = 100

routes = web.RouteTableDef()


@routes.post("/sandboxes")
@routes.post("/v2/sandboxes")
async def create_sandbox(request: web.Request) -> web.Response:
    body = await schemas.json_body(request)
    spec = schemas.create_spec(body, always_secure=request.path.startswith("/v2/"))
    ctx = context(request)
    record = await ctx.manager.create(spec)
    return web.json_response(schemas.sandbox_json(record, ctx.domain), status=201)


@routes.get("/v2/sandboxes")
async def list_sandboxes_v2(request: web.Request) -> web.Response:
    query = schemas.list_query(request)
    manager = context(request).manager
    page = await manager.list_sandboxes(query)
    headers = {"X-Total-Running": str(await manager.registry.count_running())}
    if page.next_token:
        headers["X-Next-Token"] = page.next_token
    body = [schemas.listed_sandbox_json(r) for r in page.items]
    return web.json_response(body, headers=headers)


@routes.get("/sandboxes")
async def list_sandboxes_v1(request: web.Request) -> web.Response:
    """The deprecated list: running sandboxes only, all of them."""
    metadata = schemas.metadata_filter(request.query.get("metadata"))
    manager = context(request).manager
    records = []
    token: str | None = None
    while True:
        query = SandboxQuery(metadata=metadata, states=("running",), next_token=token)
        page = await manager.list_sandboxes(query)
        records += page.items
        token = page.next_token
        if token is None:
            break
    return web.json_response([schemas.listed_sandbox_json(r) for r in records])


@routes.get("/sandboxes/metrics")
async def sandboxes_metrics(request: web.Request) -> web.Response:
    raw = request.query.get("sandbox_ids", "")
    ids = [i for i in raw.split(",") if i]
    if len(ids) > MAX_METRICS_IDS:
        raise BadRequest(f"sandbox_ids: at most {MAX_METRICS_IDS} ids are allowed")
    manager = context(request).manager
    result: dict[str, Any] = {}
    for sandbox_id in ids:
        try:
            metrics = await manager.latest_metrics(sandbox_id)
        except SandboxError:
            continue  # unknown ids are left out, as E2B does
        if metrics is not None:
            result[sandbox_id] = schemas.metric_json(metrics)
    return web.json_response({"sandboxes": result})


@routes.get("/sandboxes/{sandbox_id}")
async def get_sandbox(request: web.Request) -> web.Response:
    ctx = context(request)
    record = await ctx.manager.get(schemas.sandbox_id(request))
    return web.json_response(schemas.sandbox_detail_json(record, ctx.domain))


@routes.delete("/sandboxes/{sandbox_id}")
async def kill_sandbox(request: web.Request) -> web.Response:
    await context(request).manager.kill(schemas.sandbox_id(request))
    return web.Response(status=204)


@routes.post("/sandboxes/{sandbox_id}/timeout")
async def set_timeout(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    seconds = schemas.timeout_field(await schemas.json_body(request))
    await context(request).manager.set_timeout(sandbox_id, seconds)
    return web.Response(status=204)


@routes.post("/sandboxes/{sandbox_id}/refreshes")
async def refresh(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    seconds = schemas.timeout_field(body, "duration", REFRESH_DEFAULT_SECONDS)
    if seconds > REFRESH_MAX_SECONDS:
        raise BadRequest(f"duration: must be at most {REFRESH_MAX_SECONDS} seconds")
    await context(request).manager.refresh(sandbox_id, max(seconds, REFRESH_DEFAULT_SECONDS))
    return web.Response(status=204)


@routes.post("/sandboxes/{sandbox_id}/pause")
async def pause(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    schemas.optional_bool(body, "memory")  # validated; a frozen jail always keeps its memory
    await context(request).manager.pause(sandbox_id)
    return web.Response(status=204)


@routes.post("/sandboxes/{sandbox_id}/connect")
@routes.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect(request: web.Request) -> web.Response:
    """200 if it was running (end time only extended), 201 if it was paused and resumed."""
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    seconds = schemas.timeout_field(body, default=DEFAULT_TIMEOUT_SECONDS)
    schemas.optional_bool(body, "memory")
    ctx = context(request)
    result = await ctx.manager.connect(sandbox_id, seconds)
    status = 201 if result.resumed else 200
    return web.json_response(schemas.sandbox_json(result.record, ctx.domain), status=status)


@routes.post("/sandboxes/{sandbox_id}/resume")
async def resume(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    seconds = schemas.timeout_field(body, default=RESUME_DEFAULT_TIMEOUT)
    schemas.optional_bool(body, "autoPause")
    ctx = context(request)
    record = await ctx.manager.resume(sandbox_id, seconds)
    return web.json_response(schemas.sandbox_json(record, ctx.domain), status=201)


@routes.post("/sandboxes/{sandbox_id}/fork")
async def fork(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    seconds = schemas.timeout_field(body, default=RESUME_DEFAULT_TIMEOUT)
    count = schemas.optional_int(body, "count")
    ctx = context(request)
    results = await ctx.manager.fork(sandbox_id, 1 if count is None else count, seconds)
    answer: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, SandboxError):
            status, message = error_of(result)
            answer.append({"error": {"code": status, "message": message}})
        else:
            answer.append({"sandbox": schemas.sandbox_json(result, ctx.domain)})
    return web.json_response(answer, status=201)


@routes.get("/sandboxes/{sandbox_id}/metrics")
async def sandbox_metrics(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    start, end = (
        schemas.query_int(request, name, 0, 0, 2**53) if name in request.query else None
        for name in ("start", "end")
    )
    series = await context(request).manager.metrics(sandbox_id, start, end)
    return web.json_response([schemas.metric_json(metrics) for metrics in series])


@routes.get("/sandboxes/{sandbox_id}/logs")
async def logs_v1(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    start_ms = schemas.query_int(request, "start", 0, 0, 2**53)
    limit = schemas.query_int(request, "limit", 1000, 0, 10_000)
    events = await context(request).manager.logs(
        sandbox_id, since=start_ms / 1000 if start_ms else None, limit=limit
    )
    return web.json_response(schemas.logs_v1_json(events))


@routes.get("/v2/sandboxes/{sandbox_id}/logs")
async def logs_v2(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    cursor_ms = schemas.query_int(request, "cursor", 0, 0, 2**53)
    limit = schemas.query_int(request, "limit", 1000, 0, 1000)
    direction = request.query.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise BadRequest("direction: must be forward or backward")
    level = request.query.get("level")
    levels = ("debug", "info", "warn", "error")
    if level is not None and level not in levels:
        raise BadRequest("level: must be one of debug, info, warn, error")
    search = request.query.get("search")
    if search is not None and len(search) > 256:
        raise BadRequest("search: at most 256 characters")
    events = await context(request).manager.logs(
        sandbox_id,
        since=cursor_ms / 1000 if cursor_ms else None,
        limit=10_000,
        newest_first=direction == "backward",
    )
    if level is not None:
        events = [e for e in events if levels.index(e.level) >= levels.index(level)]
    if search:
        events = [e for e in events if search in e.message]
    return web.json_response({"logs": [schemas.log_entry_json(e) for e in events[:limit]]})
