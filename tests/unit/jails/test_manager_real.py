"""SandboxManager on the real backends: overlay storage, the linux jail runtime, the template
store, with the dev rootfs as template `base` (hard-linked in; overlay never writes to a lower
dir). Also the REST service and the official Python SDK over them."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2b import Sandbox

from coppice_api.app import bound_port, build_app, start_api
from coppice_jails.manager import CreateSpec, NotFound, SandboxManager
from coppice_jails.registry import Registry, SandboxQuery
from coppice_jails.runtime.base import ExecSpec, Jail, User
from coppice_jails.runtime.cgroups import CgroupLayout
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.templates import TemplateStore
from coppice_jails.testing import built_template_root, install_dev_rootfs_template

ROOT = User(name="root", uid=0, gid=0, home="/root")
KEY = "e2b_" + "12" * 20


@dataclass
class Real:
    data_dir: Path
    storage: OverlayStorage
    templates: TemplateStore

    @asynccontextmanager
    async def manager(self) -> AsyncIterator[SandboxManager]:
        """A started manager; closing it leaves sandboxes running, as a service restart does."""
        registry = await Registry.open(self.data_dir)
        runtime = LinuxRuntime(self.data_dir)
        manager = SandboxManager(registry, self.storage, runtime, self.templates)
        await manager.start()
        try:
            yield manager
        finally:
            await manager.close()
            await registry.close()


@pytest.fixture
async def real() -> AsyncIterator[Real]:
    # Short path: the jail's unix socket lives under it.
    data_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="cpi-", dir="/tmp"))
    storage = OverlayStorage(data_dir / "overlay")
    await install_dev_rootfs_template(data_dir, storage)
    real = Real(data_dir, storage, TemplateStore(data_dir, storage))
    try:
        yield real
    finally:
        runtime = LinuxRuntime(data_dir)
        for sandbox_id in await runtime.list_jails():
            await runtime.destroy_leftover(sandbox_id)
        for sandbox_id in await storage.list_sandboxes():
            await storage.destroy(sandbox_id)
        await asyncio.to_thread(shutil.rmtree, data_dir)


async def sh(jail: Jail, script: str) -> int:
    process = await jail.exec(ExecSpec(argv=["/bin/sh", "-c", script], user=ROOT, cwd="/"))
    for fd in (process.stdin_fd, process.stdout_fd, process.stderr_fd, process.pty_fd):
        if fd is not None:
            os.close(fd)
    return (await process.wait()).exit_code


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for a condition without asserting on time (a generous bound only stops a hang)."""
    for _ in range(3000):
        if await condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition never became true")


def file_int_above(path: Path, value: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(read_int, path) > value

    return check


def read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def test_create_exec_kill_leaves_nothing(real: Real) -> None:
    async with real.manager() as manager:
        record = await manager.create(CreateSpec(template="default"))
        live = manager.get_live(record.id)
        assert live is not None
        assert live.template.user == "user"
        assert await sh(live.jail, "echo hello > /home/user/hello") == 0
        root = Path(record.storage_ref)
        assert (root / "home/user/hello").read_text() == "hello\n"
        assert not (built_template_root("base") / "home/user/hello").exists()
        assert record.id in await real.storage.list_sandboxes()
        assert record.id in await manager.runtime.list_jails()

        await manager.kill(record.id)
        assert await real.storage.list_sandboxes() == []
        assert await manager.runtime.list_jails() == []
        assert not live.jail.is_alive()


async def test_timeout_expiry_removes_sandbox_and_storage(real: Real) -> None:
    async with real.manager() as manager:
        record = await manager.create(CreateSpec(template="base", timeout=1))

        async def gone() -> bool:
            return await manager.registry.get_sandbox(record.id) is None

        await until(gone)
        with pytest.raises(NotFound):
            await manager.get(record.id)
        assert (await manager.list_sandboxes(SandboxQuery())).items == []
        assert await real.storage.list_sandboxes() == []
        assert await manager.runtime.list_jails() == []


async def test_restart_keeps_live_sandboxes_listed_and_usable(real: Real) -> None:
    async with real.manager() as manager:
        record = await manager.create(CreateSpec(template="base", metadata={"keep": "me"}))
    async with real.manager() as manager:
        page = await manager.list_sandboxes(SandboxQuery(metadata={"keep": "me"}))
        assert [r.id for r in page.items] == [record.id]
        live = manager.get_live(record.id)
        assert live is not None
        assert (await manager.get(record.id)).jail_handle == record.jail_handle  # same jail
        assert await sh(live.jail, "echo again > /home/user/again") == 0
        await manager.kill(record.id)


async def test_pause_freezes_a_loop_and_connect_resumes_it(real: Real) -> None:
    async with real.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        live = manager.get_live(record.id)
        assert live is not None
        counter = Path(record.storage_ref) / "home/user/counter"
        loop = "i=0; while :; do i=$((i+1)); echo $i > /home/user/counter; sleep 0.02; done"
        exec_task = asyncio.create_task(sh(live.jail, loop))
        await until(file_int_above(counter, 3))

        await manager.pause(record.id)
        frozen_at = read_int(counter)
        await asyncio.sleep(0.3)
        assert read_int(counter) == frozen_at

        result = await manager.connect(record.id, 60)
        assert result.resumed
        await until(file_int_above(counter, frozen_at + 3))
        await manager.kill(record.id)
        await exec_task  # the loop dies with its jail


@pytest.mark.usefixtures("warm_python_sdk")
async def test_python_sdk_over_the_real_backends(
    real: Real, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with real.manager() as manager:
        runner = await start_api(build_app(manager, [KEY], "coppice.lan"), "127.0.0.1", 0)
        try:
            monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{bound_port(runner)}")
            monkeypatch.setenv("E2B_API_KEY", KEY)
            sbx = await asyncio.to_thread(Sandbox.create, "base", metadata={"via": "sdk"})
            assert sbx.sandbox_id in await real.storage.list_sandboxes()
            assert await asyncio.to_thread(sbx.pause) is True
            await asyncio.to_thread(Sandbox.connect, sbx.sandbox_id)
            assert manager.get_live(sbx.sandbox_id) is not None
            assert await asyncio.to_thread(sbx.kill) is True
            assert await real.storage.list_sandboxes() == []
        finally:
            await runner.cleanup()


async def test_paused_sandbox_survives_a_restart(real: Real) -> None:
    async with real.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        await manager.pause(record.id)
    async with real.manager() as manager:
        assert (await manager.get(record.id)).state == "paused"
        assert manager.get_live(record.id) is None
        assert (await manager.connect(record.id, 60)).resumed
        live = manager.get_live(record.id)
        assert live is not None
        assert await sh(live.jail, "true") == 0
        await manager.kill(record.id)


CRASHING_CREATE = """
import asyncio, sys
from pathlib import Path
from coppice_jails.manager import CreateSpec, SandboxManager
from coppice_jails.registry import Registry
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.templates import TemplateStore

class StuckRegistry(Registry):
    async def insert_sandbox(self, record):
        print(record.id, flush=True)  # clone and jail are made: the parent kills us now
        await asyncio.Event().wait()

async def main(data_dir):
    storage = OverlayStorage(data_dir / "overlay")
    registry = await StuckRegistry.open(data_dir)
    manager = SandboxManager(
        registry, storage, LinuxRuntime(data_dir), TemplateStore(data_dir, storage)
    )
    await manager.create(CreateSpec(template="base"))

asyncio.run(main(Path(sys.argv[1])))
"""


async def test_kill_9_during_create_then_restart_leaves_no_orphans(real: Real) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_CREATE,
        str(real.data_dir),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    sandbox_id = (await child.stdout.readline()).decode().strip()
    assert sandbox_id, "the crashing create did not get as far as the record"
    runtime = LinuxRuntime(real.data_dir)
    assert sandbox_id in await real.storage.list_sandboxes()
    assert sandbox_id in await runtime.list_jails()
    child.kill()
    await child.wait()

    async with real.manager() as manager:
        assert await real.storage.list_sandboxes() == []
        assert await runtime.list_jails() == []
        assert (await manager.list_sandboxes(SandboxQuery())).items == []
    assert not await asyncio.to_thread(lambda: CgroupLayout.detect().sandbox(sandbox_id).exists())


async def test_snapshot_and_fork_carry_the_parents_files(real: Real) -> None:
    async with real.manager() as manager:
        parent = await manager.create(CreateSpec(template="base"))
        live = manager.get_live(parent.id)
        assert live is not None
        assert await sh(live.jail, "echo from-parent > /home/user/mark") == 0
        assert await sh(live.jail, "echo in-tmp > /tmp/mark") == 0  # /tmp is on disk, as E2B

        snapshot = await manager.snapshot(parent.id, "marked")
        child = await manager.create(CreateSpec(template="marked"))
        forks = await manager.fork(parent.id, 1, 60)
        fork = forks[0]
        assert not isinstance(fork, Exception)
        for record in (child, fork):
            mark = Path(record.storage_ref) / "home/user/mark"
            assert await asyncio.to_thread(mark.read_text) == "from-parent\n"
            tmp_mark = Path(record.storage_ref) / "tmp/mark"
            assert await asyncio.to_thread(tmp_mark.read_text) == "in-tmp\n"
            live_child = manager.get_live(record.id)
            assert live_child is not None
            assert live_child.template.user == "user"  # inherited template defaults

        for record in (child, fork, parent):
            await manager.kill(record.id)
        await manager.delete_template(snapshot.snapshot_id)
        assert await real.storage.list_templates() == ["base"]
