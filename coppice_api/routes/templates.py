"""Routes of templates and snapshots (a snapshot is a template made from a sandbox)."""

from __future__ import annotations

from aiohttp import web

from coppice_api import schemas
from coppice_api.context import context
from coppice_api.errors import BadRequest
from coppice_jails.manager import SandboxManager
from coppice_jails.templates import TemplateInfo

routes = web.RouteTableDef()


def _template_json(
    manager: SandboxManager, info: TemplateInfo, with_builds: bool
) -> dict[str, object]:
    cpus, memory_mb = manager.sandbox_size()
    shape = schemas.template_with_builds_json if with_builds else schemas.template_json
    return shape(info, cpus, memory_mb, manager.disk_size_mb)


@routes.get("/templates")
async def list_templates(request: web.Request) -> web.Response:
    manager = context(request).manager
    infos = await manager.list_templates()
    return web.json_response([_template_json(manager, i, with_builds=False) for i in infos])


@routes.get("/templates/aliases/{alias}")
async def get_template_alias(request: web.Request) -> web.Response:
    """Whether a name resolves to a template (the SDK's `Template.exists`): 200 or 404."""
    info = await context(request).manager.get_template(request.match_info["alias"])
    # Every template here belongs to the one team the API keys stand for: never 403.
    return web.json_response({"templateID": info.name, "public": False})


@routes.get("/templates/{template_id:.+}")
async def get_template(request: web.Request) -> web.Response:
    manager = context(request).manager
    info = await manager.get_template(request.match_info["template_id"])
    return web.json_response(_template_json(manager, info, with_builds=True))


@routes.delete("/templates/{template_id:.+}")
async def delete_template(request: web.Request) -> web.Response:
    await context(request).manager.delete_template(request.match_info["template_id"])
    return web.Response(status=204)


@routes.post("/sandboxes/{sandbox_id}/snapshots")
async def create_snapshot(request: web.Request) -> web.Response:
    sandbox_id = schemas.sandbox_id(request)
    body = await schemas.json_body(request, required=False)
    name = schemas.optional_str(body, "name")
    schemas.optional_bool(body, "memory")
    snapshot = await context(request).manager.snapshot(sandbox_id, name or None)
    return web.json_response(schemas.snapshot_json(snapshot), status=201)


@routes.get("/snapshots")
async def list_snapshots(request: web.Request) -> web.Response:
    sandbox_filter = request.query.get("sandboxID") or None
    if sandbox_filter is not None and not schemas.SANDBOX_ID.fullmatch(sandbox_filter):
        raise BadRequest("sandboxID: Invalid sandbox ID")
    page = await context(request).manager.list_snapshots(
        sandbox_id=sandbox_filter,
        name=request.query.get("name") or None,
        limit=schemas.query_int(request, "limit", schemas.MAX_PAGE, 1, schemas.MAX_PAGE),
        next_token=request.query.get("nextToken") or None,
    )
    headers = {"X-Next-Token": page.next_token} if page.next_token else {}
    return web.json_response([schemas.snapshot_json(s) for s in page.items], headers=headers)
