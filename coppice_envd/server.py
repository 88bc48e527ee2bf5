"""Building the gateway app and running its hypercorn listeners (on uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop
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

from coppice_envd.app import Gateway
from coppice_envd.envd_api import files
from coppice_envd.envd_api import routes as envd_http
from coppice_envd.envd_api.routes import Routes
from coppice_envd.filesystem.service import FilesystemService
from coppice_envd.http.asgi import ASGIApp, Message, Receive, Scope, Send, serve_lifespan
from coppice_envd.proxy import Proxy, Target
from coppice_envd.rpc.codecs import GATEWAY_CODECS, GATEWAY_COMPRESSIONS
from coppice_envd.sandboxes import SandboxLookup, SandboxStates, UsesSandboxStates
from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT

_T = TypeVar("_T")

# envd sets no request size limit; this bounds one RPC message (e.g. a SendInput chunk).
RPC_READ_MAX_BYTES = 32 * 1024 * 1024


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


def _lifespan(interpreter: ASGIApp | None, sandboxes: SandboxStates, proxy: Proxy) -> ASGIApp:
    """The gateway's lifespan: the interpreter app's own runs alongside; at shutdown every
    sandbox's state is closed first, and the proxy's kept-alive connections."""

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        interpreter_lifespan = await _InterpreterLifespan.start(interpreter, scope)

        async def shutdown() -> None:
            await sandboxes.aclose()
            proxy.close()
            await interpreter_lifespan.shutdown()

        await serve_lifespan(receive, send, startup=interpreter_lifespan.startup, shutdown=shutdown)

    return lifespan


class _NoProcessService(process_connect.Process):
    """Every Process RPC answers `unimplemented` (the generated defaults)."""


def build_gateway(
    lookup: SandboxLookup,
    *,
    process: process_connect.Process | None,
    interpreter: ASGIApp | None = None,
    filesystem: FilesystemService | None = None,
    api: tuple[str, int] | None = None,
    domain: str = "",
    host_ports: Iterable[int] = (),
) -> Gateway:
    """The gateway app. `process` may be None (its RPCs then answer `unimplemented`). The
    services that keep per-sandbox state are handed the gateway's one owner of it. With `api`
    (host, port of the lifecycle API's listener), `api.<domain>` is proxied there; `host_ports`
    are the service's own listeners, which no sandbox port may name while jails share the host's
    loopback."""
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
    proxy = Proxy()
    return Gateway(
        lookup,
        rpc_apps=rpc_apps,
        rpc_methods=_method_paths(filesystem_pb2.DESCRIPTOR, process_pb2.DESCRIPTOR)
        | reflection_methods,
        routes=routes,
        interpreter=interpreter,
        sandboxes=sandboxes,
        lifespan=_lifespan(interpreter, sandboxes, proxy),
        proxy=proxy,
        api=Target(api[0], api[1], "api") if api is not None else None,
        domain=domain,
        host_ports=frozenset(host_ports),
    )


def run_servers(main: Coroutine[Any, Any, _T]) -> _T:
    """Run `main`, the servers' top-level coroutine, on the event loop they are built for:
    uvloop, whose cheaper sockets and thread wake-ups show in every gateway call (bench/)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@dataclass(frozen=True)
class GatewayTls:
    """TLS listeners of the gateway: on `ports` of the gateway's host, or on already bound
    `sockets`, with this certificate chain and key (PEM files; the root made them)."""

    cert: Path
    key: Path
    ports: Sequence[int] = ()
    sockets: Sequence[socket.socket] = ()


def gateway_config(
    binds: Iterable[str], tls_binds: Iterable[str] = (), tls: GatewayTls | None = None
) -> Config:
    """`binds` serve plain HTTP (HTTP/1.1, h2c); `tls_binds`, with `tls`, HTTP/1.1 and h2 over
    TLS, chosen by ALPN."""
    config = Config()
    if tls is not None:
        # hypercorn's `bind` is TLS once a certificate is set; plain listeners go to
        # `insecure_bind`, so one server (one lifespan) has both.
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
        config.bind = list(tls_binds)
        config.insecure_bind = list(binds)
    else:
        config.bind = list(binds)
    # hypercorn's default of 1000 sends GOAWAY mid-call on long-lived h2 (gRPC) connections.
    config.keep_alive_max_requests = 2147483647
    config.keep_alive_timeout = 640  # envd's IdleTimeout
    config.accesslog = None
    # envd sends no Server header; and a proxied server's own must not get a second one.
    config.include_server_header = False
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _binds(host: str, ports: Sequence[int], sockets: Sequence[socket.socket]) -> list[str]:
    if sockets:
        # hypercorn closes what it is given: hand it duplicates, the caller keeps its sockets.
        return [f"fd://{os.dup(sock.fileno())}" for sock in sockets]
    address = f"[{host}]" if ":" in host else host
    return [f"{address}:{port}" for port in ports]


async def serve_gateway(
    app: ASGIApp,
    ports: Sequence[int] = (ENVD_PORT, INTERPRETER_PORT),
    host: str = "0.0.0.0",
    *,
    sockets: Sequence[socket.socket] = (),
    tls: GatewayTls | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Serve `app` with hypercorn (HTTP/1.1 and h2c) on every port, or on already bound
    `sockets` instead, and over TLS as `tls` says, until `shutdown_trigger` returns (default:
    SIGINT/SIGTERM)."""
    binds = _binds(host, ports, sockets)
    tls_binds = _binds(host, tls.ports, tls.sockets) if tls is not None else []
    config = gateway_config(binds, tls_binds, tls)
    await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
