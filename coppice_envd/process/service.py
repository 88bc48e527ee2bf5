"""envd's `process.Process` service over Connect: thin RPC methods over per-sandbox `ProcessTable`s.

The gateway tells each call which sandbox it is for and which Basic-auth user (if any) it names;
everything about running processes lives in `process_table`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import Headers, RequestContext
from process import process_pb2 as pb

from coppice_envd.permissions.paths import PathExpansionError, expand_and_resolve
from coppice_envd.process.table import (
    Ended,
    InputFailed,
    ManagedProcess,
    Output,
    ProcessError,
    ProcessNotFound,
    ProcessTable,
    ResizeFailed,
    Selector,
    SignalFailed,
    SpawnFailed,
    StdinNotClosable,
    Subscription,
    WorkdirMissing,
)
from coppice_envd.request import RequestScope, current_request, unknown_user_unauthenticated
from coppice_envd.rpc.streams import Keepalive, keepalive_interval, paced, rpc_deadline
from coppice_envd.sandboxes import SandboxStates, SandboxView, StateKind
from coppice_jails.runtime.base import ExecSpec, ExitStatus

# envd runs every command through `sh -c 'exec "$@"'`, so a command that cannot be executed
# still starts and exits 127 (or 126) with the shell's message. We exec directly (the jail's init
# searches PATH in the child's environment) and use the shell only when that fails: the same
# outcome, without a second exec on every start.
UNEXECUTABLE_FALLBACK = ["/bin/sh", "-c", 'exec "$@"', "--"]

_ERROR_CODES: dict[type[ProcessError], Code] = {
    ProcessNotFound: Code.NOT_FOUND,
    InputFailed: Code.INTERNAL,
    StdinNotClosable: Code.UNKNOWN,
    ResizeFailed: Code.INTERNAL,
    SignalFailed: Code.INTERNAL,
}
_SIGNALS = {pb.SIGNAL_SIGKILL: signal.SIGKILL, pb.SIGNAL_SIGTERM: signal.SIGTERM}
# Go's names for signals (os.ProcessState.String), the wording SDK users see in `status`.
_SIGNAL_NAMES = {
    1: "hangup", 2: "interrupt", 3: "quit", 4: "illegal instruction",
    5: "trace/breakpoint trap", 6: "aborted", 7: "bus error", 8: "floating point exception",
    9: "killed", 10: "user defined signal 1", 11: "segmentation fault",
    12: "user defined signal 2", 13: "broken pipe", 14: "alarm clock", 15: "terminated",
    16: "stack fault", 17: "child exited", 18: "continued", 19: "stopped (signal)",
    20: "stopped", 21: "stopped (tty input)", 22: "stopped (tty output)",
    23: "urgent I/O condition", 24: "CPU time limit exceeded", 25: "file size limit exceeded",
    26: "virtual timer expired", 27: "profiling timer expired", 28: "window changed",
    29: "I/O possible", 30: "power failure", 31: "bad system call",
}  # fmt: skip


def end_event(ended: Ended) -> pb.ProcessEvent.EndEvent:
    """An `EndEvent` with Go's `os.ProcessState` wording."""
    status: ExitStatus | None = ended.status
    if status is None:
        return pb.ProcessEvent.EndEvent(exit_code=-1, error=ended.error or "unknown")
    if status.signal is None:
        text = f"exit status {status.exit_code}"
        event = pb.ProcessEvent.EndEvent(exit_code=status.exit_code, exited=True, status=text)
        if status.exit_code != 0:
            event.error = text
        return event
    text = "signal: " + _SIGNAL_NAMES.get(status.signal, f"signal {status.signal}")
    return pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=text, error=text)


def process_timeout(headers: Headers) -> float | None:
    """Seconds a started process may live: envd reads only `Connect-Timeout-Ms` for this (the
    RPC deadline of gRPC clients bounds their stream, not the process)."""
    value = headers.get("connect-timeout-ms", "")
    return int(value) / 1000 if value.isdigit() and len(value) <= 10 else None


def _selector(message: pb.ProcessSelector) -> Selector:
    which = message.WhichOneof("selector")
    if which == "pid":
        return message.pid
    if which == "tag":
        return message.tag
    raise ConnectError(Code.UNIMPLEMENTED, "invalid input type: process selector not set")


def _rpc_error(exc: ProcessError) -> ConnectError:
    return ConnectError(_ERROR_CODES.get(type(exc), Code.INTERNAL), str(exc))


@contextlib.contextmanager
def _as_rpc_errors() -> Iterator[None]:
    """Process-table errors raised inside become the Connect errors envd answers with."""
    try:
        yield
    except ProcessError as exc:
        raise _rpc_error(exc) from exc


def _new_table(sandbox: SandboxView) -> ProcessTable[pb.ProcessConfig]:
    return ProcessTable(sandbox.jail)


_TABLE = StateKind("process table", _new_table)


class ProcessService:
    """Implements the generated `process_connect.Process` protocol.

    `scope` is called inside each RPC for the request's sandbox and user; by default the one
    the gateway's routing bound to the running request. The process tables belong to
    `sandboxes` (the gateway's, once `build_gateway` is given this service).
    Mount with `ProcessASGIApplication(ProcessService(...))`.
    """

    def __init__(self, scope: Callable[[], RequestScope] = current_request) -> None:
        self._scope = scope
        self.sandboxes = SandboxStates()

    def table(self, sandbox: SandboxView) -> ProcessTable[pb.ProcessConfig]:
        """The process table of a sandbox (a new one when the sandbox got a new jail)."""
        return self.sandboxes.get(sandbox, _TABLE)

    async def aclose(self) -> None:
        """Kill every process of every sandbox (the gateway is shutting down)."""
        await self.sandboxes.aclose()

    async def _current_table(self) -> ProcessTable[pb.ProcessConfig]:
        """The request's process table, once a Basic-auth user (if any) is known to exist:
        envd refuses an unknown one on every RPC (contract §1.2)."""
        scope = self._scope()
        if scope.basic_user is not None:
            with unknown_user_unauthenticated():
                await scope.user()
        return self.table(scope.sandbox)

    # -- streams ---------------------------------------------------------------------------

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[pb.StartRequest, pb.StartResponse]
    ) -> AsyncIterator[pb.StartResponse]:
        scope = self._scope()
        config = request.process
        with unknown_user_unauthenticated():
            user = await scope.user()
        # Whether cwd exists is the jail's to say (WorkdirError), as the user, when it starts.
        requested_cwd = config.cwd if config.HasField("cwd") else ""
        try:
            cwd = expand_and_resolve(requested_cwd, user, scope.sandbox.default_workdir)
        except PathExpansionError as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"failed to expand path '{requested_cwd}': {exc}"
            ) from exc
        env = {**scope.sandbox.process_env(user), **config.envs}
        pty = (request.pty.size.rows, request.pty.size.cols) if request.HasField("pty") else None
        original = pb.ProcessConfig()
        original.CopyFrom(config)
        table = self.table(scope.sandbox)
        kill_after = process_timeout(ctx.request_headers)

        async def start(argv: list[str]) -> Subscription:
            return await table.start(
                ExecSpec(argv=argv, user=user, cwd=cwd, env=env, pty=pty),
                config=original,
                tag=request.tag if request.HasField("tag") else None,
                stdin=request.stdin if request.HasField("stdin") else True,
                kill_after=kill_after,
            )

        argv = [config.cmd, *config.args]
        try:
            try:
                subscription = await start(argv)
            except SpawnFailed as exc:
                if not exc.unexecutable:
                    raise
                subscription = await start([*UNEXECUTABLE_FALLBACK, *argv])
        except SpawnFailed as exc:
            if isinstance(exc, WorkdirMissing):
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist") from None
            what = "pty with command" if pty is not None else "process"
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"error starting {what} '{' '.join(argv)}': {exc}"
            ) from exc
        except ProcessError as exc:
            raise _rpc_error(exc) from exc
        async with contextlib.aclosing(
            _events(subscription, ctx.request_headers, ctx.timeout_ms)
        ) as events:
            async for event in events:
                yield pb.StartResponse(event=event)

    async def connect(
        self,
        request: pb.ConnectRequest,
        ctx: RequestContext[pb.ConnectRequest, pb.ConnectResponse],
    ) -> AsyncIterator[pb.ConnectResponse]:
        selector = _selector(request.process)
        with _as_rpc_errors():
            subscription = (await self._current_table()).connect(selector)
        async with contextlib.aclosing(
            _events(subscription, ctx.request_headers, ctx.timeout_ms)
        ) as events:
            async for event in events:
                yield pb.ConnectResponse(event=event)

    # -- unary -----------------------------------------------------------------------------

    async def list(
        self, request: pb.ListRequest, ctx: RequestContext[pb.ListRequest, pb.ListResponse]
    ) -> pb.ListResponse:
        response = pb.ListResponse()
        table = await self._current_table()
        for managed in table.processes():
            info = response.processes.add(pid=managed.pid, config=managed.config)
            if managed.tag is not None:
                info.tag = managed.tag
        return response

    async def send_input(
        self,
        request: pb.SendInputRequest,
        ctx: RequestContext[pb.SendInputRequest, pb.SendInputResponse],
    ) -> pb.SendInputResponse:
        await self._write(_selector(request.process), request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self,
        request: AsyncIterator[pb.StreamInputRequest],
        ctx: RequestContext[pb.StreamInputRequest, pb.StreamInputResponse],
    ) -> pb.StreamInputResponse:
        target: Selector | None = None
        async for message in request:
            which = message.WhichOneof("event")
            if which == "start":
                target = _selector(message.start.process)
                await self._process(target)  # not_found before any input arrives
            elif which == "data":
                if target is None:
                    raise ConnectError(
                        Code.FAILED_PRECONDITION, "input sent before the start message"
                    )
                await self._write(target, message.data.input)
        return pb.StreamInputResponse()

    async def send_signal(
        self,
        request: pb.SendSignalRequest,
        ctx: RequestContext[pb.SendSignalRequest, pb.SendSignalResponse],
    ) -> pb.SendSignalResponse:
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(
                Code.UNIMPLEMENTED, f"invalid signal: {pb.Signal.Name(request.signal)}"
            )
        process = await self._process(_selector(request.process))
        with _as_rpc_errors():
            await process.send_signal(signum)
        return pb.SendSignalResponse()

    async def close_stdin(
        self,
        request: pb.CloseStdinRequest,
        ctx: RequestContext[pb.CloseStdinRequest, pb.CloseStdinResponse],
    ) -> pb.CloseStdinResponse:
        process = await self._process(_selector(request.process))
        with _as_rpc_errors():
            process.close_stdin()
        return pb.CloseStdinResponse()

    async def update(
        self, request: pb.UpdateRequest, ctx: RequestContext[pb.UpdateRequest, pb.UpdateResponse]
    ) -> pb.UpdateResponse:
        process = await self._process(_selector(request.process))
        if request.HasField("pty"):
            with _as_rpc_errors():
                process.resize(request.pty.size.rows, request.pty.size.cols)
        return pb.UpdateResponse()

    async def _write(self, selector: Selector, data: pb.ProcessInput) -> None:
        which = data.WhichOneof("input")
        if which is None:
            raise ConnectError(Code.UNIMPLEMENTED, "invalid input type: input not set")
        process = await self._process(selector)
        with _as_rpc_errors():
            if which == "stdin":
                await process.write_stdin(data.stdin)
            else:
                await process.write_pty(data.pty)

    async def _process(self, selector: Selector) -> ManagedProcess[pb.ProcessConfig]:
        """The process a request addresses (not_found when there is none)."""
        with _as_rpc_errors():
            return (await self._current_table()).get(selector)


async def _events(
    subscription: Subscription, headers: Headers, timeout_ms: float | None
) -> AsyncGenerator[pb.ProcessEvent, None]:
    """A subscription as envd streams it: start, data, keepalives while idle, then one end.

    The RPC deadline (`Connect-Timeout-Ms`) ends the stream with deadline_exceeded; closing the
    stream (a client that went away) only unsubscribes.
    """
    deadline = rpc_deadline(timeout_ms)
    try:
        yield pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=subscription.pid))
        events = paced(subscription.next, keepalive_interval(headers), deadline)
        async with contextlib.aclosing(events):
            async for event in events:
                if event is Keepalive.DUE:
                    yield pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())
                elif isinstance(event, Output):
                    yield pb.ProcessEvent(
                        data=pb.ProcessEvent.DataEvent(**{event.kind: event.data})
                    )
                else:
                    yield pb.ProcessEvent(end=end_event(event))
                    return
    finally:
        subscription.close()
