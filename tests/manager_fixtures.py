"""In-memory fakes of Storage and Runtime (under the real registry and template store), to test
the manager and the REST app without real jails. Each fake can be told to fail at one step,
leaving a half-made leftover behind the way a real backend would, so rollback can be checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from template_fixtures import built_template_root

from coppice_jails.manager import SandboxManager
from coppice_jails.registry import Registry
from coppice_jails.runtime.base import ExecSpec, Jail, JailProcess, JailStats, Limits, Runtime
from coppice_jails.storage.base import Storage, StorageError
from coppice_jails.templates import TemplateInfo, TemplateStore

TEMPLATES = ("base", "code-interpreter-v1")


class BackendFailure(Exception):
    pass


class FakeStorage(Storage):
    name = "fake"

    def __init__(self, base: Path, templates: list[str]) -> None:
        self.base = base
        self.templates: set[str] = set(templates)
        self.sandboxes: dict[str, str] = {}  # sandbox id -> template it was cloned from
        self.fail_clone = False
        self.fail_snapshot = False

    async def template_root(self, template: str) -> Path:
        return self.base / "templates" / template

    async def add_template(self, template: str, source: Path) -> None:
        self.templates.add(template)

    async def has_template(self, template: str) -> bool:
        return template in self.templates

    async def list_templates(self) -> list[str]:
        return sorted(self.templates)

    async def template_size(self, template: str) -> int:
        return 1024

    async def delete_template(self, template: str) -> None:
        if template in self.sandboxes.values():
            raise StorageError(f"template {template} has clones")
        self.templates.discard(template)

    async def clone(self, template: str, sandbox_id: str) -> Path:
        if template not in self.templates:
            raise StorageError(f"no template {template}")
        self.sandboxes[sandbox_id] = template  # half-made before the failure, like a real one
        if self.fail_clone:
            raise BackendFailure("clone failed")
        return self.base / "sandboxes" / sandbox_id

    async def snapshot(self, sandbox_id: str, template: str) -> None:
        if sandbox_id not in self.sandboxes:
            raise StorageError(f"no sandbox {sandbox_id}")
        self.templates.add(template)
        if self.fail_snapshot:
            raise BackendFailure("snapshot failed")

    async def destroy(self, sandbox_id: str) -> None:
        self.sandboxes.pop(sandbox_id, None)

    async def list_sandboxes(self) -> list[str]:
        return sorted(self.sandboxes)

    async def disk_used(self, sandbox_id: str) -> int:
        if sandbox_id not in self.sandboxes:
            raise StorageError(f"no sandbox {sandbox_id}")
        return 4096


class FakeJail(Jail):
    def __init__(self, runtime: FakeRuntime, sandbox_id: str, root: Path, generation: int) -> None:
        self.runtime = runtime
        self.sandbox_id = sandbox_id
        self.root = root
        self.handle = f"fake:{sandbox_id}:{generation}"
        self.alive = True
        self.frozen = False
        self.cpu_usage_usec = 0

    async def exec(self, spec: ExecSpec) -> JailProcess:
        raise NotImplementedError

    async def signal(self, pid: int, signum: int) -> None:
        raise NotImplementedError

    async def freeze(self) -> None:
        self.frozen = True

    async def thaw(self) -> None:
        self.frozen = False

    async def stats(self) -> JailStats:
        return JailStats(
            cpu_usage_usec=self.cpu_usage_usec,
            memory_bytes=10 * 1024 * 1024,
            memory_limit_bytes=512 * 1024 * 1024,
            pids=3,
        )

    def is_alive(self) -> bool:
        return self.alive

    async def stop(self) -> None:
        self.alive = False
        self.runtime.jails.pop(self.sandbox_id, None)


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self) -> None:
        self.jails: dict[str, FakeJail] = {}
        self.leftovers: set[str] = set()  # e.g. cgroups of a jail that failed to start
        self.fail_start = False
        self.started = 0

    async def start(self, sandbox_id: str, root: Path, limits: Limits) -> Jail:
        if self.fail_start:
            self.leftovers.add(sandbox_id)
            raise BackendFailure("jail start failed")
        self.started += 1
        jail = FakeJail(self, sandbox_id, root, self.started)
        self.jails[sandbox_id] = jail
        return jail

    async def attach(self, sandbox_id: str, root: Path, handle: str) -> Jail | None:
        jail = self.jails.get(sandbox_id)
        return jail if jail is not None and jail.alive and jail.handle == handle else None

    async def list_jails(self) -> list[str]:
        return sorted(set(self.jails) | self.leftovers)

    async def destroy_leftover(self, sandbox_id: str) -> None:
        jail = self.jails.pop(sandbox_id, None)
        if jail is not None:
            jail.alive = False
        self.leftovers.discard(sandbox_id)

    def kill_all(self) -> None:
        """Every jail dies, as after a host reboot."""
        for jail in self.jails.values():
            jail.alive = False
        self.jails.clear()


class Backends:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.storage = FakeStorage(base, list(TEMPLATES))
        self.runtime = FakeRuntime()
        self.data_dir = base / "data"
        # The real template store, on the fake storage, with the metadata of two templates.
        (self.data_dir / "templates").mkdir(parents=True)
        for name in TEMPLATES:
            info = TemplateInfo(
                name=name,
                backend="fake",
                created="2026-01-02T03:04:05+00:00",
                size_bytes=1024,
                user="user",
                workdir="/home/user",
                env={"LANG": "C.UTF-8"},
            )
            (self.data_dir / "templates" / f"{name}.json").write_text(info.to_json())
        self.templates = TemplateStore(self.data_dir, self.storage)

    @asynccontextmanager
    async def manager(self, **options: object) -> AsyncIterator[SandboxManager]:
        """A started manager on a registry in `base`, closed (sandboxes left alive) after."""
        registry = await Registry.open(self.data_dir)
        manager = SandboxManager(
            registry,
            self.storage,
            self.runtime,
            self.templates,
            **options,  # type: ignore[arg-type]
        )
        await manager.start()
        try:
            yield manager
        finally:
            await manager.close()
            await registry.close()


async def install_dev_rootfs_template(data_dir: Path, storage: Storage) -> None:
    """Template `base` from the cached built one, hard-linked in (fast on one filesystem, and
    safe: overlay never writes to a lower dir), with its metadata for a TemplateStore on
    data_dir."""
    source = await asyncio.to_thread(built_template_root, "base")
    copy = data_dir / "base-rootfs"
    process = await asyncio.create_subprocess_exec("cp", "-alx", str(source), str(copy))
    if await process.wait() != 0:
        raise RuntimeError(f"could not copy {source}")
    info = TemplateInfo(
        name="base",
        backend=storage.name,
        created="2026-01-01T00:00:00+00:00",
        size_bytes=0,
        user="user",
        workdir="/home/user",
        env={},
    )
    metadata = data_dir / "templates" / "base.json"
    await asyncio.to_thread(metadata.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(metadata.write_text, info.to_json())
    await storage.add_template("base", copy)


@pytest.fixture(scope="session")
def warm_python_sdk() -> None:
    """Make the Python SDK's first HTTP client here, off any event loop: its one-time setup
    holds the GIL long enough to stall a loop running the service in the same process."""
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig

    get_api_client(ConnectionConfig(api_key="e2b_warmup", api_url="http://127.0.0.1:9"))
