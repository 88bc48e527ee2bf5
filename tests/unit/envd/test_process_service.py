"""envd's Process service on a host stand-in jail: the table, the RPC methods called directly, and
the generated connectrpc client against the generated ASGI app under a real hypercorn server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_json_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import Headers, RequestContext
from hypercorn.asyncio import serve
from hypercorn.config import Config
from process import process_connect
from process import process_pb2 as pb

from coppice_envd.permissions.auth import basic_auth_user
from coppice_envd.process.service import ProcessService, end_event
from coppice_envd.process.table import Ended, Output, ProcessNotFound, ProcessTable
from coppice_envd.request import RequestScope, enter_request
from coppice_envd.sandboxes import SandboxView
from coppice_jails.runtime.base import (
    ExecSpec,
    ExitStatus,
    User,
)
from coppice_jails.testing import HostJail


def make_root(base: Path) -> Path:
    """A sandbox root with its own passwd: `user` (home /home/user) and `root`."""
    root = base / "root"
    for directory in ("etc", "home/user/project", "root", "tmp"):
        (root / directory).mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
    )
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    return root


# --------------------------------------------------------------------------------------------
# Fixtures


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.jail = HostJail(root)
        self.view = SandboxView(
            sandbox_id="sbx-test",
            jail=self.jail,
            access_token=None,
            env_vars={"GLOBAL_VAR": "global", "OVERRIDDEN": "by-sandbox"},
        )
        self.basic_user: str | None = None

    def scope(self) -> RequestScope:
        return RequestScope(sandbox=self.view, basic_user=self.basic_user)


@pytest.fixture
async def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(make_root(tmp_path))


@pytest.fixture
async def service(sandbox: Sandbox) -> AsyncIterator[ProcessService]:
    service = ProcessService(sandbox.scope)
    yield service
    await service.aclose()


def context(
    method: str, headers: dict[str, str] | None = None, timeout_ms: int | None = None
) -> RequestContext[Any, Any]:
    info = MethodInfo(
        name=method,
        service_name="process.Process",
        input=pb.StartRequest,
        output=pb.StartResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )
    request_headers = Headers(headers or {})
    if timeout_ms is not None:  # as the Connect protocol carries it
        request_headers["connect-timeout-ms"] = str(timeout_ms)
    return RequestContext(
        method=info,
        http_method="POST",
        request_headers=request_headers,
        timeout_ms=timeout_ms,
    )


def start_request(
    script: str,
    *,
    stdin: bool | None = False,
    cwd: str | None = None,
    envs: dict[str, str] | None = None,
) -> pb.StartRequest:
    config = pb.ProcessConfig(cmd="/bin/sh", args=["-c", script], cwd=cwd, envs=envs)
    request = pb.StartRequest(process=config)
    if stdin is not None:
        request.stdin = stdin
    return request


class Collected:
    def __init__(self) -> None:
        self.events: list[pb.ProcessEvent] = []

    @property
    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for e in self.events]

    def output(self, kind: str) -> bytes:
        return b"".join(getattr(e.data, kind) for e in self.events if e.HasField("data"))

    @property
    def end(self) -> pb.ProcessEvent.EndEvent:
        assert self.kinds.count("end") == 1, self.kinds
        assert self.kinds[-1] == "end"
        return self.events[-1].end


async def collect(stream: AsyncIterator[Any]) -> Collected:
    collected = Collected()
    async with asyncio.timeout(60):  # a guard against hangs, not a timing assertion
        async for response in stream:
            collected.events.append(response.event)
    assert collected.kinds[0] == "start"
    return collected


async def run(service: ProcessService, script: str, **kwargs: Any) -> Collected:
    headers = kwargs.pop("headers", None)
    timeout_ms = kwargs.pop("timeout_ms", None)
    return await collect(
        service.start(start_request(script, **kwargs), context("Start", headers, timeout_ms))
    )


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close a server stream as a client that went away does (streams are async generators)."""
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


async def first_event(stream: AsyncIterator[Any]) -> pb.ProcessEvent:
    async with asyncio.timeout(60):
        response = await anext(stream)
    event: pb.ProcessEvent = response.event
    return event


# --------------------------------------------------------------------------------------------
# End events


def test_end_event_uses_go_wording() -> None:
    ok = end_event(Ended(ExitStatus(0)))
    assert (ok.exit_code, ok.exited, ok.status, ok.HasField("error")) == (
        0,
        True,
        "exit status 0",
        False,
    )
    failed = end_event(Ended(ExitStatus(2)))
    assert (failed.exit_code, failed.status, failed.error) == (2, "exit status 2", "exit status 2")
    killed = end_event(Ended(ExitStatus(-9, 9)))
    assert (killed.exit_code, killed.exited, killed.status, killed.error) == (
        -1,
        False,
        "signal: killed",
        "signal: killed",
    )
    assert end_event(Ended(ExitStatus(-15, 15))).status == "signal: terminated"


# --------------------------------------------------------------------------------------------
# Start


async def test_start_streams_start_then_raw_output_then_one_end(service: ProcessService) -> None:
    result = await run(service, "printf 'out\\377'; printf err >&2; exit 3")
    assert result.kinds[0] == "start"
    assert result.events[0].start.pid > 0
    assert result.output("stdout") == b"out\xff"
    assert result.output("stderr") == b"err"
    assert (result.end.exit_code, result.end.exited) == (3, True)
    assert result.end.status == "exit status 3"
    assert result.end.error == "exit status 3"


async def test_successful_end_has_no_error(service: ProcessService) -> None:
    end = (await run(service, "true")).end
    assert (end.exit_code, end.status, end.HasField("error")) == (0, "exit status 0", False)


async def test_missing_command_exits_127(service: ProcessService) -> None:
    request = pb.StartRequest(process=pb.ProcessConfig(cmd="no-such-command-xyz"), stdin=False)
    result = await collect(service.start(request, context("Start")))
    assert result.end.exit_code == 127


async def test_environment_composition(service: ProcessService, sandbox: Sandbox) -> None:
    request = start_request("env", envs={"OVERRIDDEN": "by-request", "MINE": "1"})
    result = await collect(service.start(request, context("Start")))
    env = dict(
        line.split("=", 1) for line in result.output("stdout").decode().splitlines() if "=" in line
    )
    assert env["HOME"] == "/home/user"
    assert env["USER"] == env["LOGNAME"] == "user"
    assert env["PATH"].startswith("/usr/local/sbin")
    assert env["GLOBAL_VAR"] == "global"
    assert env["OVERRIDDEN"] == "by-request"
    assert env["MINE"] == "1"
    assert env["E2B_SANDBOX"] == "true"
    assert env["E2B_SANDBOX_ID"] == "sbx-test"
    spec = sandbox.jail.specs[-1]
    assert spec.user.name == "user"
    assert spec.argv[-2:] == ["-c", "env"]


async def test_basic_auth_user_and_its_home(service: ProcessService, sandbox: Sandbox) -> None:
    sandbox.basic_user = "root"
    result = await run(service, 'echo "$USER $HOME"')
    assert result.output("stdout") == b"root /root\n"
    assert sandbox.jail.specs[-1].user.uid == 0
    assert sandbox.jail.specs[-1].cwd == "/root"


async def test_unknown_user_is_unauthenticated(service: ProcessService, sandbox: Sandbox) -> None:
    sandbox.basic_user = "nobody-here"
    with pytest.raises(ConnectError) as caught:
        await run(service, "true")
    assert caught.value.code == Code.UNAUTHENTICATED
    assert caught.value.message == "invalid username: 'nobody-here'"


async def test_unknown_user_is_refused_on_every_rpc(
    service: ProcessService, sandbox: Sandbox
) -> None:
    """envd's authn runs before any handler: not only Start refuses an unknown user."""
    sandbox.basic_user = "nobody-here"
    selector = pb.ProcessSelector(pid=1)
    calls = {
        "List": service.list(pb.ListRequest(), context("List")),
        "SendSignal": service.send_signal(
            pb.SendSignalRequest(process=selector, signal=pb.SIGNAL_SIGKILL), context("SendSignal")
        ),
        "CloseStdin": service.close_stdin(
            pb.CloseStdinRequest(process=selector), context("CloseStdin")
        ),
        "Update": service.update(pb.UpdateRequest(process=selector), context("Update")),
    }
    for name, call in calls.items():
        with pytest.raises(ConnectError) as caught:
            await call
        assert caught.value.code == Code.UNAUTHENTICATED, name


@pytest.mark.parametrize(
    ("cwd", "expected"),
    [
        (None, "/home/user"),
        ("project", "/home/user/project"),
        ("~/project", "/home/user/project"),
        ("/tmp", "/tmp"),
    ],
)
async def test_cwd_resolution(
    service: ProcessService, sandbox: Sandbox, cwd: str | None, expected: str
) -> None:
    await run(service, "true", cwd=cwd)
    assert sandbox.jail.specs[-1].cwd == expected


async def test_start_needs_no_thread_once_accounts_are_current(
    service: ProcessService, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user comes from accounts an inotify watch vouches for, the cwd check from the jail:
    a Start does no file I/O of its own, so it never waits for a worker thread."""
    await run(service, "true")  # reads the accounts (in a thread) and watches /etc

    def no_threads(*_: object) -> None:
        raise AssertionError("a Start went to a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_threads)
    assert (await run(service, "id -u")).end.exit_code == 0
    with pytest.raises(ConnectError, match="does not exist"):
        await run(service, "true", cwd="/nowhere")
    (sandbox.view.jail.root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(AssertionError, match="went to a thread"):  # changed: read again
        await run(service, "true")


async def test_missing_cwd_is_invalid_argument(service: ProcessService) -> None:
    with pytest.raises(ConnectError) as caught:
        await run(service, "true", cwd="nowhere")
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.message == "cwd '/home/user/nowhere' does not exist"


async def test_cwd_is_checked_inside_the_sandbox_root(service: ProcessService) -> None:
    # /home/user/project exists only inside the root; /proc exists only outside it.
    with pytest.raises(ConnectError) as caught:
        await run(service, "true", cwd="/proc")
    assert caught.value.code == Code.INVALID_ARGUMENT


async def test_end_waits_for_every_holder_of_the_output(service: ProcessService) -> None:
    result = await run(service, "(sleep 0.3; echo late) & echo early")
    assert result.output("stdout") == b"early\nlate\n"
    assert result.end.exit_code == 0


async def test_keepalive_while_idle(service: ProcessService) -> None:
    result = await run(service, "sleep 1.5; echo done", headers={"Keepalive-Ping-Interval": "1"})
    assert "keepalive" in result.kinds
    assert result.output("stdout") == b"done\n"


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
async def test_bad_keepalive_interval_means_the_default(
    service: ProcessService, value: str
) -> None:
    result = await run(service, "echo hi", headers={"Keepalive-Ping-Interval": value})
    assert result.kinds == ["start", "data", "end"]


async def test_timeout_kills_the_process_and_ends_with_deadline_exceeded(
    service: ProcessService, sandbox: Sandbox
) -> None:
    stream = service.start(start_request("echo begun; sleep 30"), context("Start", None, 300))
    start = await first_event(stream)
    with pytest.raises(ConnectError) as caught:
        await collect_rest(stream)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    table = service.table(sandbox.view)
    end = await collect(service.connect(connect_pid(start.start.pid), context("Connect")))
    assert end.end.status == "signal: killed"
    assert table.processes() == []


async def test_only_connect_timeout_bounds_the_process(service: ProcessService) -> None:
    # A gRPC client's deadline (grpc-timeout) ends its stream; as in envd it does not kill.
    ctx = context("Start")
    grpc_ctx = RequestContext(
        method=ctx.method, http_method="POST", request_headers=Headers(), timeout_ms=200
    )
    stream = service.start(start_request("sleep 30"), grpc_ctx)
    pid = (await first_event(stream)).start.pid
    with pytest.raises(ConnectError) as caught:
        await collect_rest(stream)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    listed = (await service.list(pb.ListRequest(), context("List"))).processes
    assert [p.pid for p in listed] == [pid]


async def collect_rest(stream: AsyncIterator[Any]) -> list[pb.ProcessEvent]:
    events = []
    async with asyncio.timeout(60):
        async for response in stream:
            events.append(response.event)
    return events


def connect_pid(pid: int) -> pb.ConnectRequest:
    return pb.ConnectRequest(process=pb.ProcessSelector(pid=pid))


# --------------------------------------------------------------------------------------------
# Processes outlive their streams


async def test_process_outlives_its_stream_and_stays_connectable(
    service: ProcessService,
) -> None:
    stream = service.start(start_request("sleep 0.3; exit 4"), context("Start"))
    pid = (await first_event(stream)).start.pid
    await close_stream(stream)  # the client went away
    result = await collect(service.connect(connect_pid(pid), context("Connect")))
    assert result.kinds in (["start", "end"],)
    assert result.end.exit_code == 4
    # Exited: the retained end is replayed (start + end), and the process is not listed.
    again = await collect(service.connect(connect_pid(pid), context("Connect")))
    assert again.kinds == ["start", "end"]
    assert again.end.exit_code == 4
    assert (await service.list(pb.ListRequest(), context("List"))).processes == []


async def test_output_without_listeners_is_dropped_without_blocking(
    service: ProcessService,
) -> None:
    # 64 MiB is far beyond any pipe and subscriber buffer: the process can only finish while
    # nobody listens if its output is read and dropped.
    stream = service.start(start_request("head -c 67108864 /dev/zero; exit 3"), context("Start"))
    pid = (await first_event(stream)).start.pid
    await close_stream(stream)
    for _ in range(3000):  # up to 30 s: a hang guard, not a speed check
        if not (await service.list(pb.ListRequest(), context("List"))).processes:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the process blocked on output nobody listened to")
    result = await collect(service.connect(connect_pid(pid), context("Connect")))
    assert result.kinds == ["start", "end"]
    assert result.end.exit_code == 3


async def test_a_slow_listener_gets_everything(service: ProcessService) -> None:
    # 8 MiB through a listener that only reads later: back-pressure, nothing lost.
    stream = service.start(start_request("head -c 8388608 /dev/zero; echo end"), context("Start"))
    await first_event(stream)
    await asyncio.sleep(0.2)
    events = await collect_rest(stream)
    stdout = b"".join(e.data.stdout for e in events if e.HasField("data"))
    assert len(stdout) == 8388608 + 4
    assert events[-1].end.exit_code == 0


async def test_connect_streams_live_output_to_every_subscriber(service: ProcessService) -> None:
    stream = service.start(start_request("read line; echo got $line", stdin=True), context("Start"))
    pid = (await first_event(stream)).start.pid
    watcher = service.connect(connect_pid(pid), context("Connect"))
    assert (await first_event(watcher)).start.pid == pid
    await service.send_input(
        pb.SendInputRequest(
            process=pb.ProcessSelector(pid=pid), input=pb.ProcessInput(stdin=b"x\n")
        ),
        context("SendInput"),
    )
    mine, theirs = await asyncio.gather(collect_rest(stream), collect_rest(watcher))
    for events in (mine, theirs):
        assert b"".join(e.data.stdout for e in events if e.HasField("data")) == b"got x\n"
        assert [e.WhichOneof("event") for e in events][-1] == "end"


async def test_connect_timeout_ends_the_stream_but_not_the_process(
    service: ProcessService,
) -> None:
    stream = service.start(start_request("sleep 30"), context("Start"))
    pid = (await first_event(stream)).start.pid
    watcher = service.connect(connect_pid(pid), context("Connect", None, 200))
    assert (await first_event(watcher)).start.pid == pid
    with pytest.raises(ConnectError) as caught:
        await collect_rest(watcher)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    listed = (await service.list(pb.ListRequest(), context("List"))).processes
    assert [p.pid for p in listed] == [pid]
    await close_stream(stream)


async def test_unknown_pid_everywhere_is_not_found(service: ProcessService) -> None:
    missing = pb.ProcessSelector(pid=999999)
    calls = [
        service.close_stdin(pb.CloseStdinRequest(process=missing), context("CloseStdin")),
        service.update(pb.UpdateRequest(process=missing), context("Update")),
        service.send_input(
            pb.SendInputRequest(process=missing, input=pb.ProcessInput(stdin=b"x")),
            context("SendInput"),
        ),
    ]
    for call in calls:
        with pytest.raises(ConnectError) as caught:
            await call
        assert caught.value.code == Code.NOT_FOUND
        assert caught.value.message == "process with pid 999999 not found"


async def test_connect_unknown_pid_and_unset_selector(service: ProcessService) -> None:
    with pytest.raises(ConnectError) as caught:
        await collect(service.connect(connect_pid(999999), context("Connect")))
    assert caught.value.code == Code.NOT_FOUND
    assert caught.value.message == "process with pid 999999 not found"
    with pytest.raises(ConnectError) as caught:
        await collect(service.connect(pb.ConnectRequest(), context("Connect")))
    assert caught.value.code == Code.UNIMPLEMENTED


# --------------------------------------------------------------------------------------------
# List, tags, signals


async def test_list_returns_the_original_config_and_tag(service: ProcessService) -> None:
    request = pb.StartRequest(
        process=pb.ProcessConfig(cmd="sleep", args=["30"], envs={"A": "b"}, cwd="project"),
        tag="sleeper",
        stdin=False,
    )
    stream = service.start(request, context("Start"))
    pid = (await first_event(stream)).start.pid
    untagged = service.start(start_request("sleep 30"), context("Start"))
    other = (await first_event(untagged)).start.pid
    listed = {p.pid: p for p in (await service.list(pb.ListRequest(), context("List"))).processes}
    assert set(listed) == {pid, other}
    assert listed[pid].tag == "sleeper"
    assert listed[pid].config == request.process
    assert not listed[other].HasField("tag")
    assert not listed[other].config.HasField("cwd")
    # Select by tag.
    await service.send_signal(
        pb.SendSignalRequest(process=pb.ProcessSelector(tag="sleeper"), signal=pb.SIGNAL_SIGTERM),
        context("SendSignal"),
    )
    events = await collect_rest(stream)
    assert events[-1].end.status == "signal: terminated"
    assert events[-1].end.exit_code == -1
    await service.send_signal(
        pb.SendSignalRequest(process=pb.ProcessSelector(pid=other), signal=pb.SIGNAL_SIGKILL),
        context("SendSignal"),
    )
    assert (await collect_rest(untagged))[-1].end.status == "signal: killed"
    tagged_again = await collect(
        service.connect(pb.ConnectRequest(process=pb.ProcessSelector(tag="sleeper")), context("C"))
    )
    assert tagged_again.kinds == ["start", "end"]


async def test_kill_does_not_wait_for_a_background_holder(service: ProcessService) -> None:
    stream = service.start(start_request("sleep 300 & echo $!; wait"), context("Start"))
    pid = (await first_event(stream)).start.pid
    holder = int((await first_event(stream)).data.stdout)
    try:
        await service.send_signal(
            pb.SendSignalRequest(process=pb.ProcessSelector(pid=pid), signal=pb.SIGNAL_SIGKILL),
            context("SendSignal"),
        )
        # Without abandoning the output this would wait for `sleep 300`, which holds the pipe.
        assert (await collect_rest(stream))[-1].end.status == "signal: killed"
    finally:
        os.kill(holder, signal.SIGKILL)


async def test_signal_errors(service: ProcessService) -> None:
    with pytest.raises(ConnectError) as caught:
        await service.send_signal(
            pb.SendSignalRequest(process=pb.ProcessSelector(pid=999999), signal=pb.SIGNAL_SIGKILL),
            context("SendSignal"),
        )
    assert caught.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as caught:
        await service.send_signal(
            pb.SendSignalRequest(process=pb.ProcessSelector(pid=1)), context("SendSignal")
        )
    assert caught.value.code == Code.UNIMPLEMENTED
    assert caught.value.message == "invalid signal: SIGNAL_UNSPECIFIED"


# --------------------------------------------------------------------------------------------
# stdin


async def test_stdin_input_and_close(service: ProcessService) -> None:
    stream = service.start(start_request("cat; echo closed", stdin=True), context("Start"))
    pid = (await first_event(stream)).start.pid
    selector = pb.ProcessSelector(pid=pid)
    await service.send_input(
        pb.SendInputRequest(process=selector, input=pb.ProcessInput(stdin=b"hello\n")),
        context("SendInput"),
    )
    await service.close_stdin(pb.CloseStdinRequest(process=selector), context("CloseStdin"))
    await service.close_stdin(pb.CloseStdinRequest(process=selector), context("CloseStdin"))
    with pytest.raises(ConnectError) as caught:
        await service.send_input(
            pb.SendInputRequest(process=selector, input=pb.ProcessInput(stdin=b"late")),
            context("SendInput"),
        )
    assert caught.value.code == Code.INTERNAL
    assert caught.value.message == "error writing to stdin: stdin not enabled or closed"
    events = await collect_rest(stream)
    assert b"".join(e.data.stdout for e in events if e.HasField("data")) == b"hello\nclosed\n"


async def test_stdin_absent_means_a_pipe_and_false_means_eof(service: ProcessService) -> None:
    stream = service.start(start_request("cat", stdin=None), context("Start"))
    pid = (await first_event(stream)).start.pid
    selector = pb.ProcessSelector(pid=pid)
    await service.send_input(
        pb.SendInputRequest(process=selector, input=pb.ProcessInput(stdin=b"piped")),
        context("SendInput"),
    )
    await service.close_stdin(pb.CloseStdinRequest(process=selector), context("CloseStdin"))
    events = await collect_rest(stream)
    assert b"".join(e.data.stdout for e in events if e.HasField("data")) == b"piped"
    # stdin=false: cat sees EOF at once, and input is refused.
    result = await run(service, "cat; echo eof", stdin=False)
    assert result.output("stdout") == b"eof\n"


async def test_large_input_does_not_block_the_loop(service: ProcessService) -> None:
    stream = service.start(start_request("sleep 0.3; wc -c", stdin=True), context("Start"))
    pid = (await first_event(stream)).start.pid
    selector = pb.ProcessSelector(pid=pid)
    await service.send_input(
        pb.SendInputRequest(process=selector, input=pb.ProcessInput(stdin=b"x" * 1_000_000)),
        context("SendInput"),
    )
    await service.close_stdin(pb.CloseStdinRequest(process=selector), context("CloseStdin"))
    events = await collect_rest(stream)
    assert b"".join(e.data.stdout for e in events if e.HasField("data")).strip() == b"1000000"


async def test_input_errors(service: ProcessService) -> None:
    with pytest.raises(ConnectError) as caught:
        await service.send_input(
            pb.SendInputRequest(
                process=pb.ProcessSelector(pid=999999), input=pb.ProcessInput(stdin=b"x")
            ),
            context("SendInput"),
        )
    assert caught.value.code == Code.NOT_FOUND
    stream = service.start(start_request("sleep 30", stdin=True), context("Start"))
    pid = (await first_event(stream)).start.pid
    selector = pb.ProcessSelector(pid=pid)
    with pytest.raises(ConnectError) as caught:
        await service.send_input(
            pb.SendInputRequest(process=selector, input=pb.ProcessInput(pty=b"x")),
            context("SendInput"),
        )
    assert caught.value.code == Code.INTERNAL
    with pytest.raises(ConnectError) as caught:
        await service.send_input(pb.SendInputRequest(process=selector), context("SendInput"))
    assert caught.value.code == Code.UNIMPLEMENTED
    with pytest.raises(ConnectError) as caught:
        await service.update(
            pb.UpdateRequest(process=selector, pty=pb.PTY(size=pb.PTY.Size(rows=1, cols=1))),
            context("Update"),
        )
    assert caught.value.code == Code.INTERNAL
    assert caught.value.message == "error resizing tty: tty not assigned to process"
    await service.update(pb.UpdateRequest(process=selector), context("Update"))  # no-op
    await close_stream(stream)


# --------------------------------------------------------------------------------------------
# PTY


async def test_pty_session(service: ProcessService) -> None:
    request = pb.StartRequest(
        process=pb.ProcessConfig(cmd="/bin/sh", envs={"PS1": ""}),
        pty=pb.PTY(size=pb.PTY.Size(rows=24, cols=80)),
    )
    stream = service.start(request, context("Start"))
    pid = (await first_event(stream)).start.pid
    selector = pb.ProcessSelector(pid=pid)

    async def send(text: bytes) -> None:
        await service.send_input(
            pb.SendInputRequest(process=selector, input=pb.ProcessInput(pty=text)),
            context("SendInput"),
        )

    await send(b"stty size; tty; echo sid=$(ps -o sid= -p $$)\n")
    output = b""
    async with asyncio.timeout(30):
        while not re.search(rb"sid=\s*\d+", output):  # the command's output, not its echo
            event = (await anext(stream)).event
            output += event.data.pty
    await service.update(
        pb.UpdateRequest(process=selector, pty=pb.PTY(size=pb.PTY.Size(rows=30, cols=100))),
        context("Update"),
    )
    with pytest.raises(ConnectError) as caught:
        await service.send_input(
            pb.SendInputRequest(process=selector, input=pb.ProcessInput(stdin=b"x")),
            context("SendInput"),
        )
    assert caught.value.code == Code.INTERNAL
    with pytest.raises(ConnectError) as caught:
        await service.close_stdin(pb.CloseStdinRequest(process=selector), context("CloseStdin"))
    assert caught.value.code == Code.UNKNOWN
    await send(b"stty size; exit 5\n")
    events = await collect_rest(stream)
    output += b"".join(e.data.pty for e in events if e.HasField("data"))
    text = output.decode(errors="replace")
    assert "24 80" in text
    assert "/dev/pts/" in text
    assert f"sid={pid}" in text.replace(" ", "")  # the shell leads its own session
    assert "30 100" in text
    assert events[-1].end.exit_code == 5


# --------------------------------------------------------------------------------------------
# The table on its own


async def test_table_retention_expires(sandbox: Sandbox) -> None:
    table: ProcessTable[str] = ProcessTable(sandbox.jail, retain_seconds=0.05)
    spec = ExecSpec(argv=["/bin/true"], user=User("root", 0, 0, "/root"), cwd="/")
    subscription = await table.start(spec, config="true")
    pid = subscription.pid
    async with asyncio.timeout(30):
        while not isinstance(event := await subscription.next(), Ended):
            assert isinstance(event, Output)
    assert isinstance(table.connect(pid), type(subscription))
    await asyncio.sleep(0.2)  # past the retention
    with pytest.raises(ProcessNotFound):
        table.connect(pid)
    await table.close()


async def test_many_concurrent_streams_lose_nothing(service: ProcessService) -> None:
    count = 50

    async def one(index: int) -> None:
        result = await run(service, f"echo {index}; echo err{index} >&2; exit {index % 7}")
        assert result.output("stdout") == f"{index}\n".encode()
        assert result.output("stderr") == f"err{index}\n".encode()
        assert result.end.exit_code == index % 7

    await asyncio.gather(*(one(i) for i in range(count)))


# --------------------------------------------------------------------------------------------
# Over HTTP: the generated ASGI app under hypercorn, the generated connectrpc client


def routed(app: Any, sandbox: Sandbox) -> Any:
    """What the gateway does before the service runs: bind the request's sandbox and user."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            user = basic_auth_user(headers.get("authorization"))
            enter_request(RequestScope(sandbox=sandbox.view, basic_user=user))
        await app(scope, receive, send)

    return asgi


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns and closes it
    config.keep_alive_max_requests = 100_000
    config.accesslog = None
    stop = asyncio.Event()
    server = asyncio.get_running_loop().create_task(
        serve(app, config, shutdown_trigger=stop.wait, mode="asgi")
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await server


@pytest.fixture
async def client(
    sandbox: Sandbox,
) -> AsyncIterator[tuple[process_connect.ProcessClient, ProcessService]]:
    service = ProcessService()  # reads the scope the (stand-in) gateway bound
    app = routed(process_connect.ProcessASGIApplication(service), sandbox)
    async with serving(app) as url:
        # Building the HTTP client loads the system's CA store: not on the loop.
        rpc = await asyncio.to_thread(
            process_connect.ProcessClient, url, codec=google_protobuf_json_codec()
        )
        yield rpc, service
    await service.aclose()


async def test_http_start_and_errors(
    client: tuple[process_connect.ProcessClient, ProcessService],
) -> None:
    rpc, _ = client
    result = await collect(rpc.start(start_request("echo hi; exit 2")))
    assert result.output("stdout") == b"hi\n"
    assert result.end.exit_code == 2
    with pytest.raises(ConnectError) as caught:
        await collect(rpc.start(start_request("true", cwd="/missing")))
    assert caught.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(ConnectError) as caught:
        await rpc.send_signal(
            pb.SendSignalRequest(process=pb.ProcessSelector(pid=999999), signal=pb.SIGNAL_SIGKILL)
        )
    assert caught.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as caught:
        await collect(rpc.start(start_request("true"), headers={"Authorization": "Basic Ym9iOg=="}))
    assert caught.value.code == Code.UNAUTHENTICATED
    root = await collect(
        rpc.start(start_request("echo $USER"), headers={"Authorization": "Basic cm9vdDo="})
    )
    assert root.output("stdout") == b"root\n"


async def test_http_disconnect_keeps_the_process(
    client: tuple[process_connect.ProcessClient, ProcessService],
) -> None:
    rpc, _ = client
    # Output flows from the start and far exceeds every buffer: the process only finishes if
    # the server lets go of the departed client and drops what nobody reads.
    stream = rpc.start(start_request("head -c 67108864 /dev/zero; exit 6"))
    pid = (await first_event(stream)).start.pid
    await anext(stream)  # some output is in flight
    await close_stream(stream)
    for _ in range(3000):  # up to 30 s: a hang guard, not a speed check
        if not (await rpc.list(pb.ListRequest())).processes:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the process blocked after its client went away")
    result = await collect(rpc.connect(connect_pid(pid)))
    assert result.kinds == ["start", "end"]
    assert result.end.exit_code == 6


async def test_http_timeout_kills(
    client: tuple[process_connect.ProcessClient, ProcessService],
) -> None:
    rpc, _ = client
    stream = rpc.start(start_request("sleep 30"), timeout_ms=400)
    pid = (await first_event(stream)).start.pid
    with pytest.raises(ConnectError) as caught:
        await collect_rest(stream)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    result = await collect(rpc.connect(connect_pid(pid)))
    assert result.end.status == "signal: killed"


async def test_http_stream_input(
    client: tuple[process_connect.ProcessClient, ProcessService],
) -> None:
    rpc, _ = client
    stream = rpc.start(start_request("cat", stdin=True))
    pid = (await first_event(stream)).start.pid

    async def inputs() -> AsyncIterator[pb.StreamInputRequest]:
        start = pb.StreamInputRequest.StartEvent(process=pb.ProcessSelector(pid=pid))
        yield pb.StreamInputRequest(start=start)
        for chunk in (b"one ", b"two"):
            data = pb.StreamInputRequest.DataEvent(input=pb.ProcessInput(stdin=chunk))
            yield pb.StreamInputRequest(data=data)
        yield pb.StreamInputRequest(keepalive=pb.StreamInputRequest.KeepAlive())

    await rpc.stream_input(inputs())
    await rpc.close_stdin(pb.CloseStdinRequest(process=pb.ProcessSelector(pid=pid)))
    events = await collect_rest(stream)
    assert b"".join(e.data.stdout for e in events if e.HasField("data")) == b"one two"

    async def data_first() -> AsyncIterator[pb.StreamInputRequest]:
        data = pb.StreamInputRequest.DataEvent(input=pb.ProcessInput(stdin=b"x"))
        yield pb.StreamInputRequest(data=data)

    with pytest.raises(ConnectError) as caught:
        await rpc.stream_input(data_first())
    assert caught.value.code == Code.FAILED_PRECONDITION


async def test_http_concurrent_streams(
    client: tuple[process_connect.ProcessClient, ProcessService],
) -> None:
    rpc, _ = client

    async def one(index: int) -> None:
        result = await collect(rpc.start(start_request(f"echo {index}")))
        assert result.output("stdout") == f"{index}\n".encode()
        assert result.end.exit_code == 0

    # 20 connections at once: 50 are covered without HTTP above and with the SDK in the e2e test;
    # accepting many at once in the debug loop shared with the client trips the blocking check.
    await asyncio.gather(*(one(i) for i in range(20)))
