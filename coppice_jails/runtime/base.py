"""What a jail runtime offers the rest of Coppice, independent of the backend (Linux, FreeBSD)."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coppice_jails.confined import ConfinedRoot


class JailError(Exception):
    """A jail could not be started, entered or managed."""


class ExecError(JailError):
    """A process could not be started in a jail (no such program, bad cwd, ...)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class WorkdirError(ExecError):
    """The process's working directory could not be entered (`errno` from chdir, as the
    process's user): the runtime checks it, so callers need not look first."""


class ProcessNotFound(JailError):
    """No process with that pid runs in the jail (any more)."""


@dataclass(frozen=True)
class User:
    """A user as the sandbox's own /etc/passwd and /etc/group describe it."""

    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox; None means unlimited."""

    memory_bytes: int | None = 512 * 1024 * 1024
    cpu_millicores: int | None = 2000
    pids: int | None = 512


@dataclass(frozen=True)
class ExecSpec:
    """One process to start inside a jail. Paths are as seen inside the jail."""

    argv: Sequence[str]
    user: User
    cwd: str
    env: Mapping[str, str] = field(default_factory=dict)
    # (rows, cols) to run on a new pseudo-terminal as its controlling tty; None for pipes.
    pty: tuple[int, int] | None = None


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: exit_code is -signal when killed by a signal (as Go reports it)."""

    exit_code: int
    signal: int | None = None

    @property
    def exited(self) -> bool:
        return self.signal is None


@dataclass(frozen=True)
class JailStats:
    cpu_usage_usec: int
    memory_bytes: int
    memory_limit_bytes: int | None
    pids: int


class JailProcess(abc.ABC):
    """A process running in a jail. The caller owns the file descriptors it is given."""

    pid: int  # as seen inside the jail
    # Pipe ends for stdin (write), stdout and stderr (read); or a PTY master (read/write).
    stdin_fd: int | None
    stdout_fd: int | None
    stderr_fd: int | None
    pty_fd: int | None

    @abc.abstractmethod
    async def wait(self) -> ExitStatus: ...

    @abc.abstractmethod
    async def signal(self, signum: int) -> None:
        """ProcessNotFound if the process has ended."""


class Jail(abc.ABC):
    """A running jail: a confined process tree on a sandbox root."""

    sandbox_id: str
    root: Path  # host path of the sandbox's root filesystem (its clone, without the jail's mounts)
    handle: str  # backend reference stored in the registry to re-attach after a restart
    # Where the host reaches the jail's own listeners (any port): its network namespace's
    # address, or loopback for a jail that shares the host's network.
    address: str = "127.0.0.1"

    def open_root(self) -> ConfinedRoot:
        """The sandbox's files exactly as its processes see them, mounts included (its /tmp,
        /proc, /dev), confined to its root; keyed by `root`. Blocking: call from a thread.
        OSError (ESRCH) when the jail is gone. Backends whose jails mount nothing over their
        root keep this default."""
        return ConfinedRoot(self.root)

    @abc.abstractmethod
    async def exec(self, spec: ExecSpec) -> JailProcess:
        """Start a process; ExecError if it cannot be started (nothing is left running then),
        WorkdirError when that is because its user cannot enter `spec.cwd`."""

    @abc.abstractmethod
    async def signal(self, pid: int, signum: int) -> None:
        """Send a signal to a process of the jail by its in-jail pid; ProcessNotFound if none."""

    @abc.abstractmethod
    async def freeze(self) -> None: ...

    @abc.abstractmethod
    async def thaw(self) -> None: ...

    @abc.abstractmethod
    async def stats(self) -> JailStats: ...

    @abc.abstractmethod
    def is_alive(self) -> bool: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Kill every process of the jail and release its resources (cgroups, sockets)."""


class Runtime(abc.ABC):
    """Starts jails and finds them again after a service restart."""

    name: str

    @abc.abstractmethod
    async def start(self, sandbox_id: str, root: Path, limits: Limits) -> Jail: ...

    @abc.abstractmethod
    async def attach(self, sandbox_id: str, root: Path, handle: str) -> Jail | None:
        """The live jail for a stored handle, or None if it is gone."""

    @abc.abstractmethod
    async def list_jails(self) -> list[str]:
        """Sandbox ids of every jail (or leftover of one, e.g. a cgroup) this runtime can see."""

    @abc.abstractmethod
    async def destroy_leftover(self, sandbox_id: str) -> None:
        """Kill and clean up a jail that no record owns."""

    async def close(self) -> None:  # noqa: B027 (most runtimes keep nothing for later jails)
        """Release what the runtime keeps ready for jails to come; running jails stay."""
