"""The processes one sandbox runs for envd's Process service, independent of any RPC protocol.

A process outlives the streams that watch it. Its output fds are read continuously on the event
loop: chunks go to every current subscriber, or are dropped while nobody subscribes, so the child
never blocks on a full pipe unless a subscriber is slow (then it gets back-pressure, as in envd).
When every output reader has reached EOF (or a kill made us stop waiting for them) the process
is reaped, leaves the live table, and its end stays retained for `RETAIN_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import termios
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from coppice_jails.runtime.base import (
    ExecError,
    ExecSpec,
    ExitStatus,
    Jail,
    JailError,
    JailProcess,
    WorkdirError,
)
from coppice_jails.runtime.base import ProcessNotFound as ProcessGone
from coppice_jails.runtime.pipes import FdReader, FdWriter, WriterClosed

logger = logging.getLogger(__name__)

PIPE_CHUNK_BYTES = 32 * 1024  # envd's read size for stdout/stderr
PTY_CHUNK_BYTES = 16 * 1024  # and for a pty master
RETAIN_SECONDS = 30.0  # how long an exited process stays connectable
# A subscriber holding more unsent output than this pauses the readers (back-pressure).
SUBSCRIBER_BUFFER_BYTES = 1024 * 1024
_UNEXECUTABLE = frozenset({errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.ELOOP})

OutputKind = Literal["stdout", "stderr", "pty"]
Selector = int | str  # a pid, or a tag


@dataclass(frozen=True)
class Output:
    kind: OutputKind
    data: bytes


@dataclass(frozen=True)
class Ended:
    """How a process ended; `status` is None when it could not be reaped (`error` says why)."""

    status: ExitStatus | None
    error: str | None = None


Event = Output | Ended


class ProcessError(Exception):
    """Base of the errors a table operation reports to its caller."""


class ProcessNotFound(ProcessError):
    pass


class SpawnFailed(ProcessError):
    """The jail could not start the process; `unexecutable` when the program itself is the
    problem (missing, not executable), not the jail."""

    def __init__(self, message: str, *, unexecutable: bool) -> None:
        super().__init__(message)
        self.unexecutable = unexecutable


class WorkdirMissing(SpawnFailed):
    """The process's working directory does not exist."""

    def __init__(self, message: str) -> None:
        super().__init__(message, unexecutable=False)


class InputFailed(ProcessError):
    """Input could not be written (no stdin pipe, no pty, or the write failed)."""


class StdinNotClosable(ProcessError):
    pass


class ResizeFailed(ProcessError):
    pass


class SignalFailed(ProcessError):
    pass


def _not_found(selector: Selector) -> ProcessNotFound:
    if isinstance(selector, int):
        return ProcessNotFound(f"process with pid {selector} not found")
    return ProcessNotFound(f"process with tag {selector} not found")


class Subscription:
    """One watcher of a process's events: live output from now on, then exactly one `Ended`."""

    def __init__(
        self,
        pid: int,
        on_drained: Callable[[], None] | None = None,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.pid = pid
        self._events: deque[Event] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._on_drained = on_drained  # told when the backlog fell under half the budget
        self._on_close = on_close
        self.closed = False

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def push(self, event: Event) -> None:
        if self.closed:
            return
        self._events.append(event)
        if isinstance(event, Output):
            self._buffered += len(event.data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Event:
        """The next event; cancelling the wait loses nothing."""
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if isinstance(event, Output):
            was_over = self._buffered >= SUBSCRIBER_BUFFER_BYTES // 2
            self._buffered -= len(event.data)
            if was_over and self._buffered < SUBSCRIBER_BUFFER_BYTES // 2 and self._on_drained:
                self._on_drained()
        return event

    def close(self) -> None:
        """Stop watching; the process keeps running."""
        if not self.closed:
            self.closed = True
            self._events.clear()
            self._buffered = 0
            if self._on_close is not None:
                self._on_close(self)


C = TypeVar("C")  # what the caller keeps with each process (envd: the ProcessConfig as sent)


class ManagedProcess(Generic[C]):
    """One process of a table: its output readers, subscribers, stdin or pty, and its end."""

    def __init__(
        self,
        table: ProcessTable[C],
        proc: JailProcess,
        *,
        tag: str | None,
        config: C,
        stdin: bool,
    ) -> None:
        self._table = table
        self._proc = proc
        self.pid = proc.pid
        self.tag = tag
        self.config = config
        self.ended: Ended | None = None
        self._subscribers: list[Subscription] = []
        self._paused = False
        self._output_done = asyncio.Event()  # all readers at EOF, or a kill: stop waiting for them
        self._deadline: asyncio.TimerHandle | None = None
        # A pty master is read, written and resized: it is closed once it is read to EOF and the
        # process has ended. Pipe ends are closed as soon as they are done with.
        self._pty: FdWriter | None = None
        self._stdin: FdWriter | None = None
        self._readers: list[FdReader] = []
        if proc.pty_fd is not None:
            self._pty = FdWriter(proc.pty_fd)
            self._readers.append(
                FdReader(proc.pty_fd, PTY_CHUNK_BYTES, self._emitter("pty"), self._pty_read)
            )
        if proc.stdin_fd is not None:
            if stdin and self._pty is None:
                self._stdin = FdWriter(proc.stdin_fd)
            else:
                os.close(proc.stdin_fd)  # the child reads EOF, as from /dev/null
        pipes: tuple[tuple[int | None, OutputKind], ...] = (
            (proc.stdout_fd, "stdout"),
            (proc.stderr_fd, "stderr"),
        )
        for fd, kind in pipes:
            if fd is not None:
                self._readers.append(
                    FdReader(fd, PIPE_CHUNK_BYTES, self._emitter(kind), self._pipe_read(fd))
                )
        if not self._readers:
            self._output_done.set()

    @property
    def has_pty(self) -> bool:
        return self._proc.pty_fd is not None

    # -- output ------------------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        subscription = Subscription(self.pid, self._maybe_resume, self._unsubscribe)
        self._subscribers.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)
        self._maybe_resume()

    def _emitter(self, kind: OutputKind) -> Callable[[bytes], None]:
        def emit(data: bytes) -> None:
            if not self._subscribers:
                return  # nobody listens: drop it, never block the child
            event = Output(kind, data)
            for subscription in self._subscribers:
                subscription.push(event)
                if subscription.buffered_bytes > SUBSCRIBER_BUFFER_BYTES:
                    self._pause()

        return emit

    def _pause(self) -> None:
        if not self._paused and not self._output_done.is_set():
            self._paused = True
            for reader in self._readers:
                reader.pause()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            for reader in self._readers:
                reader.resume()

    def _maybe_resume(self) -> None:
        limit = SUBSCRIBER_BUFFER_BYTES // 2
        if self._paused and all(s.buffered_bytes < limit for s in self._subscribers):
            self._resume()

    def _pipe_read(self, fd: int) -> Callable[[], None]:
        def finished() -> None:
            os.close(fd)
            self._reader_finished()

        return finished

    def _pty_read(self) -> None:
        self._reader_finished()
        self._maybe_close_pty()

    def _reader_finished(self) -> None:
        if all(reader.done for reader in self._readers):
            self._output_done.set()

    def _maybe_close_pty(self) -> None:
        if self._pty is None or self._pty.closed or self.ended is None:
            return
        if all(reader.done for reader in self._readers) and self._proc.pty_fd is not None:
            self._pty.shutdown()
            os.close(self._proc.pty_fd)

    # -- input, size, signals ---------------------------------------------------------------

    async def write_stdin(self, data: bytes) -> None:
        if self.has_pty:
            raise InputFailed(
                "error writing to stdin: tty assigned to process — "
                "input should be written to the pty, not the stdin"
            )
        if self._stdin is None or self._stdin.closed:
            raise InputFailed("error writing to stdin: stdin not enabled or closed")
        try:
            await self._stdin.write(data)
        except WriterClosed:
            raise InputFailed("error writing to stdin: stdin not enabled or closed") from None
        except OSError as exc:
            raise InputFailed(f"error writing to stdin: {exc.strerror or exc}") from exc

    async def write_pty(self, data: bytes) -> None:
        if self._pty is None:
            raise InputFailed(
                "error writing to tty: tty not assigned to process — "
                "input should be written to the stdin, not the pty"
            )
        try:
            await self._pty.write(data)
        except WriterClosed:
            raise InputFailed("error writing to tty: tty closed") from None
        except OSError as exc:
            raise InputFailed(f"error writing to tty: {exc.strerror or exc}") from exc

    def close_stdin(self) -> None:
        if self.has_pty:
            raise StdinNotClosable(
                "error closing stdin: cannot close stdin for PTY process — "
                "send Ctrl+D (0x04) instead"
            )
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._stdin is not None and not self._stdin.closed:
            self._stdin.shutdown()
            assert self._proc.stdin_fd is not None
            os.close(self._proc.stdin_fd)

    def resize(self, rows: int, cols: int) -> None:
        if self._pty is None or self._pty.closed or self._proc.pty_fd is None:
            raise ResizeFailed("error resizing tty: tty not assigned to process")
        size = struct.pack("HHHH", rows, cols, 0, 0)
        try:
            fcntl.ioctl(self._proc.pty_fd, termios.TIOCSWINSZ, size)
        except OSError as exc:
            raise ResizeFailed(f"error resizing tty: {exc.strerror or exc}") from exc

    async def send_signal(self, signum: int) -> None:
        """Signal the pid only (not its group); the end then no longer waits for the output,
        and whatever a surviving grandchild still writes is read and dropped."""
        try:
            await self._proc.signal(signum)
        except (ProcessGone, ProcessLookupError):
            pass  # already gone; it is being reaped
        except (JailError, OSError) as exc:
            raise SignalFailed(f"error sending signal: {exc}") from exc
        self._output_done.set()
        self._resume()

    def kill_at(self, seconds: float) -> None:
        """SIGKILL the process after `seconds`, whoever still listens (envd's Start timeout)."""
        self._deadline = asyncio.get_running_loop().call_later(
            seconds, lambda: self._table._spawn_task(self.kill())
        )

    async def kill(self) -> None:
        """SIGKILL, reporting a failure in the log (nobody else is there to tell)."""
        try:
            await self.send_signal(signal.SIGKILL)
        except SignalFailed as exc:
            logger.warning("killing process %s failed: %s", self.pid, exc)

    # -- end ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Reap the process once its output is done, and publish its end."""
        await self._output_done.wait()
        try:
            ended = Ended(await self._proc.wait())
        except Exception as exc:
            logger.exception("waiting for process %s failed", self.pid)
            ended = Ended(None, f"error waiting for process: {exc}")
        if self._deadline is not None:
            self._deadline.cancel()
        self.ended = ended
        self._close_stdin()
        self._maybe_close_pty()
        self._table._finished(self)
        for subscription in self._subscribers:
            subscription.push(ended)
        self._subscribers = []


@dataclass
class _Retained:
    pid: int
    tag: str | None
    ended: Ended
    expiry: asyncio.TimerHandle


class ProcessTable(Generic[C]):
    """The processes started in one jail, by pid, plus the ends of those that exited lately."""

    def __init__(self, jail: Jail, retain_seconds: float = RETAIN_SECONDS) -> None:
        self.jail = jail
        self._retain_seconds = retain_seconds
        self._live: dict[int, ManagedProcess[C]] = {}
        self._retained: dict[int, _Retained] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        spec: ExecSpec,
        *,
        config: C,
        tag: str | None = None,
        stdin: bool = True,
        kill_after: float | None = None,
    ) -> Subscription:
        """Spawn a process and return a subscription made before any of its output is read."""
        try:
            proc = await self.jail.exec(spec)
        except WorkdirError as exc:
            if exc.errno == errno.ENOENT:
                raise WorkdirMissing(str(exc)) from exc
            raise SpawnFailed(str(exc), unexecutable=False) from exc
        except ExecError as exc:
            raise SpawnFailed(str(exc), unexecutable=exc.errno in _UNEXECUTABLE) from exc
        except (JailError, OSError) as exc:
            raise SpawnFailed(str(exc), unexecutable=False) from exc
        managed = ManagedProcess(self, proc, tag=tag, config=config, stdin=stdin)
        subscription = managed.subscribe()
        self._forget_retained(managed.pid, tag)
        self._live[managed.pid] = managed
        if kill_after is not None:
            managed.kill_at(kill_after)
        self._spawn_task(managed.run())
        return subscription

    def get(self, selector: Selector) -> ManagedProcess[C]:
        """A live process by pid or tag."""
        if isinstance(selector, int):
            found = self._live.get(selector)
        else:
            found = next((p for p in self._live.values() if p.tag == selector), None)
        if found is None:
            raise _not_found(selector)
        return found

    def connect(self, selector: Selector) -> Subscription:
        """Watch a live process, or get the retained end of one that exited lately."""
        try:
            return self.get(selector).subscribe()
        except ProcessNotFound:
            pass
        for retained in self._retained.values():
            if retained.pid == selector or (retained.tag is not None and retained.tag == selector):
                subscription = Subscription(retained.pid)
                subscription.push(retained.ended)
                return subscription
        raise _not_found(selector)

    def processes(self) -> list[ManagedProcess[C]]:
        return list(self._live.values())

    async def close(self) -> None:
        """SIGKILL every live process and wait until they are reaped (the sandbox is going)."""
        for managed in list(self._live.values()):
            await managed.kill()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for retained in self._retained.values():
            retained.expiry.cancel()
        self._retained.clear()

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finished(self, managed: ManagedProcess[C]) -> None:
        assert managed.ended is not None
        if self._live.get(managed.pid) is managed:
            del self._live[managed.pid]
        self._forget_retained(managed.pid, managed.tag)
        expiry = asyncio.get_running_loop().call_later(
            self._retain_seconds, self._retained.pop, managed.pid, None
        )
        self._retained[managed.pid] = _Retained(managed.pid, managed.tag, managed.ended, expiry)

    def _forget_retained(self, pid: int, tag: str | None) -> None:
        for key, retained in list(self._retained.items()):
            if retained.pid == pid or (tag is not None and retained.tag == tag):
                retained.expiry.cancel()
                del self._retained[key]
