"""The official `e2b` SDK (sync and async) against the gateway serving a real Linux jail.

The gateway runs in a thread of its own (its own event loop), so the sync SDK can block; the jail
is the Linux runtime on an overlay of the dev rootfs. The SDK reaches it in debug mode with
`sandbox_url`, routed by the E2b-Sandbox-Id header it sends.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    PtySize,
    Sandbox,
    TimeoutException,
)

from coppice_api.jails.runtime.base import Limits
from coppice_api.jails.runtime.linux import LinuxJail, LinuxRuntime
from coppice_envd.app import build_gateway, serve_gateway
from coppice_envd.process import ProcessService
from coppice_envd.sandboxes import SandboxLookup, SandboxView

DEV_ROOTFS = Path("/var/cache/coppice-dev/base")
T = TypeVar("T")


class OneSandbox(SandboxLookup):
    def __init__(self, view: SandboxView) -> None:
        self.view = view

    def get(self, sandbox_id: str) -> SandboxView | None:
        return self.view if sandbox_id == self.view.sandbox_id else None

    def most_recent(self) -> SandboxView | None:
        return self.view


class GatewayThread:
    """A real jail and the gateway serving it, on an event loop in a background thread."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sandbox_id = f"e2e{uuid.uuid4().hex[:12]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.merged = workdir / "merged"
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop: asyncio.Event | None = None
        self.server: asyncio.Task[None] | None = None
        self.jail: LinuxJail | None = None
        self.service: ProcessService | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=120)

    def mount(self) -> None:
        upper, work = self.workdir / "upper", self.workdir / "work"
        for directory in (upper, work, self.merged):
            directory.mkdir(parents=True)
        options = f"lowerdir={DEV_ROOTFS},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, self.merged], check=True
        )

    async def _start(self) -> None:
        runtime = LinuxRuntime(self.workdir / "data")
        self.jail = await runtime.start(self.sandbox_id, self.merged, Limits())
        view = SandboxView(
            sandbox_id=self.sandbox_id,
            jail=self.jail,
            access_token=None,
            env_vars={"FROM_SANDBOX": "yes"},
        )
        self.service = ProcessService()
        app = build_gateway(OneSandbox(view), process=self.service)
        self.stop = asyncio.Event()
        self.server = asyncio.get_running_loop().create_task(
            serve_gateway(app, sockets=[self.listener], shutdown_trigger=self.stop.wait)
        )

    async def _stop(self) -> None:
        assert self.stop is not None
        assert self.server is not None
        assert self.service is not None
        self.stop.set()
        await self.server
        await self.service.aclose()
        assert self.jail is not None
        await self.jail.stop()

    def __enter__(self) -> GatewayThread:
        self.mount()
        self.thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.server is not None:
                self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
            self.listener.detach()  # hypercorn closed the socket
            subprocess.run(["umount", "--lazy", self.merged], check=False)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    if not (DEV_ROOTFS / "etc" / "passwd").exists():
        pytest.fail(f"the dev rootfs {DEV_ROOTFS} is missing (built by the lead's setup)")
    with GatewayThread(tmp_path_factory.mktemp("process-e2e")) as running:
        yield running


@pytest.fixture
def sbx(gateway: GatewayThread) -> Sandbox:
    return Sandbox.connect(gateway.sandbox_id, debug=True, sandbox_url=gateway.url)


@pytest.fixture
async def async_sbx(gateway: GatewayThread) -> AsyncSandbox:
    return await AsyncSandbox.connect(gateway.sandbox_id, debug=True, sandbox_url=gateway.url)


# -- sync SDK ------------------------------------------------------------------------------------


def test_run_stdout_stderr_and_exit_codes(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo hello; echo oops >&2")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == (
        "hello\n",
        "oops\n",
        0,
        None,
    )
    with pytest.raises(CommandExitException) as caught:
        sbx.commands.run("echo partial; exit 3")
    assert caught.value.exit_code == 3
    assert caught.value.stdout == "partial\n"
    assert caught.value.error == "exit status 3"


def test_envs_cwd_and_users(sbx: Sandbox) -> None:
    result = sbx.commands.run('echo "$FOO $FROM_SANDBOX $HOME $USER"', envs={"FOO": "bar"})
    assert result.stdout == "bar yes /home/user user\n"
    assert sbx.commands.run("pwd").stdout == "/home/user\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("id -u; whoami").stdout == "1000\nuser\n"
    assert sbx.commands.run("id -u; whoami; pwd", user="root").stdout == "0\nroot\n/root\n"
    with pytest.raises(Exception, match="does not exist"):
        sbx.commands.run("true", cwd="/no/such/dir")


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; echo never", timeout=1)
    # The client's deadline and the server's kill fire together: wait for the kill to land.
    for _ in range(600):
        if not [p for p in sbx.commands.list() if "echo never" in " ".join(p.args)]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the timed-out command is still running")


def test_background_list_connect_kill(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 0.5; echo done", background=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    info = next(p for p in sbx.commands.list() if p.pid == handle.pid)
    assert info.cmd == "/bin/bash"
    assert info.args == ["-l", "-c", "sleep 0.5; echo done"]
    handle.disconnect()
    again = sbx.commands.connect(handle.pid)
    assert again.wait().stdout == "done\n"
    sleeper = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as caught:
        sleeper.wait()
    assert caught.value.error == "signal: killed"
    assert sbx.commands.kill(sleeper.pid) is False


def test_stdin(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "line one\n")
    handle.send_stdin(b"bytes\n")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "line one\nbytes\n"


def test_pty(sbx: Sandbox) -> None:
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.send_stdin(terminal.pid, b"stty size; tty\n")
    chunks: list[bytes] = []
    for _, _, pty in terminal:
        chunks.append(pty or b"")
        if b"/dev/pts/" in b"".join(chunks):  # only `tty`'s output has it, not the echo
            break
    assert re.search(rb"[\r\n]24 80\r\n", b"".join(chunks))
    sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size; exit 7\n")
    with pytest.raises(CommandExitException) as caught:
        terminal.wait(on_pty=chunks.append)
    assert caught.value.exit_code == 7
    assert re.search(rb"[\r\n]30 100\r\n", b"".join(chunks))
    killed = sbx.pty.create(PtySize(rows=10, cols=10))
    assert sbx.pty.kill(killed.pid) is True


def test_is_running(sbx: Sandbox) -> None:
    assert sbx.is_running() is True


def test_concurrent_runs_lose_nothing(gateway: GatewayThread) -> None:
    async def many() -> None:
        sandbox = await AsyncSandbox.connect(
            gateway.sandbox_id, debug=True, sandbox_url=gateway.url
        )

        async def one(index: int) -> None:
            result = await sandbox.commands.run(f"echo {index}")
            assert result.stdout == f"{index}\n"

        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(many())


# -- async SDK -----------------------------------------------------------------------------------


async def test_async_run_background_and_pty(async_sbx: AsyncSandbox) -> None:
    result = await async_sbx.commands.run("echo async; exit 0", user="root")
    assert result.stdout == "async\n"
    with pytest.raises(CommandExitException) as caught:
        await async_sbx.commands.run("exit 9")
    assert caught.value.exit_code == 9

    seen: list[str] = []
    handle = await async_sbx.commands.run(
        "read x; echo got-$x", background=True, stdin=True, on_stdout=seen.append
    )
    await async_sbx.commands.send_stdin(handle.pid, "it\n")
    assert (await handle.wait()).stdout == "got-it\n"
    assert "".join(seen) == "got-it\n"

    sleeper = await async_sbx.commands.run("sleep 60", background=True)
    assert await async_sbx.commands.kill(sleeper.pid) is True

    data: list[bytes] = []
    terminal = await async_sbx.pty.create(PtySize(rows=24, cols=80), on_data=data.append)
    await async_sbx.pty.send_stdin(terminal.pid, b"echo $((6*7)); exit\n")
    await terminal.wait()
    assert b"42" in b"".join(data)
