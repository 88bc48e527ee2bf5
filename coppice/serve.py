"""The composition root: picks the backends once and runs the API and the gateway together.

`coppice serve` = template store + storage + runtime + registry → SandboxManager, then the REST
API (aiohttp) and the envd gateway (hypercorn) on one event loop. This is the only module that
knows every concrete backend; everything else depends on the small interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

from coppice.settings import Settings
from coppice.tls import ensure_tls
from coppice_api.app import build_app, start_api
from coppice_api.auth import ApiKeys, load_api_keys
from coppice_envd.app import Gateway
from coppice_envd.interpreter.service import Interpreter
from coppice_envd.process.service import ProcessService
from coppice_envd.sandboxes import SandboxLookup, SandboxView
from coppice_envd.server import GatewayTls, build_gateway, serve_gateway
from coppice_jails.manager import LiveSandbox, SandboxManager
from coppice_jails.registry import Registry
from coppice_jails.runtime.base import Runtime
from coppice_jails.storage.base import Storage
from coppice_jails.templates import Progress, TemplateStore

log = logging.getLogger("coppice")


def pick_storage(settings: Settings) -> Storage:
    """`auto` is zfs when a dataset is given, else overlay (the Linux default)."""
    dataset = settings.zfs_dataset
    if settings.storage == "zfs" or (settings.storage == "auto" and dataset):
        if not dataset:
            raise SystemExit("coppice: --storage zfs needs --zfs-dataset POOL/coppice")
        from coppice_jails.storage.zfs import ZfsStorage

        return ZfsStorage(dataset)
    from coppice_jails.storage.overlay import OverlayStorage

    return OverlayStorage(settings.data_dir / "overlay")


def pick_runtime(settings: Settings) -> Runtime:
    if sys.platform.startswith("freebsd"):
        from coppice_jails.runtime.freebsd import FreeBSDRuntime

        return FreeBSDRuntime()
    from coppice_jails.runtime.linux import LinuxRuntime

    return LinuxRuntime(settings.data_dir, network=settings.jail_network)


def sandbox_view(live: LiveSandbox) -> SandboxView:
    record = live.record
    return SandboxView(
        sandbox_id=record.id,
        jail=live.jail,
        access_token=record.access_token if record.secure else None,
        default_user=live.template.user,
        default_workdir=live.template.workdir,
        env_vars={**live.template.env, **record.env_vars},
        traffic_access_token=record.traffic_access_token,
    )


class ManagerLookup(SandboxLookup):
    """The gateway's view of the manager's running sandboxes."""

    def __init__(self, manager: SandboxManager) -> None:
        self._manager = manager

    def get(self, sandbox_id: str) -> SandboxView | None:
        live = self._manager.get_live(sandbox_id)
        if live is None or live.record.state != "running":
            return None
        return sandbox_view(live)

    def most_recent(self) -> SandboxView | None:
        live = self._manager.most_recent_live()
        return sandbox_view(live) if live is not None else None


class GatewayObserver:
    """Keeps the gateway's per-sandbox state in step with the manager: a new jail warms its
    default python kernel; a sandbox being killed has its responses in flight cut first, then
    all its gateway state (processes, kernels, watchers, metrics) closed."""

    def __init__(self, gateway: Gateway, interpreter: Interpreter) -> None:
        self._gateway = gateway
        self._interpreter = interpreter

    async def sandbox_started(self, live: LiveSandbox) -> None:
        await self._interpreter.sandbox_started(sandbox_view(live))

    async def sandbox_ending(self, sandbox_id: str) -> None:
        self._gateway.sandbox_ending(sandbox_id)

    async def sandbox_stopped(self, sandbox_id: str) -> None:
        await self._gateway.sandbox_stopped(sandbox_id)


async def serve(settings: Settings, progress: Progress, ready: Callable[[ApiKeys], None]) -> None:
    """Serve until SIGINT or SIGTERM; `progress` gets template build lines, `ready` is called
    once the API is up and the gateway is about to listen."""
    data_dir = settings.data_dir
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    storage = pick_storage(settings)
    templates = TemplateStore(data_dir, storage)
    for name in settings.templates:
        await templates.ensure(name, progress)

    registry = await Registry.open(data_dir)
    runtime = pick_runtime(settings)
    manager = SandboxManager(registry, storage, runtime, templates)
    interpreter = Interpreter()
    processes = ProcessService()
    # The one listener for everything: api.<domain> is proxied to the API's own listener, which
    # no sandbox port may name while a jail shares the host's loopback (nor the gateway's own).
    own_ports = (
        *settings.gateway_ports,
        settings.api_port,
        *((settings.tls_port,) if settings.tls else ()),
    )
    gateway = build_gateway(
        ManagerLookup(manager),
        process=processes,
        interpreter=interpreter,
        api=(settings.client_address, settings.api_port),
        domain=settings.domain,
        host_ports=own_ports,
    )
    manager.add_observer(GatewayObserver(gateway, interpreter))
    for line in await manager.start():
        log.info("reconcile: %s", line)

    keys = await asyncio.to_thread(load_api_keys, data_dir)
    tls = None
    if settings.tls:
        files = await asyncio.to_thread(ensure_tls, data_dir, settings.domain)
        tls = GatewayTls(files.cert, files.key, ports=(settings.tls_port,))
    app = build_app(manager, keys.keys, settings.sandbox_domain)
    api = await start_api(app, settings.host, settings.api_port)

    stopping = asyncio.Event()

    async def stop() -> None:
        await stopping.wait()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)

    ready(keys)
    try:
        await serve_gateway(
            gateway, settings.gateway_ports, settings.host, tls=tls, shutdown_trigger=stop
        )
    finally:
        with contextlib.suppress(Exception):
            await interpreter.close()
        await api.cleanup()
        await manager.close()
        await runtime.close()
        await registry.close()
