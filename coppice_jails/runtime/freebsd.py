"""FreeBSD jails: `jail -c` on the sandbox root, `jexec -U` to run processes, `rctl` limits.

UNTESTED ON A FREEBSD HOST. It has never run on FreeBSD; only the command lines it issues are
unit-tested (tests/test_runtime_freebsd.py), on Linux. Every command line comes from a pure
function below so that it can be checked without a FreeBSD machine.

Choices:
- Jail names are `coppice_<sandbox id>` (the hostname is the plain id): `list_jails()` and
  `destroy_leftover()` must never see, let alone remove, jails that Coppice did not make, and a
  name that is all digits would be taken for a jail id.
- Exec is `jexec -U USER NAME /usr/bin/env -i K=V... /bin/sh -c 'cd -- "$1" && shift && exec "$@"'
  coppice-exec CWD ARGV...`. `jexec -U` looks the user up in the jail's own passwd and group
  files and enters the jail's root before anything runs, so `cd` resolves CWD inside the jail.
  `env -i` gives exactly the requested environment; `jexec -l` was not used because it replaces
  the environment with a login one and changes to the home directory, losing both env and cwd.
  CWD and ARGV are positional parameters, never spliced into shell text, so nothing needs quoting.
  Every step execs the next, so the host pid of jexec is the process itself (pids are global on
  FreeBSD: it is also the pid seen inside the jail).
- Limitations: a missing program or bad cwd ends as exit code 127 / 1 from the shell rather than
  an ExecError / WorkdirError (so envd's "cwd does not exist" answer is not given here); no PTY
  processes yet; pause is SIGSTOP/SIGCONT of the jail's processes, which a process forked during
  the `pkill` scan can escape.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from coppice_jails.runtime.base import (
    ExecError,
    ExecSpec,
    ExitStatus,
    Jail,
    JailError,
    JailProcess,
    JailStats,
    Limits,
    ProcessNotFound,
    Runtime,
)

JAIL_PREFIX = "coppice_"
_CD_AND_EXEC = 'cd -- "$1" && shift && exec "$@"'

# Runs a command, returns (exit code, stdout, stderr). Replaceable for tests.
CommandRunner = Callable[[Sequence[str]], Awaitable[tuple[int, str, str]]]


# -- Command lines (pure) -------------------------------------------------------------------------
def jail_name(sandbox_id: str) -> str:
    return JAIL_PREFIX + sandbox_id


def create_command(sandbox_id: str, root: Path) -> list[str]:
    return [
        "jail", "-i", "-c", f"name={jail_name(sandbox_id)}", "persist", f"path={root}",
        f"host.hostname={sandbox_id}", "ip4=inherit", "mount.devfs",
    ]  # fmt: skip


def limit_commands(sandbox_id: str, limits: Limits) -> list[list[str]]:
    rules = []
    if limits.memory_bytes is not None:
        rules.append(f"memoryuse:deny={limits.memory_bytes}")
    if limits.pids is not None:
        rules.append(f"maxproc:deny={limits.pids}")
    if limits.cpu_millicores is not None:
        # pcpu is in percent of one CPU.
        rules.append(f"pcpu:deny={max(1, limits.cpu_millicores // 10)}")
    return [["rctl", "-a", f"jail:{jail_name(sandbox_id)}:{rule}"] for rule in rules]


def exec_command(sandbox_id: str, spec: ExecSpec) -> list[str]:
    env = [f"{key}={value}" for key, value in spec.env.items()]
    return [
        "jexec", "-U", spec.user.name, jail_name(sandbox_id),
        "/usr/bin/env", "-i", *env,
        "/bin/sh", "-c", _CD_AND_EXEC, "coppice-exec", spec.cwd, *spec.argv,
    ]  # fmt: skip


def signal_command(sandbox_id: str, pid: int, signum: int) -> list[str]:
    # kill(1) run inside the jail only sees the jail's processes: another jail's pid fails.
    return ["jexec", jail_name(sandbox_id), "/bin/kill", f"-{signum}", str(pid)]


def pause_command(sandbox_id: str, resume: bool) -> list[str]:
    return ["pkill", "-CONT" if resume else "-STOP", "-j", jail_name(sandbox_id)]


def stats_command(sandbox_id: str) -> list[str]:
    return ["rctl", "-u", f"jail:{jail_name(sandbox_id)}"]


def remove_commands(sandbox_id: str) -> list[list[str]]:
    return [["jail", "-r", jail_name(sandbox_id)], ["rctl", "-r", f"jail:{jail_name(sandbox_id)}"]]


def list_command() -> list[str]:
    return ["jls", "name"]


def jid_command(sandbox_id: str) -> list[str]:
    return ["jls", "-j", jail_name(sandbox_id), "jid"]


def parse_stats(rctl_usage: str, limits: Limits) -> JailStats:
    """`rctl -u` prints resource=value lines; cputime is in seconds."""
    usage = dict(line.split("=", 1) for line in rctl_usage.split() if "=" in line)
    return JailStats(
        cpu_usage_usec=int(usage.get("cputime", "0")) * 1_000_000,
        memory_bytes=int(usage.get("memoryuse", "0")),
        memory_limit_bytes=limits.memory_bytes,
        pids=int(usage.get("maxproc", "0")),
    )


def parse_jail_names(jls_output: str) -> list[str]:
    """Sandbox ids of Coppice's jails in `jls name` output."""
    return sorted(
        name[len(JAIL_PREFIX) :] for name in jls_output.split() if name.startswith(JAIL_PREFIX)
    )


# -- Runtime --------------------------------------------------------------------------------------
async def run_command(argv: Sequence[str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class FreeBSDRuntime(Runtime):
    name = "freebsd"

    def __init__(self, run: CommandRunner = run_command) -> None:
        self.run = run

    async def check(self, argv: Sequence[str]) -> str:
        code, out, err = await self.run(argv)
        if code != 0:
            raise JailError(f"{' '.join(argv)}: {err.strip() or f'exit code {code}'}")
        return out

    async def start(self, sandbox_id: str, root: Path, limits: Limits) -> FreeBSDJail:
        jid = (await self.check(create_command(sandbox_id, root))).strip()
        try:
            for command in limit_commands(sandbox_id, limits):
                await self.check(command)
        except BaseException:
            await asyncio.shield(self.destroy_leftover(sandbox_id))
            raise
        return FreeBSDJail(self, sandbox_id, root, jid, limits)

    async def attach(self, sandbox_id: str, root: Path, handle: str) -> FreeBSDJail | None:
        # A jail made again under the same name gets a new jid: only the same jid matches.
        code, out, _ = await self.run(jid_command(sandbox_id))
        if code != 0 or out.strip() != handle:
            return None
        return FreeBSDJail(self, sandbox_id, root, handle, Limits())

    async def list_jails(self) -> list[str]:
        return parse_jail_names(await self.check(list_command()))

    async def destroy_leftover(self, sandbox_id: str) -> None:
        for command in remove_commands(sandbox_id):
            await self.run(command)  # either part may be gone already


class FreeBSDJail(Jail):
    def __init__(
        self, runtime: FreeBSDRuntime, sandbox_id: str, root: Path, jid: str, limits: Limits
    ) -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.handle = jid
        self._runtime = runtime
        self._limits = limits

    async def exec(self, spec: ExecSpec) -> FreeBSDProcess:
        if spec.pty is not None:
            raise ExecError(errno.ENOTSUP, "the freebsd runtime cannot run PTY processes yet")
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        try:
            process = await asyncio.create_subprocess_exec(
                *exec_command(self.sandbox_id, spec),
                stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            for fd in (stdin_w, stdout_r, stderr_r):
                os.close(fd)
            raise ExecError(e.errno or errno.EIO, f"jexec: {e.strerror}") from e
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        return FreeBSDProcess(self, process, stdin_w, stdout_r, stderr_r)

    async def signal(self, pid: int, signum: int) -> None:
        code, _, _ = await self._runtime.run(signal_command(self.sandbox_id, pid, signum))
        if code != 0:
            raise ProcessNotFound(f"no process {pid} in jail {self.sandbox_id}")

    async def freeze(self) -> None:
        await self._pause(resume=False)

    async def thaw(self) -> None:
        await self._pause(resume=True)

    async def _pause(self, *, resume: bool) -> None:
        command = pause_command(self.sandbox_id, resume)
        code, _, err = await self._runtime.run(command)
        if code not in (0, 1):  # 1: no process matched, nothing to pause
            raise JailError(f"{' '.join(command)}: {err.strip()}")

    async def stats(self) -> JailStats:
        return parse_stats(await self._runtime.check(stats_command(self.sandbox_id)), self._limits)

    def is_alive(self) -> bool:
        return _jail_getid(jail_name(self.sandbox_id)) == int(self.handle)

    async def stop(self) -> None:
        await self._runtime.destroy_leftover(self.sandbox_id)


class FreeBSDProcess(JailProcess):
    """jexec execs into the process: the host pid is the process (and its in-jail pid)."""

    def __init__(
        self,
        jail: FreeBSDJail,
        process: asyncio.subprocess.Process,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int,
    ) -> None:
        self.pid = process.pid
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.pty_fd = None
        self._jail = jail
        self._process = process

    async def wait(self) -> ExitStatus:
        code = await self._process.wait()
        return ExitStatus(code, -code if code < 0 else None)

    async def signal(self, signum: int) -> None:
        if self._process.returncode is not None:
            raise ProcessNotFound(f"process {self.pid} has exited")
        self._process.send_signal(signal.Signals(signum))


def _jail_getid(name: str) -> int:
    """jail_getid(3) from libjail: the jid of a named jail, or -1. (is_alive is sync: no jls.)"""
    path = ctypes.util.find_library("jail")
    if path is None:
        raise JailError("libjail not found: not a FreeBSD host")
    libjail = ctypes.CDLL(path)
    libjail.jail_getid.argtypes = [ctypes.c_char_p]
    libjail.jail_getid.restype = ctypes.c_int
    return int(libjail.jail_getid(name.encode()))
