"""The official `e2b` SDK (sync and async) against the gateway serving a real Linux jail.

The gateway runs in a thread of its own (its own event loop, which must never block), so the sync
SDK can block; the jail is the Linux runtime on an overlay of the dev rootfs. The SDK reaches
it in debug mode with `sandbox_url`, routed by the E2b-Sandbox-Id header it sends.
"""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b import (
    AsyncSandbox,
    CommandExitException,
    PtySize,
    Sandbox,
    TimeoutException,
)
from fixtures.gateway import start_gateway
from process import process_connect
from process import process_pb2 as pb

from coppice_envd.process.service import ProcessService
from coppice_envd.sandboxes import SandboxView
from coppice_envd.testing import StaticLookup
from coppice_jails.runtime.base import Limits
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.testing import built_template_root


@dataclass
class RealSandbox:
    sandbox_id: str
    url: str


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSandbox]:
    """A Linux jail on an overlay of the dev rootfs, behind the real gateway (in a thread)."""
    base_root = built_template_root("base")
    work = tmp_path_factory.mktemp("process-e2e")
    upper, workdir, merged = work / "upper", work / "work", work / "merged"
    for directory in (upper, workdir, merged):
        directory.mkdir()
    options = f"lowerdir={base_root},upperdir={upper},workdir={workdir}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, merged], check=True)
    sandbox_id = f"e2e{uuid.uuid4().hex[:12]}"
    try:
        jail = asyncio.run(LinuxRuntime(work / "data").start(sandbox_id, merged, Limits()))
        try:
            view = SandboxView(
                sandbox_id=sandbox_id,
                jail=jail,
                access_token=None,
                env_vars={"FROM_SANDBOX": "yes"},
            )
            # No debug-loop check here: the SDK shares this process's GIL, so on a loaded machine
            # its steps stretch the gateway's. The unit tests check the service never blocks.
            with start_gateway(
                StaticLookup([view]), process=ProcessService(), debug_loop=False
            ) as running:
                yield RealSandbox(sandbox_id, running.url)
        finally:
            asyncio.run(jail.stop())
    finally:
        subprocess.run(["umount", "--lazy", merged], check=True)


@pytest.fixture
def sbx(gateway: RealSandbox) -> Sandbox:
    return Sandbox.connect(gateway.sandbox_id, debug=True, sandbox_url=gateway.url)


@pytest.fixture
async def async_sbx(gateway: RealSandbox) -> AsyncSandbox:
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


def test_a_user_added_in_the_sandbox_can_run_commands_at_once(sbx: Sandbox) -> None:
    """The gateway's cached accounts never hide a change the sandbox just made."""
    assert sbx.commands.run("whoami").stdout == "user\n"  # accounts cached and watched
    sbx.commands.run("useradd -m -u 1234 bob", user="root")
    assert sbx.commands.run("id -u; whoami; pwd", user="bob").stdout == "1234\nbob\n/home/bob\n"
    sbx.commands.run("userdel -r bob", user="root")
    with pytest.raises(Exception, match="invalid username"):
        sbx.commands.run("true", user="bob")


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


def test_concurrent_runs_lose_nothing(gateway: RealSandbox) -> None:
    async def many() -> None:
        sandbox = await AsyncSandbox.connect(
            gateway.sandbox_id, debug=True, sandbox_url=gateway.url
        )

        async def one(index: int) -> None:
            result = await sandbox.commands.run(f"echo {index}")
            assert result.stdout == f"{index}\n"

        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(many())


def test_generated_client_missing_command_tags_and_unknown_user(gateway: RealSandbox) -> None:
    """The connectrpc client from gen/ (binary codec): what the SDK never sends."""
    rpc = process_connect.ProcessClientSync(gateway.url)
    events = [
        r.event
        for r in rpc.start(
            pb.StartRequest(process=pb.ProcessConfig(cmd="no-such-command"), stdin=False)
        )
    ]
    assert events[0].HasField("start")
    stderr = b"".join(e.data.stderr for e in events if e.HasField("data"))
    assert b"not found" in stderr
    assert events[-1].end.exit_code == 127
    tagged = rpc.start(
        pb.StartRequest(process=pb.ProcessConfig(cmd="sleep", args=["60"]), tag="napper")
    )
    pid = next(tagged).event.start.pid
    listed = {p.pid: p.tag for p in rpc.list(pb.ListRequest()).processes}
    assert listed[pid] == "napper"
    rpc.send_signal(
        pb.SendSignalRequest(process=pb.ProcessSelector(tag="napper"), signal=pb.SIGNAL_SIGTERM)
    )
    assert [r.event for r in tagged][-1].end.status == "signal: terminated"
    with pytest.raises(ConnectError) as caught:
        list(
            rpc.start(
                pb.StartRequest(process=pb.ProcessConfig(cmd="true")),
                headers={"Authorization": "Basic " + base64.b64encode(b"mallory:").decode()},
            )
        )
    assert caught.value.code == Code.UNAUTHENTICATED
    assert caught.value.message == "invalid username: 'mallory'"


# -- async SDK -----------------------------------------------------------------------------------


# The async SDK builds its HTTP clients (loading the CA store) on the calling loop; that is the
# client's blocking, and this loop is only the client's (the gateway runs in its own thread).
@pytest.mark.allow_blocking
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
