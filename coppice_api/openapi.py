"""The OpenAPI 3 document of exactly what this service implements (served at /openapi.json;
a schemathesis test against the running service keeps it true)."""

from __future__ import annotations

from typing import Any

from coppice_api.schemas import (
    MAX_ENV_VARS,
    MAX_METADATA_ENTRIES,
    MAX_PAGE,
)
from coppice_jails.envd_facts import ENVD_VERSION
from coppice_jails.manager import MAX_TIMEOUT_SECONDS

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str = "OK", headers: Schema | None = None) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


_ERRORS = {
    "400": _error("Bad request: the message names the field"),
    "401": _error("Missing or wrong X-API-Key"),
    "404": _error("No such sandbox or template"),
    "409": _error("Conflict with the sandbox's state"),
    "413": _error("Request body too large"),
    "500": _error("A backend failed; what was made has been rolled back"),
}


def _errors(*codes: int) -> Schema:
    return {str(c): _ERRORS[str(c)] for c in (400, 401, *codes)}


def _body(schema: Schema, required: bool) -> Schema:
    return {"required": required, "content": {JSON: {"schema": schema}}}


_SANDBOX_ID = {
    "name": "sandboxID",
    "in": "path",
    "required": True,
    # An id, or the legacy `<id>-<clientID>` form.
    "schema": {"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]*)?$"},
}
_TEMPLATE_ID = {
    "name": "templateID",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}

_ALIAS = {"name": "alias", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    parameter: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        parameter["description"] = description
    return parameter


def _op(summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"summary": summary, "responses": responses, **extra}


_LIFETIME = {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_SECONDS}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DATE = {"type": "string", "format": "date-time"}
_NEXT_TOKEN = {
    "X-Next-Token": {
        "description": "Token of the next page; absent on the last page",
        "schema": {"type": "string"},
    }
}

_SCHEMAS: Schema = {
    "Error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
    },
    "NewSandbox": {
        "type": "object",
        "required": ["templateID"],
        "properties": {
            "templateID": {"type": "string", "minLength": 1},
            "timeout": _LIFETIME,
            "metadata": {**_STRING_MAP, "maxProperties": MAX_METADATA_ENTRIES},
            "envVars": {**_STRING_MAP, "maxProperties": MAX_ENV_VARS},
            "secure": {"type": "boolean"},
            "autoPause": {"type": "boolean"},
            "allow_internet_access": {"type": "boolean"},
            "network": {
                "type": "object",
                "properties": {"allowPublicTraffic": {"type": "boolean"}},
            },
        },
    },
    "Sandbox": {
        "type": "object",
        "required": ["templateID", "sandboxID", "clientID", "envdVersion"],
        "properties": {
            "templateID": {"type": "string"},
            "sandboxID": {"type": "string"},
            "clientID": {"type": "string"},
            "envdVersion": {"type": "string", "example": ENVD_VERSION},
            "alias": {"type": "string"},
            "envdAccessToken": {"type": "string"},
            "trafficAccessToken": {"type": "string", "nullable": True},
            "domain": {"type": "string", "nullable": True},
        },
    },
    "ListedSandbox": {
        "type": "object",
        "required": [
            "templateID",
            "sandboxID",
            "clientID",
            "startedAt",
            "endAt",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "state",
            "envdVersion",
        ],
        "properties": {
            "templateID": {"type": "string"},
            "alias": {"type": "string"},
            "sandboxID": {"type": "string"},
            "clientID": {"type": "string"},
            "startedAt": _DATE,
            "endAt": _DATE,
            "cpuCount": {"type": "integer"},
            "memoryMB": {"type": "integer"},
            "diskSizeMB": {"type": "integer"},
            "metadata": _STRING_MAP,
            "state": {"type": "string", "enum": ["running", "paused"]},
            "envdVersion": {"type": "string"},
        },
    },
    "SandboxDetail": {
        "allOf": [
            _ref("ListedSandbox"),
            {
                "type": "object",
                "properties": {
                    "envdAccessToken": {"type": "string"},
                    "domain": {"type": "string", "nullable": True},
                    "allowInternetAccess": {"type": "boolean", "nullable": True},
                    "network": {
                        "type": "object",
                        "properties": {"allowPublicTraffic": {"type": "boolean"}},
                    },
                    "lifecycle": {
                        "type": "object",
                        "required": ["autoResume", "onTimeout"],
                        "properties": {
                            "autoResume": {"type": "boolean"},
                            "onTimeout": {"type": "string", "enum": ["kill", "pause"]},
                        },
                    },
                },
            },
        ]
    },
    "SandboxMetric": {
        "type": "object",
        "required": [
            "timestamp",
            "timestampUnix",
            "cpuCount",
            "cpuUsedPct",
            "memUsed",
            "memTotal",
            "memCache",
            "diskUsed",
            "diskTotal",
        ],
        "properties": {
            "timestamp": _DATE,
            "timestampUnix": {"type": "integer"},
            "cpuCount": {"type": "integer"},
            "cpuUsedPct": {"type": "number"},
            "memUsed": {"type": "integer"},
            "memTotal": {"type": "integer"},
            "memCache": {"type": "integer"},
            "diskUsed": {"type": "integer"},
            "diskTotal": {"type": "integer"},
        },
    },
    "SnapshotInfo": {
        "type": "object",
        "required": ["snapshotID", "names"],
        "properties": {
            "snapshotID": {"type": "string"},
            "names": {"type": "array", "items": {"type": "string"}},
        },
    },
    "SandboxForkResult": {
        "type": "object",
        "properties": {"sandbox": _ref("Sandbox"), "error": _ref("Error")},
    },
    "SandboxLogEntry": {
        "type": "object",
        "required": ["timestamp", "level", "message", "fields"],
        "properties": {
            "timestamp": _DATE,
            "level": {"type": "string", "enum": ["debug", "info", "warn", "error"]},
            "message": {"type": "string"},
            "fields": _STRING_MAP,
        },
    },
    "SandboxLogs": {
        "type": "object",
        "required": ["logs", "logEntries"],
        "properties": {
            "logs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["timestamp", "line"],
                    "properties": {"timestamp": _DATE, "line": {"type": "string"}},
                },
            },
            "logEntries": {"type": "array", "items": _ref("SandboxLogEntry")},
        },
    },
    "SandboxLogsV2": {
        "type": "object",
        "required": ["logs"],
        "properties": {"logs": {"type": "array", "items": _ref("SandboxLogEntry")}},
    },
    "TemplateAlias": {
        "type": "object",
        "required": ["templateID", "public"],
        "properties": {"templateID": {"type": "string"}, "public": {"type": "boolean"}},
    },
    "Template": {
        "type": "object",
        "required": [
            "templateID",
            "buildID",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "public",
            "aliases",
            "names",
            "createdAt",
            "updatedAt",
            "createdBy",
            "lastSpawnedAt",
            "spawnCount",
            "buildCount",
            "envdVersion",
            "buildStatus",
        ],
        "properties": {
            "templateID": {"type": "string"},
            "buildID": {"type": "string", "format": "uuid"},
            "cpuCount": {"type": "integer"},
            "memoryMB": {"type": "integer"},
            "diskSizeMB": {"type": "integer"},
            "public": {"type": "boolean"},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "names": {"type": "array", "items": {"type": "string"}},
            "createdAt": _DATE,
            "updatedAt": _DATE,
            "createdBy": {"type": "object", "nullable": True},
            "lastSpawnedAt": {**_DATE, "nullable": True},
            "spawnCount": {"type": "integer"},
            "buildCount": {"type": "integer"},
            "envdVersion": {"type": "string"},
            "buildStatus": {"type": "string", "enum": ["building", "waiting", "ready", "error"]},
        },
    },
    "TemplateWithBuilds": {
        "allOf": [
            _ref("Template"),
            {
                "type": "object",
                "required": ["builds"],
                "properties": {"builds": {"type": "array", "items": {"type": "object"}}},
            },
        ]
    },
}

_TIMEOUT_BODY = {
    "type": "object",
    "required": ["timeout"],
    "properties": {"timeout": {"type": "integer", "minimum": 0}},
}
_CREATE = _op(
    "Create a sandbox from a template or snapshot",
    {"201": _json(_ref("Sandbox"), "Created"), **_errors(404, 413, 500)},
    requestBody=_body(_ref("NewSandbox"), required=True),
)
_CONNECT = _op(
    "Connect: extend a running sandbox's end time (200) or resume a paused one (201)",
    {
        "200": _json(_ref("Sandbox"), "It was running"),
        "201": _json(_ref("Sandbox"), "It was paused and has been resumed"),
        **_errors(404, 409, 500),
    },
    parameters=[_SANDBOX_ID],
    requestBody=_body(
        {
            "type": "object",
            "properties": {
                "timeout": _LIFETIME,
                "memory": {"type": "boolean"},
            },
        },
        required=False,
    ),
)
_NO_CONTENT = {"204": {"description": "Done"}}

_PATHS: Schema = {
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": _json({"type": "object"})},
        }
    },
    "/health": {
        "get": {
            "summary": "Liveness",
            "security": [],
            "responses": {
                "200": {
                    "description": "Healthy",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/sandboxes": {
        "post": {**_CREATE, "operationId": "createSandboxV1"},
        "get": _op(
            "List running sandboxes (deprecated)",
            {"200": _json({"type": "array", "items": _ref("ListedSandbox")}), **_errors()},
            parameters=[_query("metadata", {"type": "string"}, "k=v&k2=v2, URL-encoded")],
        ),
    },
    "/v2/sandboxes": {
        "post": {**_CREATE, "operationId": "createSandbox"},
        "get": _op(
            "List sandboxes, newest first, one page at a time",
            {
                "200": _json(
                    {"type": "array", "items": _ref("ListedSandbox")},
                    headers={
                        **_NEXT_TOKEN,
                        "X-Total-Running": {"schema": {"type": "string"}},
                    },
                ),
                **_errors(),
            },
            parameters=[
                _query("metadata", {"type": "string"}, "k=v pairs, keys/values percent-encoded"),
                _query("state", {"type": "string"}, "comma list of running, paused"),
                _query("template", {"type": "string"}),
                _query("startedAfter", _DATE),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
                _query("nextToken", {"type": "string"}),
            ],
        ),
    },
    "/sandboxes/metrics": {
        "get": _op(
            "Current metrics of several sandboxes",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["sandboxes"],
                        "properties": {
                            "sandboxes": {
                                "type": "object",
                                "additionalProperties": _ref("SandboxMetric"),
                            }
                        },
                    }
                ),
                **_errors(),
            },
            parameters=[_query("sandbox_ids", {"type": "string"}, "comma list, at most 100")],
        )
    },
    "/sandboxes/{sandboxID}": {
        "get": _op(
            "Get a sandbox",
            {"200": _json(_ref("SandboxDetail")), **_errors(404)},
            parameters=[_SANDBOX_ID],
        ),
        "delete": _op(
            "Kill a sandbox and remove its storage",
            {**_NO_CONTENT, **_errors(404, 500)},
            parameters=[_SANDBOX_ID],
        ),
    },
    "/sandboxes/{sandboxID}/timeout": {
        "post": _op(
            "Set the end time to now + timeout (shorter or longer)",
            {**_NO_CONTENT, **_errors(404, 413)},
            parameters=[_SANDBOX_ID],
            requestBody=_body(_TIMEOUT_BODY, required=True),
        )
    },
    "/sandboxes/{sandboxID}/refreshes": {
        "post": _op(
            "Extend the end time to now + duration, never shorten it",
            {**_NO_CONTENT, **_errors(404, 413)},
            parameters=[_SANDBOX_ID],
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {"duration": {"type": "integer", "minimum": 0, "maximum": 3600}},
                },
                required=False,
            ),
        )
    },
    "/sandboxes/{sandboxID}/pause": {
        "post": _op(
            "Pause (freeze) a running sandbox",
            {**_NO_CONTENT, **_errors(404, 409, 413, 500)},
            parameters=[_SANDBOX_ID],
            requestBody=_body(
                {"type": "object", "properties": {"memory": {"type": "boolean"}}}, required=False
            ),
        )
    },
    "/sandboxes/{sandboxID}/connect": {"post": {**_CONNECT, "operationId": "connectV1"}},
    "/v2/sandboxes/{sandboxID}/connect": {"post": {**_CONNECT, "operationId": "connect"}},
    "/sandboxes/{sandboxID}/resume": {
        "post": _op(
            "Resume a paused sandbox (deprecated; see connect)",
            {"201": _json(_ref("Sandbox"), "Resumed"), **_errors(404, 409, 413, 500)},
            parameters=[_SANDBOX_ID],
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {
                        "timeout": _LIFETIME,
                        "autoPause": {"type": "boolean"},
                    },
                },
                required=False,
            ),
        )
    },
    "/sandboxes/{sandboxID}/fork": {
        "post": _op(
            "Start `count` sandboxes with this sandbox's files; each succeeds or fails alone",
            {
                "201": _json({"type": "array", "items": _ref("SandboxForkResult")}, "Created"),
                **_errors(404, 413, 500),
            },
            parameters=[_SANDBOX_ID],
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {
                        "timeout": _LIFETIME,
                        "count": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                },
                required=False,
            ),
        )
    },
    "/sandboxes/{sandboxID}/snapshots": {
        "post": _op(
            "Snapshot a sandbox's files into a new template",
            {"201": _json(_ref("SnapshotInfo"), "Created"), **_errors(404, 409, 413, 500)},
            parameters=[_SANDBOX_ID],
            requestBody=_body(
                {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "memory": {"type": "boolean"}},
                },
                required=False,
            ),
        )
    },
    "/sandboxes/{sandboxID}/metrics": {
        "get": _op(
            "Current metrics of a sandboxes (empty while paused)",
            {"200": _json({"type": "array", "items": _ref("SandboxMetric")}), **_errors(404)},
            parameters=[
                _SANDBOX_ID,
                _query("start", {"type": "integer", "minimum": 0}),
                _query("end", {"type": "integer", "minimum": 0}),
            ],
        )
    },
    "/sandboxes/{sandboxID}/logs": {
        "get": _op(
            "Lifecycle and process events of a sandbox (deprecated shape)",
            {"200": _json(_ref("SandboxLogs")), **_errors(404)},
            parameters=[
                _SANDBOX_ID,
                _query("start", {"type": "integer", "minimum": 0}, "unix milliseconds"),
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 10000}),
            ],
        )
    },
    "/v2/sandboxes/{sandboxID}/logs": {
        "get": _op(
            "Lifecycle and process events of a sandbox",
            {"200": _json(_ref("SandboxLogsV2")), **_errors(404)},
            parameters=[
                _SANDBOX_ID,
                _query("cursor", {"type": "integer", "minimum": 0}, "unix milliseconds"),
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 1000}),
                _query("direction", {"type": "string", "enum": ["forward", "backward"]}),
                _query("level", {"type": "string", "enum": ["debug", "info", "warn", "error"]}),
                _query("search", {"type": "string", "maxLength": 256}),
            ],
        )
    },
    "/snapshots": {
        "get": _op(
            "List snapshots, newest first",
            {
                "200": _json({"type": "array", "items": _ref("SnapshotInfo")}, headers=_NEXT_TOKEN),
                **_errors(),
            },
            parameters=[
                _query("sandboxID", {"type": "string"}),
                _query("name", {"type": "string"}),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
                _query("nextToken", {"type": "string"}),
            ],
        )
    },
    "/templates": {
        "get": _op(
            "List templates",
            {"200": _json({"type": "array", "items": _ref("Template")}), **_errors()},
        )
    },
    "/templates/aliases/{alias}": {
        "get": _op(
            "Resolve a template name or alias",
            {"200": _json(_ref("TemplateAlias")), **_errors(404)},
            parameters=[_ALIAS],
        )
    },
    "/templates/{templateID}": {
        "get": _op(
            "Get a template or snapshot",
            {"200": _json(_ref("TemplateWithBuilds")), **_errors(404)},
            parameters=[_TEMPLATE_ID],
        ),
        "delete": _op(
            "Delete a snapshot or template that no sandbox uses",
            {**_NO_CONTENT, **_errors(404, 409, 500)},
            parameters=[_TEMPLATE_ID],
        ),
    },
}


def openapi_document(server_url: str | None = None) -> Schema:
    document: Schema = {
        "openapi": "3.0.3",
        "info": {
            "title": "Coppice lifecycle API",
            "version": "0.1.0",
            "description": "E2B's sandbox lifecycle API, as implemented by Coppice.",
        },
        "security": [{"ApiKeyAuth": []}],
        "paths": _PATHS,
        "components": {
            "securitySchemes": {
                "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
            "schemas": _SCHEMAS,
        },
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document
