"""The gateway: ONE ASGI app serving envd (and the code interpreter) for every sandbox, and the
hypercorn listeners that run it.

Per request, in order: CORS preflight → routing (Host / E2b headers / most recent; 502 if the
sandbox is not live) → the handler set of the port (49983 envd, 49999 interpreter) → the access
token gate → connectrpc (`process.Process`, `filesystem.Filesystem`, gRPC reflection; Connect,
gRPC and gRPC-Web) or envd's HTTP routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import uvloop
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc_grpcreflect import (
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from filesystem import filesystem_connect, filesystem_pb2
from hypercorn.asyncio import serve
from hypercorn.config import Config
from process import process_connect, process_pb2
from protobuf._codegen import file_desc
from protobuf.wkt.google.protobuf import timestamp_pb

from coppice_envd.envd_api import files
from coppice_envd.envd_api import routes as envd_http
from coppice_envd.envd_api.routes import HTTPRequest, Routes
from coppice_envd.filesystem.service import FilesystemService
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
    serve_lifespan,
)
from coppice_envd.permissions.auth import UNAUTHORIZED_MESSAGE, basic_auth_user, passes_token_gate
from coppice_envd.request import RequestScope, enter_request
from coppice_envd.routing import (
    SANDBOX_NOT_FOUND,
    Route,
    RoutingError,
    route_request,
)
from coppice_envd.rpc.codecs import GATEWAY_CODECS, GATEWAY_COMPRESSIONS
from coppice_envd.sandboxes import SandboxLookup, SandboxStates, UsesSandboxStates
from coppice_jails._libc import libc as _libc
from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# envd sets no request size limit; this bounds one RPC message (e.g. a SendInput chunk).
RPC_READ_MAX_BYTES = 32 * 1024 * 1024
# On the interpreter port the gateway itself still serves the seed's file listing.
_GATEWAY_PATHS_ON_INTERPRETER_PORT = frozenset({"/files/list"})
_CORS_EXPOSED = (
    "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Location, Cache-Control, "
    "X-Content-Type-Options"
)
_CORS_MAX_AGE = "7200"


class ResponseCut(Exception):
    """Raised by a response's `send` once its sandbox has ended: the response stops short and
    its connection drops, as when envd's VM goes away, so no client takes a half-told story
    (a killed command's exit, an execution's error) for a result. The SDKs then probe /health,
    get the 502 for a sandbox that is gone and report it as killed."""


class _Response:
    """One response in flight for a sandbox."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = False


def _reflection_files() -> list[Any]:
    """protobuf-py descriptors of our two services, as the reflection service wants them.

    Built from the google-protobuf descriptors in gen/ with protobuf-py's codegen helper (the
    only public way to turn a serialized FileDescriptorProto into a `DescFile`).
    """
    return [
        file_desc(filesystem_pb2.DESCRIPTOR.serialized_pb, [timestamp_pb.desc()], {}),
        file_desc(process_pb2.DESCRIPTOR.serialized_pb, [], {}),
    ]


def _method_paths(*descriptors: Any) -> frozenset[str]:
    return frozenset(
        f"/{service.full_name}/{method.name}"
        for descriptor in descriptors
        for service in descriptor.services_by_name.values()
        for method in service.methods
    )


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
    ) -> None:
        self._lookup = lookup
        self._rpc_apps = rpc_apps  # "/<package>.<Service>" → app
        self._rpc_methods = rpc_methods
        self._routes = routes
        self._interpreter = interpreter
        self.sandboxes = sandboxes
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

    def sandbox_stopped(self, sandbox_id: str) -> None:
        """The sandbox's jail has ended (routing no longer finds it): everything the gateway
        keeps for it is forgotten and closed."""
        self._ending.discard(sandbox_id)
        self.sandboxes.sandbox_stopped(sandbox_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = request_headers(scope)
        started = False
        response = _Response()

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if response.cut:
                raise ResponseCut
            if message["type"] == "http.response.start":
                started = True
                response_headers = message.get("headers", [])
                if "origin" in headers and not any(
                    name == b"access-control-allow-origin" for name, _ in response_headers
                ):
                    message = {**message, "headers": [*response_headers, *_CORS]}
            await send(message)

        try:
            await self._serve(scope, receive, tracking_send, headers, response)
        except ResponseCut:
            # hypercorn ends a response that stops short with a clean close (FIN), which some
            # SDK versions read as a protocol error, not a lost connection: reset it (HTTP/1.1,
            # one response per connection at a time; h2 resets just the stream).
            if str(scope.get("http_version", "1.1")).startswith("1"):
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
        method = scope["method"]
        if (
            method == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in (headers)
        ):
            await _preflight(send, headers)
            return
        server = scope.get("server")
        try:
            route = route_request(headers, server[1] if server else None, self._lookup)
            if route.sandbox.sandbox_id in self._ending:
                raise RoutingError(SANDBOX_NOT_FOUND, route.sandbox.sandbox_id)
        except RoutingError as e:
            await send_json(send, 502, e.body(), [("x-content-type-options", "nosniff")])
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

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        interpreter = await _InterpreterLifespan.start(self._interpreter, scope)

        async def shutdown() -> None:
            await self.sandboxes.aclose()
            await interpreter.shutdown()

        await serve_lifespan(receive, send, startup=interpreter.startup, shutdown=shutdown)


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


class _InterpreterLifespan:
    """Runs the interpreter app's own lifespan alongside the gateway's (if it has one)."""

    def __init__(self, task: asyncio.Task[None] | None) -> None:
        self._task = task
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()

    @classmethod
    async def start(cls, app: ASGIApp | None, scope: Scope) -> _InterpreterLifespan:
        lifespan = cls(None)
        if app is not None:

            async def run() -> None:
                await app(scope, lifespan._to_app.get, lifespan._from_app.put)

            lifespan._task = asyncio.create_task(run())
        return lifespan

    async def _exchange(self, message_type: str) -> Message | None:
        if self._task is None:
            return None
        await self._to_app.put({"type": message_type})
        reply = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait({reply, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if reply.done():
            return reply.result()
        reply.cancel()
        with contextlib.suppress(Exception):
            self._task.result()  # an app without lifespan support just returns or raises
        self._task = None
        return None

    async def startup(self) -> str | None:
        reply = await self._exchange("lifespan.startup")
        if reply is not None and reply["type"] == "lifespan.startup.failed":
            return str(reply.get("message", "interpreter startup failed"))
        return None

    async def shutdown(self) -> None:
        await self._exchange("lifespan.shutdown")
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


class _NoProcessService(process_connect.Process):
    """Every Process RPC answers `unimplemented` (the generated defaults)."""


def build_gateway(
    lookup: SandboxLookup,
    *,
    process: process_connect.Process | None,
    interpreter: ASGIApp | None = None,
    filesystem: FilesystemService | None = None,
) -> Gateway:
    """The gateway app. `process` may be None (its RPCs then answer `unimplemented`). The
    services that keep per-sandbox state are handed the gateway's one owner of it."""
    filesystem = filesystem or FilesystemService()
    metrics = envd_http.MetricsSampler()
    sandboxes = SandboxStates()
    for service in (process, interpreter, filesystem, metrics):
        if isinstance(service, UsesSandboxStates):
            service.sandboxes = sandboxes
    reflection = _reflection_files()
    process_app = process_connect.ProcessASGIApplication(
        process if process is not None else _NoProcessService(),
        read_max_bytes=RPC_READ_MAX_BYTES,
        codecs=GATEWAY_CODECS,
        compressions=GATEWAY_COMPRESSIONS,
    )
    filesystem_app = filesystem_connect.FilesystemASGIApplication(
        filesystem,
        read_max_bytes=RPC_READ_MAX_BYTES,
        codecs=GATEWAY_CODECS,
        compressions=GATEWAY_COMPRESSIONS,
    )
    reflection_v1 = ServerReflectionASGIApplication(ServerReflectionService(*reflection))
    reflection_alpha = ServerReflectionAlphaASGIApplication(
        ServerReflectionAlphaService(*reflection)
    )
    rpc_apps: dict[str, ASGIApp] = {
        app.path: app for app in (process_app, filesystem_app, reflection_v1, reflection_alpha)
    }
    reflection_methods = frozenset(
        f"{app.path}/ServerReflectionInfo" for app in (reflection_v1, reflection_alpha)
    )
    routes = Routes()
    routes.add("GET", "/health", envd_http.health)
    routes.add("GET", "/envs", envd_http.envs)
    routes.add("GET", "/metrics", metrics)
    routes.add("POST", "/init", envd_http.init)
    files.add_routes(routes)
    return Gateway(
        lookup,
        rpc_apps=rpc_apps,
        rpc_methods=_method_paths(filesystem_pb2.DESCRIPTOR, process_pb2.DESCRIPTOR)
        | reflection_methods,
        routes=routes,
        interpreter=interpreter,
        sandboxes=sandboxes,
    )


def run_servers(main: Coroutine[Any, Any, _T]) -> _T:
    """Run `main`, the servers' top-level coroutine, on the event loop they are built for:
    uvloop, whose cheaper sockets and thread wake-ups show in every gateway call (bench/)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def gateway_config(binds: Iterable[str]) -> Config:
    config = Config()
    config.bind = list(binds)
    # hypercorn's default of 1000 sends GOAWAY mid-call on long-lived h2 (gRPC) connections.
    config.keep_alive_max_requests = 2147483647
    config.keep_alive_timeout = 640  # envd's IdleTimeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_gateway(
    app: ASGIApp,
    ports: Sequence[int] = (ENVD_PORT, INTERPRETER_PORT),
    host: str = "0.0.0.0",
    *,
    sockets: Sequence[socket.socket] = (),
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Serve `app` with hypercorn (HTTP/1.1 and h2c) on every port, or on already bound
    `sockets` instead, until `shutdown_trigger` returns (default: SIGINT/SIGTERM)."""
    if sockets:
        # hypercorn closes what it is given: hand it duplicates, the caller keeps its sockets.
        binds = [f"fd://{os.dup(sock.fileno())}" for sock in sockets]
    else:
        address = f"[{host}]" if ":" in host else host
        binds = [f"{address}:{port}" for port in ports]
    await serve(app, gateway_config(binds), shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
