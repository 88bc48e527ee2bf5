"""The gateway: ONE ASGI app serving envd (and the code interpreter) for every sandbox
(server.py builds it and runs its listeners).

Per request, in order: `api.<domain>` goes to the lifecycle API (proxied to its listener) →
CORS preflight → routing (Host / E2b headers / most recent; 502 if the sandbox is not live) →
the traffic token gate (sandboxes without public traffic, every port but envd's) → the handler
set of the port (49983 envd, 49999 interpreter, any other port proxied to the sandbox's own
server, HTTP and WebSocket) → the access token gate → connectrpc (`process.Process`,
`filesystem.Filesystem`, gRPC reflection; Connect, gRPC and gRPC-Web) or envd's HTTP routes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coppice_envd.envd_api.routes import HTTPRequest, Routes
from coppice_envd.http.asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    request_headers,
    send_error,
    send_json,
    send_not_found,
    send_response,
)
from coppice_envd.permissions.auth import UNAUTHORIZED_MESSAGE, basic_auth_user, passes_token_gate
from coppice_envd.proxy import Proxy, Target, UpstreamUnreachable
from coppice_envd.request import RequestScope, enter_request
from coppice_envd.routing import (
    PORT_NOT_OPEN,
    SANDBOX_NOT_FOUND,
    Route,
    RoutingError,
    is_api_host,
    route_request,
    sandbox_from_host,
    traffic_refusal,
)
from coppice_envd.sandboxes import SandboxLookup, SandboxStates
from coppice_jails._libc import libc as _libc
from coppice_jails.envd_facts import INTERPRETER_PORT

log = logging.getLogger(__name__)

# On the interpreter port the gateway itself still serves the seed's file listing.
_GATEWAY_PATHS_ON_INTERPRETER_PORT = frozenset({"/files/list"})
_CORS_EXPOSED = (
    "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Location, Cache-Control, "
    "X-Content-Type-Options"
)
_CORS_MAX_AGE = "7200"
_NOSNIFF = [("x-content-type-options", "nosniff")]
API_UNREACHABLE = "The sandbox API is not reachable"


class ResponseCut(Exception):
    """Raised by a response's `send` once its sandbox has ended: the response stops short and
    its connection drops, as when envd's VM goes away, so no client takes a half-told story
    (a killed command's exit, an execution's error) for a result. The SDKs then probe /health,
    get the 502 for a sandbox that is gone and report it as killed."""


class _Response:
    """One response in flight for a sandbox."""

    __slots__ = ("cors", "cut")

    def __init__(self) -> None:
        self.cut = False
        self.cors = True  # envd's CORS headers are added; not to a proxied server's response


_AF_UNSPEC_ADDRESS = struct.pack("H14x", socket.AF_UNSPEC)


def _reset_connection(client: Any, server: Any) -> None:
    """Reset the TCP connection between `client` and `server` (a connect to AF_UNSPEC makes
    the kernel abort it with RST). hypercorn gives an app no handle on its socket: it is found
    among this process's own. Blocking."""
    if not client or not server:
        return
    wanted = ((client[0], int(client[1])), (server[0], int(server[1])))
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        with sock:
            try:
                ends = (tuple(sock.getpeername()[:2]), tuple(sock.getsockname()[:2]))
            except (OSError, TypeError):
                continue  # not connected, or not an internet socket
            if ends == wanted:
                _libc.connect(sock.fileno(), _AF_UNSPEC_ADDRESS, len(_AF_UNSPEC_ADDRESS))
                return


class Gateway:
    """The gateway's ASGI app (see the module docstring for the order of things)."""

    def __init__(
        self,
        lookup: SandboxLookup,
        *,
        rpc_apps: dict[str, ASGIApp],
        rpc_methods: frozenset[str],
        routes: Routes,
        interpreter: ASGIApp | None,
        sandboxes: SandboxStates,
        lifespan: ASGIApp,
        proxy: Proxy | None = None,
        api: Target | None = None,
        domain: str = "",
        host_ports: frozenset[int] = frozenset(),
    ) -> None:
        """`proxy` forwards the sandboxes' other ports (and `api.<domain>` to `api`, the
        lifecycle API's listener). `host_ports` are this service's own listeners: never proxied
        to on a jail that shares the host's loopback (a request would come back to itself)."""
        self._lookup = lookup
        self._rpc_apps = rpc_apps  # "/<package>.<Service>" → app
        self._rpc_methods = rpc_methods
        self._routes = routes
        self._interpreter = interpreter
        self.sandboxes = sandboxes
        self._lifespan = lifespan
        self._proxy = proxy or Proxy()
        self._api = api
        self._domain = domain
        self._host_ports = host_ports
        self._loopback: dict[str, bool] = {}
        self._responses: dict[str, set[_Response]] = {}  # sandbox id → responses in flight
        self._ending: set[str] = set()  # sandboxes being killed: gone for every new request

    def sandbox_ending(self, sandbox_id: str) -> None:
        """Cut every response in flight for the sandbox and answer new requests for it as for
        a sandbox that is gone (call before its jail is stopped, so that nothing its death
        causes reaches a client as a clean ending, and a client's health probe right after
        the cut is told the sandbox was killed)."""
        self._ending.add(sandbox_id)
        for response in self._responses.pop(sandbox_id, ()):
            response.cut = True

    async def sandbox_stopped(self, sandbox_id: str) -> None:
        """The sandbox's jail has ended (routing no longer finds it): everything the gateway
        keeps for it is forgotten at once, and closed by the time this returns."""
        self._ending.discard(sandbox_id)
        self._proxy.forget(sandbox_id)
        await self.sandboxes.closed(sandbox_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    def _for_api(self, headers: dict[str, str]) -> bool:
        return self._api is not None and is_api_host(headers.get("host", ""), self._domain)

    async def _serve_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`api.<domain>`: the lifecycle API answers, untouched (its own CORS, its own errors)."""
        assert self._api is not None
        try:
            await self._proxy.forward(self._api, scope, receive, send)
        except UpstreamUnreachable as e:
            log.warning("the lifecycle API did not answer: %s", e)
            await _refuse(scope, send, 502, {"code": 502, "message": API_UNREACHABLE})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = request_headers(scope)
        if self._for_api(headers):
            try:
                await self._serve_api(scope, receive, send)
            except Exception:
                log.exception("API request %s %s failed", scope["method"], scope["path"])
            return
        started = False
        response = _Response()

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if response.cut:
                raise ResponseCut
            if message["type"] == "http.response.start":
                started = True
                response_headers = message.get("headers", [])
                if (
                    response.cors
                    and "origin" in headers
                    and not any(
                        name == b"access-control-allow-origin" for name, _ in response_headers
                    )
                ):
                    message = {**message, "headers": [*response_headers, *_CORS]}
            await send(message)

        try:
            await self._serve(scope, receive, tracking_send, headers, response)
        except ResponseCut:
            # hypercorn ends a response that stops short with a clean close (FIN) over HTTP/1.1,
            # which some SDK versions read as a protocol error, not a lost connection; over h2 it
            # just forgets the stream (no RST_STREAM), and the client waits out its timeout. So
            # the connection is reset: over HTTP/1.1 it carries this one response; over h2 only
            # when the Host names this sandbox, as SDK clients keep one connection per host name
            # (a connection to one origin for every sandbox, E2B_SANDBOX_URL, is left alone).
            http1 = str(scope.get("http_version", "1.1")).startswith("1")
            if http1 or sandbox_from_host(headers.get("host", "")) is not None:
                await asyncio.to_thread(_reset_connection, scope.get("client"), scope.get("server"))
        except ConnectError as e:
            if e.code != Code.CANCELED:  # a client that left is no failure of ours
                log.exception("gateway request %s %s failed", scope["method"], scope["path"])
        except Exception:
            log.exception("gateway request %s %s failed", scope["method"], scope["path"])
            if not started:
                await send_error(send, 500, "internal server error")

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        response: _Response,
    ) -> None:
        preflight = (
            scope["method"] == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        )
        try:
            route = self._route(scope, headers)
        except RoutingError as e:
            if preflight:
                await _preflight(send, headers)
            else:
                await send_json(send, 502, e.body(), _NOSNIFF)
            return
        if route.proxied:
            response.cors = False  # the sandbox's server answers for itself, preflights too
        elif preflight:
            await _preflight(send, headers)
            return
        sandbox_id = route.sandbox.sandbox_id
        responses = self._responses.setdefault(sandbox_id, set())
        responses.add(response)
        try:
            await self._serve_sandbox(scope, receive, send, headers, route)
        finally:
            responses.discard(response)
            if not responses and self._responses.get(sandbox_id) is responses:
                del self._responses[sandbox_id]

    async def _serve_sandbox(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], route: Route
    ) -> None:
        method, path = scope["method"], scope["path"]
        refusal = traffic_refusal(route, headers)
        if refusal is not None:
            await send_json(send, 403, refusal)
            return
        if route.proxied:
            await self._forward(route, scope, receive, send)
            return
        request_scope = RequestScope(
            sandbox=route.sandbox, basic_user=basic_auth_user(headers.get("authorization"))
        )
        enter_request(request_scope)
        if route.port == INTERPRETER_PORT and path not in _GATEWAY_PATHS_ON_INTERPRETER_PORT:
            if self._interpreter is None:
                await send_error(send, 502, "the code interpreter is not served here")
            else:
                await self._interpreter(scope, receive, send)
            return
        if not passes_token_gate(
            route.sandbox.access_token, headers.get("x-access-token"), method, path
        ):
            await send_error(send, 401, UNAUTHORIZED_MESSAGE)
            return
        service = "/" + path.split("/", 2)[1] if path.count("/") >= 2 else ""
        rpc_app = self._rpc_apps.get(service)
        if rpc_app is not None:
            if path not in self._rpc_methods:
                await send_not_found(send)
            elif method != "POST":
                await send_response(send, 405, headers=[("allow", "POST")])
            else:
                await rpc_app(scope, receive, send)
            return
        await self._routes.dispatch(
            HTTPRequest.from_asgi(scope, receive, headers, request_scope), send
        )

    def _route(self, scope: Scope, headers: dict[str, str]) -> Route:
        """The live sandbox and port a request is for; RoutingError when none (a sandbox being
        killed counts as gone)."""
        server = scope.get("server")
        route = route_request(headers, server[1] if server else None, self._lookup)
        if route.sandbox.sandbox_id in self._ending:
            raise RoutingError(SANDBOX_NOT_FOUND, route.sandbox.sandbox_id)
        return route

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket: to the API, or to a sandbox's proxied port (envd serves none)."""
        headers = request_headers(scope)
        try:
            if self._for_api(headers):
                await self._serve_api(scope, receive, send)
                return
            try:
                route = self._route(scope, headers)
            except RoutingError as e:
                await _refuse(scope, send, 502, e.body())
                return
            refusal = traffic_refusal(route, headers)
            if refusal is not None:
                await _refuse(scope, send, 403, refusal)
            elif route.proxied:
                await self._forward(route, scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
        except Exception:
            log.exception("gateway websocket %s failed", scope["path"])

    async def _forward(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        """To the server on the route's port inside the sandbox, at the jail's own address;
        502 as E2B's proxy answers when nothing listens there."""
        sandbox = route.sandbox
        target = Target(sandbox.jail.address, route.port, sandbox.sandbox_id)
        try:
            if route.port in self._host_ports and self._is_loopback(target.host):
                raise UpstreamUnreachable(f"{target.port} is one of the service's own ports")
            await self._proxy.forward(target, scope, receive, send)
        except UpstreamUnreachable as e:
            log.debug("sandbox %s port %d: %s", sandbox.sandbox_id, route.port, e)
            await _refuse(
                scope, send, 502, RoutingError(PORT_NOT_OPEN, sandbox.sandbox_id, route.port).body()
            )

    def _is_loopback(self, host: str) -> bool:
        loopback = self._loopback.get(host)
        if loopback is None:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            self._loopback[host] = loopback
        return loopback


async def _refuse(scope: Scope, send: Send, status: int, body: dict[str, object]) -> None:
    """An error as JSON; on a WebSocket handshake as its HTTP answer (where the server can give
    one, else a close)."""
    if scope["type"] == "http":
        await send_json(send, status, body, _NOSNIFF)
    elif "websocket.http.response" in scope.get("extensions", {}):
        raw = json.dumps(body, separators=(",", ":")).encode() + b"\n"
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(raw)).encode()),
        ]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": raw, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008})


_CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-expose-headers", _CORS_EXPOSED.encode()),
    (b"vary", b"Origin"),
]


async def _preflight(send: Send, headers: dict[str, str]) -> None:
    """rs/cors as envd configures it: any origin, the usual methods, any header, 2 h max age."""
    requested = headers.get("access-control-request-method", "").upper()
    allowed = requested in ("HEAD", "GET", "POST", "PUT", "PATCH", "DELETE")
    response = [("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
    if allowed:
        response += [
            ("access-control-allow-origin", "*"),
            ("access-control-allow-methods", requested),
            ("access-control-max-age", _CORS_MAX_AGE),
        ]
        if requested_headers := headers.get("access-control-request-headers"):
            response.append(("access-control-allow-headers", requested_headers))
    await send_response(send, 204, headers=response)
