"""Every error the API returns is JSON `{"code": <http status>, "message": "..."}` (the SDKs
parse it); this module maps the manager's errors and aiohttp's own to that shape."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from coppice_jails.manager import (
    Conflict,
    InvalidArgument,
    NotFound,
    OperationFailed,
    SandboxError,
)
from coppice_jails.registry import InvalidPageToken

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer with an HTTP status; raised by handlers and validators."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, message)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message}, status=status)


def _status_of(error: SandboxError) -> int:
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, InvalidArgument):
        return 400
    if isinstance(error, OperationFailed):
        return 500
    return 500


def error_of(error: SandboxError) -> tuple[int, str]:
    """(status, message) for a manager error, e.g. for one failed fork."""
    return _status_of(error), str(error)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message)
    except SandboxError as e:
        status = _status_of(e)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, e)
        return error_response(status, str(e))
    except InvalidPageToken as e:
        return error_response(400, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = error_response(e.status, e.reason)
        if "Allow" in e.headers:
            response.headers["Allow"] = e.headers["Allow"]
        return response
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "Internal server error")
