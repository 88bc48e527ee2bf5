"""The real Linux runtime on both real storage backends: jails on zfs-fuse clones and on
overlay clones of the built base template see only their own writes."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coppice_jails.runtime.base import ExecSpec, Limits, User
from coppice_jails.runtime.linux import LinuxJail, LinuxRuntime
from coppice_jails.storage.base import Storage
from coppice_jails.testing import built_template_root

USER = User("user", 1000, 1000, "/home/user", (1000,))
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/user"}


@pytest.fixture
async def runtime() -> AsyncIterator[LinuxRuntime]:
    # A short data dir: the jails' unix sockets live under it.
    data_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="cjs-", dir="/tmp"))
    runtime = LinuxRuntime(data_dir)
    yield runtime
    for sandbox_id in await runtime.list_jails():
        await runtime.destroy_leftover(sandbox_id)


async def copy_of_base(tmp_path: Path) -> Path:
    """A private copy of the built base template (add_template consumes its source)."""
    copy = tmp_path / "base-copy"
    source = await asyncio.to_thread(built_template_root, "base")
    process = await asyncio.create_subprocess_exec("cp", "-a", "-x", str(source), str(copy))
    assert await process.wait() == 0
    return copy


async def sh(jail: LinuxJail, script: str) -> str:
    process = await jail.exec(ExecSpec(["sh", "-c", script], USER, "/home/user", ENV))
    assert process.stdout_fd is not None
    for fd in (process.stdin_fd, process.stderr_fd):
        if fd is not None:
            os.close(fd)
    with os.fdopen(process.stdout_fd, "rb") as out:
        output = await asyncio.to_thread(out.read)
    status = await process.wait()
    assert status.exit_code == 0, output
    return output.decode()


async def test_jails_on_clones_see_only_their_own_files(
    storage: Storage,
    runtime: LinuxRuntime,
    tmp_path: Path,
) -> None:
    template = f"base{secrets.token_hex(3)}"
    await storage.add_template(template, await copy_of_base(tmp_path))
    jails: list[LinuxJail] = []
    try:
        for _ in range(2):
            sandbox_id = f"js{secrets.token_hex(8)}"
            root = await storage.clone(template, sandbox_id)
            jails.append(await runtime.start(sandbox_id, root, Limits()))
        a, b = jails
        assert await sh(a, "echo from-a > mine; whoami; hostname") == f"user\n{a.sandbox_id}\n"
        assert await sh(b, "ls /home/user; cat /etc/hostname | wc -l") == "1\n"
        assert await sh(a, "cat /home/user/mine") == "from-a\n"
        template_root = await storage.template_root(template)
        assert not (template_root / "home/user/mine").exists()
    finally:
        for jail in jails:
            await jail.stop()
            await storage.destroy(jail.sandbox_id)
