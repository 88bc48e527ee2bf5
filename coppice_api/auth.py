"""API keys: which keys the service accepts, and the middleware that checks `X-API-Key`."""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from coppice_api.errors import error_response

KEYS_ENV = "COPPICE_API_KEYS"
KEYS_FILENAME = "api-keys"
# Paths any client may call without a key (liveness probes, the API description).
PUBLIC_PATHS = frozenset({"/health", "/openapi.json"})
UNAUTHORIZED_MESSAGE = (
    "Invalid API key, please visit https://e2b.dev/docs/api-key for more information."
)


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[str, ...]
    created: str | None  # a key generated just now (for `serve` to print), else None
    source: str  # where the keys came from, for the service log


def new_api_key() -> str:
    # E2B's format (`e2b_` + hex), so tools that check the shape accept it.
    return "e2b_" + secrets.token_hex(20)


def read_api_keys(data_dir: Path, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The configured keys, creating none: `COPPICE_API_KEYS` (comma-separated), else the keys
    file in the data dir (one per line, `#` comments). Blocking file I/O."""
    env = os.environ if environ is None else environ
    from_env = tuple(k.strip() for k in env.get(KEYS_ENV, "").split(",") if k.strip())
    if from_env:
        return from_env
    path = data_dir / KEYS_FILENAME
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return ()
    return tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))


def load_api_keys(data_dir: Path, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """The configured keys (see read_api_keys); if there are none, create a key and store it in
    the keys file (mode 0600), for `serve` to print. Blocking file I/O: call it at startup."""
    env = os.environ if environ is None else environ
    keys = read_api_keys(data_dir, env)
    if keys:
        source = KEYS_ENV if env.get(KEYS_ENV, "").strip(", ") else str(data_dir / KEYS_FILENAME)
        return ApiKeys(keys, None, source)
    path = data_dir / KEYS_FILENAME
    key = new_api_key()
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    return ApiKeys((key,), key, str(path))


def api_key_middleware(keys: Sequence[str]) -> Middleware:
    encoded = [k.encode() for k in keys]

    def accepted(candidate: str) -> bool:
        given = candidate.encode()
        # Compare with every key (no early exit) so timing does not tell which one matched.
        return any([hmac.compare_digest(given, key) for key in encoded])

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.get("X-API-Key")
        if not given or not accepted(given):
            return error_response(401, UNAUTHORIZED_MESSAGE)
        return await handler(request)

    return check_api_key
