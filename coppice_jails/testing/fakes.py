"""In-memory fakes of the jail layer's backends, for the manager, the REST app and the gateway."""

from __future__ import annotations

import os
from pathlib import Path

from coppice_jails.runtime.base import (
    ExecSpec,
    ExitStatus,
    Jail,
    JailProcess,
    JailStats,
    Limits,
    ProcessNotFound,
    Runtime,
)
from coppice_jails.storage.base import Storage, StorageError


class BackendFailure(Exception):
    """The failure a fake backend was told to have."""


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


class FinishedProcess(JailProcess):
    """A process that has already run: its output is written and its pipes are closed."""

    def __init__(self) -> None:
        self.pid = 4242
        stdin_r, self.stdin_fd = os.pipe()
        self.stdout_fd, stdout_w = os.pipe()
        self.stderr_fd, stderr_w = os.pipe()
        self.pty_fd = None
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)

    async def wait(self) -> ExitStatus:
        return ExitStatus(0)

    async def signal(self, signum: int) -> None:
        raise ProcessNotFound("it has exited")


class FakeJail(Jail):
    """A jail that is only a root directory: enough for file operations. Its processes run
    nowhere (exec raises), or with `instant_processes` have finished the moment they start."""

    def __init__(
        self,
        sandbox_id: str,
        root: Path,
        *,
        handle: str | None = None,
        runtime: FakeRuntime | None = None,
        instant_processes: bool = False,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.handle = handle or f"fake:{sandbox_id}"
        self.runtime = runtime
        self.instant_processes = instant_processes
        self.alive = True
        self.frozen = False
        self.cpu_usage_usec = 0

    async def exec(self, spec: ExecSpec) -> JailProcess:
        if self.instant_processes:
            return FinishedProcess()
        raise NotImplementedError("a fake jail runs no processes")

    async def signal(self, pid: int, signum: int) -> None:
        raise ProcessNotFound(f"no process {pid} in a fake jail")

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
        if self.runtime is not None:
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
        jail = FakeJail(sandbox_id, root, handle=f"fake:{sandbox_id}:{self.started}", runtime=self)
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
