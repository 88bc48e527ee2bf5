"""Request validation (JSON bodies and query strings, errors naming the field) and response
shaping (E2B's JSON field names) for the lifecycle API."""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from aiohttp import web

from coppice_api.errors import BadRequest
from coppice_jails.envd_facts import ENVD_VERSION
from coppice_jails.manager import (
    DEFAULT_TIMEOUT_SECONDS,
    CreateSpec,
    template_aliases,
)
from coppice_jails.manager.metrics import Metrics
from coppice_jails.registry import (
    EventRecord,
    Order,
    SandboxQuery,
    SandboxRecord,
    SandboxState,
    SnapshotRecord,
)
from coppice_jails.templates import TemplateInfo

# Caps that keep one request (and the registry row it becomes) small.
MAX_BODY_BYTES = 1024 * 1024
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 256
MAX_METADATA_VALUE = 1024
MAX_ENV_VARS = 256
MAX_ENV_VALUE = 32 * 1024
MAX_PAGE = 100
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SANDBOX_ID = re.compile(r"[a-z0-9]+")
_T = TypeVar("_T")


# Request bodies ---------------------------------------------------------------------------
async def json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object (chunked bodies too); {} for an empty optional body."""
    raw = await request.read()
    if not raw.strip():
        if required:
            raise BadRequest("Error when parsing request: request body is empty")
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"Error when parsing request: invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest("Error when parsing request: the body must be a JSON object")
    return body


def _typed(body: Mapping[str, Any], name: str, kind: type[_T], kind_name: str) -> _T | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int subclass in Python, but not an integer in JSON.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"Error when parsing request: {name}: must be {kind_name}")
    return value


def optional_int(body: Mapping[str, Any], name: str) -> int | None:
    return _typed(body, name, int, "an integer")


def optional_bool(body: Mapping[str, Any], name: str) -> bool | None:
    return _typed(body, name, bool, "a boolean")


def optional_str(body: Mapping[str, Any], name: str) -> str | None:
    return _typed(body, name, str, "a string")


def _string_map(
    body: Mapping[str, Any], name: str, max_entries: int, max_key: int, max_value: int
) -> dict[str, str]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"Error when parsing request: {name}: must be an object of strings")
    if len(value) > max_entries:
        raise BadRequest(f"{name}: at most {max_entries} entries are allowed")
    for key, item in value.items():
        if not isinstance(item, str):
            raise BadRequest(f"Error when parsing request: {name}.{key}: must be a string")
        if not key or len(key) > max_key:
            raise BadRequest(f"{name}: keys must be 1-{max_key} characters long")
        if len(item) > max_value:
            raise BadRequest(f"{name}.{key}: values must be at most {max_value} characters long")
    return cast(dict[str, str], value)


def _allow_public_traffic(body: Mapping[str, Any]) -> bool | None:
    """`network.allowPublicTraffic` (false: the sandbox's ports need its traffic token)."""
    network = body.get("network")
    if network is None:
        return None
    if not isinstance(network, dict):
        raise BadRequest("Error when parsing request: network: must be an object")
    value = network.get("allowPublicTraffic")
    if value is not None and not isinstance(value, bool):
        raise BadRequest(
            "Error when parsing request: network.allowPublicTraffic: must be a boolean"
        )
    return value


def create_spec(body: Mapping[str, Any], *, always_secure: bool) -> CreateSpec:
    """The create request; `always_secure` for the v2 API, where every sandbox is secured
    (gets an envd access token) and `secure` is ignored, as upstream."""
    template = optional_str(body, "templateID")
    if not template:
        raise BadRequest("Error when parsing request: templateID: is required")
    timeout = optional_int(body, "timeout")
    metadata = _string_map(
        body, "metadata", MAX_METADATA_ENTRIES, MAX_METADATA_KEY, MAX_METADATA_VALUE
    )
    env_vars = _string_map(body, "envVars", MAX_ENV_VARS, 256, MAX_ENV_VALUE)
    for name in env_vars:
        if not _ENV_NAME.fullmatch(name):
            raise BadRequest(f"envVars: {name!r} is not a valid environment variable name")
    return CreateSpec(
        template=template,
        timeout=DEFAULT_TIMEOUT_SECONDS if timeout is None else timeout,
        metadata=metadata,
        env_vars=env_vars,
        secure=bool(optional_bool(body, "secure")) or always_secure,
        auto_pause=bool(optional_bool(body, "autoPause")),
        allow_internet_access=optional_bool(body, "allow_internet_access"),
        allow_public_traffic=_allow_public_traffic(body),
    )


def timeout_field(
    body: Mapping[str, Any], name: str = "timeout", default: int | None = None
) -> int:
    value = optional_int(body, name)
    if value is None:
        if default is None:
            raise BadRequest(f"Error when parsing request: {name}: is required")
        return default
    if value < 0:
        raise BadRequest(f"{name}: must not be negative")
    return value


# Path and query parameters -----------------------------------------------------------------
def sandbox_id(request: web.Request) -> str:
    """The path's sandbox id; the legacy `<id>-<clientID>` form is accepted."""
    raw = request.match_info["sandbox_id"].split("-", 1)[0]
    if not SANDBOX_ID.fullmatch(raw):
        raise BadRequest("Invalid sandbox ID")
    return raw


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise BadRequest(f"{name}: must be an integer") from e
    if not low <= value <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}")
    return value


def metadata_filter(raw: str | None) -> dict[str, str]:
    """`metadata` of a list query: a query string whose keys and values are percent-encoded
    once more (the SDKs send `k%3Dv%252520w` for {"k": "v w"})."""
    if not raw:
        return {}
    pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
    return {urllib.parse.unquote(k): urllib.parse.unquote(v) for k, v in pairs}


def _states(raw: str | None) -> tuple[SandboxState, ...]:
    if not raw:
        return ("running", "paused")
    states: list[SandboxState] = []
    for part in raw.split(","):
        if part not in ("running", "paused"):
            raise BadRequest(f"state: unknown state {part!r} (use running, paused)")
        states.append(cast(SandboxState, part))
    return tuple(states)


def _timestamp(name: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError as e:
        raise BadRequest(f"{name}: must be an RFC 3339 date-time") from e


def _at_or_after(ts: float | None) -> float | None:
    """A bound that takes in a sandbox started at the very time the API shows for it:
    `startedAt` is rounded to the microsecond, so the bound gets that much slack."""
    return None if ts is None else ts - 1e-6


def list_query(request: web.Request) -> SandboxQuery:
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order: must be asc or desc")
    return SandboxQuery(
        metadata=metadata_filter(request.query.get("metadata")),
        states=_states(request.query.get("state")),
        template=request.query.get("template") or None,
        started_after=_at_or_after(_timestamp("startedAfter", request.query.get("startedAfter"))),
        order=cast(Order, order),
        limit=query_int(request, "limit", MAX_PAGE, 1, MAX_PAGE),
        next_token=request.query.get("nextToken") or None,
    )


# Responses -------------------------------------------------------------------------------
def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def sandbox_json(record: SandboxRecord, domain: str | None) -> dict[str, Any]:
    """`Sandbox`: the answer to create, connect, resume and fork."""
    body: dict[str, Any] = {
        "sandboxID": record.id,
        "templateID": record.template,
        "clientID": record.client_id,
        "envdVersion": ENVD_VERSION,
        "domain": domain,
        "trafficAccessToken": record.traffic_access_token,
    }
    if record.alias:
        body["alias"] = record.alias
    if record.access_token:
        body["envdAccessToken"] = record.access_token
    return body


def listed_sandbox_json(record: SandboxRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sandboxID": record.id,
        "templateID": record.template,
        "clientID": record.client_id,
        "startedAt": rfc3339(record.started_at),
        "endAt": rfc3339(record.end_at),
        "cpuCount": record.cpu_count,
        "memoryMB": record.memory_mb,
        "diskSizeMB": record.disk_size_mb,
        "metadata": dict(record.metadata),
        "state": record.state,
        "envdVersion": ENVD_VERSION,
    }
    if record.alias:
        body["alias"] = record.alias
    return body


def sandbox_detail_json(record: SandboxRecord, domain: str | None) -> dict[str, Any]:
    body = listed_sandbox_json(record)
    body["domain"] = domain
    body["allowInternetAccess"] = record.allow_internet_access
    if record.traffic_access_token:
        body["network"] = {"allowPublicTraffic": False}
    body["lifecycle"] = {
        "autoResume": False,
        "onTimeout": "pause" if record.auto_pause else "kill",
    }
    if record.access_token:
        body["envdAccessToken"] = record.access_token
    return body


def metric_json(metrics: Metrics) -> dict[str, Any]:
    return {
        "timestamp": rfc3339(metrics.timestamp),
        "timestampUnix": int(metrics.timestamp),
        "cpuCount": metrics.cpu_count,
        "cpuUsedPct": metrics.cpu_used_pct,
        "memUsed": metrics.mem_used,
        "memTotal": metrics.mem_total,
        "memCache": metrics.mem_cache,
        "diskUsed": metrics.disk_used,
        "diskTotal": metrics.disk_total,
    }


def snapshot_json(snapshot: SnapshotRecord) -> dict[str, Any]:
    return {"snapshotID": snapshot.snapshot_id, "names": list(snapshot.names)}


def log_entry_json(event: EventRecord) -> dict[str, Any]:
    return {
        "timestamp": rfc3339(event.ts),
        "level": event.level,
        "message": event.message,
        "fields": dict(event.fields),
    }


def logs_v1_json(events: Sequence[EventRecord]) -> dict[str, Any]:
    return {
        "logs": [{"timestamp": rfc3339(e.ts), "line": e.message} for e in events],
        "logEntries": [log_entry_json(e) for e in events],
    }


def template_json(
    info: TemplateInfo, cpu_count: int, memory_mb: int, disk_size_mb: int
) -> dict[str, Any]:
    created = rfc3339(datetime.fromisoformat(info.created).timestamp())
    aliases = template_aliases(info.name)
    return {
        "templateID": info.name,
        # Templates are built once and not versioned: one stable build id per template name.
        "buildID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"coppice-template:{info.name}")),
        "cpuCount": cpu_count,
        "memoryMB": memory_mb,
        "diskSizeMB": disk_size_mb,
        "public": False,
        "aliases": aliases,
        "names": [info.name, *aliases],
        "createdAt": created,
        "updatedAt": created,
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1,
        "envdVersion": ENVD_VERSION,
        "buildStatus": "ready",
    }


def template_with_builds_json(
    info: TemplateInfo, cpu_count: int, memory_mb: int, disk_size_mb: int
) -> dict[str, Any]:
    body = template_json(info, cpu_count, memory_mb, disk_size_mb)
    body["builds"] = [
        {
            "buildID": body["buildID"],
            "status": "ready",
            "createdAt": body["createdAt"],
            "updatedAt": body["updatedAt"],
            "finishedAt": body["createdAt"],
            "cpuCount": cpu_count,
            "memoryMB": memory_mb,
            "diskSizeMB": disk_size_mb,
            "envdVersion": ENVD_VERSION,
        }
    ]
    return body
