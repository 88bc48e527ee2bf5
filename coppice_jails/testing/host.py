"""A stand-in jail whose processes run on the host (as the caller's user): the process service
and its clients tested and measured without namespaces, with the ExecSpec's cwd (under the
jail's root), environment and pty exactly as given."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import struct
import termios
from pathlib import Path

from coppice_jails.runtime.base import (
    ExecError,
    ExecSpec,
    ExitStatus,
    Jail,
    JailProcess,
    JailStats,
    ProcessNotFound,
    WorkdirError,
)


class HostProcess(JailProcess):
    """A host process; its exit is seen through a pidfd, so no child watcher is involved."""

    def __init__(self, pid: int, fds: dict[str, int | None]) -> None:
        self.pid = pid
        self.stdin_fd = fds["stdin"]
        self.stdout_fd = fds["stdout"]
        self.stderr_fd = fds["stderr"]
        self.pty_fd = fds["pty"]
        self._pidfd = os.pidfd_open(pid)
        self._exited = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        _, wait_status = os.waitpid(self.pid, 0)  # it has exited: this only reaps
        code = os.waitstatus_to_exitcode(wait_status)
        self._exited.set_result(ExitStatus(code, -code) if code < 0 else ExitStatus(code))

    async def wait(self) -> ExitStatus:
        status: ExitStatus = await asyncio.shield(self._exited)
        return status

    async def signal(self, signum: int) -> None:
        if self._exited.done():
            raise ProcessNotFound(f"process {self.pid} has exited")
        os.kill(self.pid, signum)


class HostJail(Jail):
    """posix_spawn (vfork: cheap on the loop however big this process is) of `env -C <cwd>`,
    which execs the command with the same pid; a pty child goes through `setsid -c` to own its
    terminal. Like the real runtime, a program not found on the new PATH is an ExecError."""

    def __init__(self, root: Path, sandbox_id: str = "sbx-test") -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.handle = "host"
        self.specs: list[ExecSpec] = []

    async def exec(self, spec: ExecSpec) -> JailProcess:
        self.specs.append(spec)
        if shutil.which(spec.argv[0], path=spec.env.get("PATH", os.defpath)) is None:
            raise ExecError(errno.ENOENT, f"{spec.argv[0]}: No such file or directory")
        cwd = self.root / spec.cwd.lstrip("/")
        if not cwd.is_dir():
            raise WorkdirError(errno.ENOENT, f"{spec.cwd}: No such file or directory")
        ours: dict[str, int | None] = {"stdin": None, "stdout": None, "stderr": None, "pty": None}
        argv = ["env", "-C", str(cwd), "--", *spec.argv]
        if spec.pty is None:
            stdin_r, ours["stdin"] = os.pipe2(os.O_CLOEXEC)
            ours["stdout"], stdout_w = os.pipe2(os.O_CLOEXEC)
            ours["stderr"], stderr_w = os.pipe2(os.O_CLOEXEC)
            theirs = [stdin_r, stdout_w, stderr_w]
        else:
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            rows, cols = spec.pty
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            ours["pty"] = master
            theirs = [slave, slave, slave]
            argv = ["setsid", "-c", *argv]
        try:
            pid = os.posix_spawnp(  # noqa: ASYNC221 - a vfork, no slower than an os.pipe
                argv[0],
                argv,
                dict(spec.env),
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(theirs)],
            )
        finally:
            for fd in set(theirs):
                os.close(fd)
        return HostProcess(pid, ours)

    async def signal(self, pid: int, signum: int) -> None:
        os.kill(pid, signum)

    async def freeze(self) -> None:
        raise NotImplementedError

    async def thaw(self) -> None:
        raise NotImplementedError

    async def stats(self) -> JailStats:
        raise NotImplementedError

    def is_alive(self) -> bool:
        return True

    async def stop(self) -> None:
        pass
