"""Which sandbox, and which of its servers, a gateway request is for.

First `api.<domain>[:port]`, the lifecycle API (`is_api_host`). Then, in order: the Host header
`<port>-<id>.<domain>[:port]`; else the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers
(E2B_SANDBOX_URL and debug clients); else, when nothing names a sandbox (debug mode's
`localhost:49983`), the most recently started one. The port label picks the handler set (envd,
the interpreter, or any other port: proxied into the sandbox); without one, the listener's own
port does. A sandbox created without public traffic needs its traffic token on every port but
envd's (`traffic_refusal`), as E2B's proxy asks it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from coppice_envd.sandboxes import SandboxLookup, SandboxView
from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT

# The sandbox id of SDKs in debug mode: it names no sandbox, so the most recent one serves.
DEBUG_SANDBOX_ID = "debug_sandbox_id"
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"


def is_api_host(host: str, domain: str) -> bool:
    """Whether Host `host` is `api.<domain>` (either may carry a port; ports are not compared:
    the name is what the SDKs derive from E2B_DOMAIN)."""
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.lower() == "api." + domain.partition(":")[0].lower()


def sandbox_from_host(host: str) -> tuple[str, str] | None:
    """(port label, sandbox id) from `<port>-<id>.<domain>[:port]`; None if it names none."""
    hostname = host.partition(":")[0]
    label, dash, rest = hostname.partition("-")
    sandbox_id, dot, _domain = rest.partition(".")
    if not dash or not dot or not label.isdigit() or not sandbox_id:
        return None
    return label, sandbox_id


class RoutingError(Exception):
    """The request names no live sandbox (or a port it does not serve): the edge's 502, worded
    as E2B's proxy words it — the SDKs read "was not found" as a sandbox that is gone."""

    def __init__(self, message: str, sandbox_id: str | None = None, port: int | None = None):
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.port = port

    def body(self) -> dict[str, object]:
        """The 502's JSON body, as E2B's proxy sends it."""
        body: dict[str, object] = {"message": str(self), "code": 502}
        if self.sandbox_id is not None:
            body["sandboxId"] = self.sandbox_id
        if self.port is not None:
            body["port"] = self.port
        return body


SANDBOX_NOT_FOUND = "The sandbox was not found"
PORT_NOT_OPEN = "The sandbox is running but port is not open"


@dataclass(frozen=True)
class Route:
    sandbox: SandboxView
    port: int  # ENVD_PORT, INTERPRETER_PORT, or another port of the sandbox

    @property
    def proxied(self) -> bool:
        """A port the gateway does not serve itself: proxied to the sandbox's own server."""
        return self.port not in (ENVD_PORT, INTERPRETER_PORT)


def traffic_refusal(route: Route, headers: Mapping[str, str]) -> dict[str, object] | None:
    """E2B's 403 body when the request lacks the sandbox's traffic token (or has another);
    None when it may pass. envd's port has its own access token, so it needs none."""
    expected = route.sandbox.traffic_access_token
    if expected is None or route.port == ENVD_PORT:
        return None
    given = headers.get(TRAFFIC_TOKEN_HEADER)
    if given is None or given == "":
        problem = f"Token header '{TRAFFIC_TOKEN_HEADER}' is missing"
    elif hmac.compare_digest(given.encode(), expected.encode()):
        return None
    else:
        problem = f"Provided token in header '{TRAFFIC_TOKEN_HEADER}' is invalid"
    return {
        "sandboxId": route.sandbox.sandbox_id,
        "message": f"Sandbox is secured with traffic access token. {problem}",
        "code": 403,
    }


def route_request(
    headers: Mapping[str, str], listener_port: int | None, lookup: SandboxLookup
) -> Route:
    """The sandbox and port a request is for; `headers` has lower-case names."""
    named = sandbox_from_host(headers.get("host", ""))
    if named is not None:
        label, sandbox_id = named
    else:
        sandbox_id = headers.get("e2b-sandbox-id", "")
        label = headers.get("e2b-sandbox-port", "")
    if sandbox_id and sandbox_id != DEBUG_SANDBOX_ID:
        sandbox = lookup.get(sandbox_id)
        if sandbox is None:
            raise RoutingError(SANDBOX_NOT_FOUND, sandbox_id)
    else:
        sandbox = lookup.most_recent()
        if sandbox is None:
            raise RoutingError(f"{SANDBOX_NOT_FOUND}: no sandbox is running")
    if label:
        port = int(label) if label.isdigit() else -1
    else:
        port = INTERPRETER_PORT if listener_port == INTERPRETER_PORT else ENVD_PORT
    if not 0 < port < 65536:
        raise RoutingError(PORT_NOT_OPEN, sandbox.sandbox_id, port if port >= 0 else None)
    return Route(sandbox=sandbox, port=port)
