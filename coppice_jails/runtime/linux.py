"""Linux jails: mount/pid/uts/ipc namespaces, the sandbox root as their only root, cgroup limits.

Each jail's PID 1 is `coppice-init` (coppice_init.c, compiled on first use into
`<data_dir>/libexec/`). It confines itself to the sandbox's cgroups, makes the namespaces, mounts
/proc, /dev, /dev/pts and /tmp, reaps every process and starts processes on request over a unix
socket `<data_dir>/run/<sandbox id>.sock` (the protocol is described at the top of the C file).
Jails do not depend on the service process: after a restart `attach()` finds them again by the
handle "<host pid of init>:<its start time>", which a reused pid can never match. A jail belongs
to the runtime whose run directory holds its socket path (see `_prepare`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coppice_jails.confined import ConfinedRoot
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
    WorkdirError,
)
from coppice_jails.runtime.cgroups import CgroupLayout, SandboxCgroups
from coppice_jails.runtime.netns import Netns, NetnsPool

INIT_SOURCE = Path(__file__).with_name("coppice_init.c")
START_TIMEOUT_SECONDS = 30.0
# Well below the smallest default unix socket send buffer, so one packet always fits.
MAX_REQUEST_BYTES = 128 * 1024
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), including the NUL
_SANDBOX_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

# Wire format shared with coppice_init.c (native byte order: both ends are on this host).
_OP_EXEC, _OP_SIGNAL = 1, 2
_REPLY_STARTED, _REPLY_FAILED, _REPLY_EXITED, _REPLY_SIGNALLED, _REPLY_NO_WORKDIR = 1, 2, 3, 4, 5
_EXEC_REQUEST = struct.Struct("=6I2H")  # op uid gid ngroups argc envc rows cols
_SIGNAL_REQUEST = struct.Struct("=Iii")  # op pid signo
_REPLY = struct.Struct("=Iii")  # kind pid value (errno or wait status) + optional text
_FD = array.array("i").itemsize


def check_sandbox_id(sandbox_id: str) -> None:
    """Sandbox ids become path components and cgroup names: nothing else gets through."""
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise JailError(f"invalid sandbox id {sandbox_id!r}")


class LinuxRuntime(Runtime):
    name = "linux"

    def __init__(self, data_dir: Path, *, network: bool = False) -> None:
        """With `network`, each jail gets its own network namespace (netns.py); without, jails
        share the host's network."""
        self.data_dir = data_dir
        self.run_dir = data_dir / "run"
        self.networks = NetnsPool(self.run_dir) if network else None
        self._init_lock = asyncio.Lock()
        self._init_path: Path | None = None
        self._layout: CgroupLayout | None = None

    async def start(self, sandbox_id: str, root: Path, limits: Limits) -> LinuxJail:
        check_sandbox_id(sandbox_id)
        init = await self._init_binary()
        cgroups = (await self._cgroup_layout()).sandbox(sandbox_id)
        socket_path = self._socket_path(sandbox_id)
        root = await asyncio.to_thread(root.resolve)
        await asyncio.to_thread(self._prepare, cgroups, socket_path, limits)
        networks, netns = self.networks, None
        try:
            argv = [str(init)]
            if networks is not None:
                netns = await networks.acquire()
                argv += ["--netns", str(netns.path)]
            argv += [str(root), sandbox_id, str(socket_path)]
            argv += [str(p) for p in cgroups.procs_files]
            # In a thread: nothing forks on the event loop, and no child watcher is involved.
            init_process = await asyncio.to_thread(_run_init, argv)
        except BaseException:
            await asyncio.shield(self._undo_start(cgroups, socket_path, netns))
            raise
        address = None
        if networks is not None and netns is not None:
            await asyncio.shield(networks.entered(netns))
            address = netns.jail_address
        return LinuxJail(sandbox_id, root, init_process, cgroups, socket_path, address)

    async def _undo_start(
        self, cgroups: SandboxCgroups, socket_path: Path, netns: Netns | None
    ) -> None:
        await asyncio.to_thread(_teardown, None, cgroups, socket_path)
        if netns is not None and self.networks is not None:
            await self.networks.discard(netns)

    async def close(self) -> None:
        """Release what is kept ready for jails to come (running jails are left alone)."""
        if self.networks is not None:
            await self.networks.close()

    def _prepare(self, cgroups: SandboxCgroups, socket_path: Path, limits: Limits) -> None:
        # The socket path is claimed first (init replaces the placeholder with the socket) and
        # released last: it marks the jail as this runtime's from before its first cgroup until
        # after its last, so a crash at any point leaves something that list_jails() finds, and
        # jails of another Coppice (another data dir) are never listed or destroyed by this one.
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(socket_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise JailError(f"a jail {cgroups.sandbox_id} exists already") from None
        try:
            if cgroups.exists():
                raise JailError(f"cgroups of another jail {cgroups.sandbox_id} exist")
            try:
                cgroups.create(limits)
            except BaseException:
                cgroups.remove()
                raise
        except BaseException:
            socket_path.unlink()
            raise

    async def attach(self, sandbox_id: str, root: Path, handle: str) -> LinuxJail | None:
        check_sandbox_id(sandbox_id)
        # "pid:start time", and ":address" for a jail with a network of its own
        pid_text, _, rest = handle.partition(":")
        start_text, _, address = rest.partition(":")
        try:
            pid, start_time = int(pid_text), int(start_text)
        except ValueError:
            raise JailError(f"not a linux jail handle: {handle!r}") from None
        cgroups = (await self._cgroup_layout()).sandbox(sandbox_id)
        socket_path = self._socket_path(sandbox_id)

        def find() -> _InitProcess | None:
            init = _InitProcess.of_pid(pid)
            alive = init is not None and init.start_time == start_time
            return init if alive and socket_path.is_socket() and cgroups.exists() else None

        init = await asyncio.to_thread(find)
        if init is None:
            return None
        return LinuxJail(sandbox_id, root, init, cgroups, socket_path, address or None)

    async def list_jails(self) -> list[str]:
        def scan() -> list[str]:
            if not self.run_dir.is_dir():
                return []
            return sorted(p.stem for p in self.run_dir.glob("*.sock"))

        return await asyncio.to_thread(scan)

    async def destroy_leftover(self, sandbox_id: str) -> None:
        check_sandbox_id(sandbox_id)
        cgroups = (await self._cgroup_layout()).sandbox(sandbox_id)
        await asyncio.to_thread(_teardown, None, cgroups, self._socket_path(sandbox_id))

    def _socket_path(self, sandbox_id: str) -> Path:
        path = self.run_dir / f"{sandbox_id}.sock"
        if len(os.fsencode(path)) >= _SUN_PATH_MAX:
            raise JailError(f"unix socket path too long, use a shorter data dir: {path}")
        return path

    async def _cgroup_layout(self) -> CgroupLayout:
        if self._layout is None:
            self._layout = await asyncio.to_thread(CgroupLayout.detect)
        return self._layout

    async def _init_binary(self) -> Path:
        """coppice-init for the current source, compiled once per source version."""
        async with self._init_lock:
            if self._init_path is None:
                self._init_path = await asyncio.to_thread(_build_init, self.data_dir / "libexec")
            return self._init_path


def _build_init(libexec: Path) -> Path:
    source = INIT_SOURCE.read_bytes()
    binary = libexec / f"coppice-init-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary
    libexec.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f".{binary.name}.{uuid.uuid4().hex}")
    # Static: nothing to load at each jail start, and a smaller resident size per idle jail.
    result = subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-static", "-o", str(partial), str(INIT_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise JailError(f"cannot compile {INIT_SOURCE.name}: {result.stderr.strip()}")
    partial.rename(binary)  # atomic: a concurrent builder's result is identical
    return binary


def _run_init(argv: list[str]) -> _InitProcess:
    """Start coppice-init; it returns once the jail is ready, printing the jail's host pid."""
    try:
        started = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=START_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise JailError(f"jail {argv[2]} did not start within {START_TIMEOUT_SECONDS} s") from None
    if started.returncode != 0:
        raise JailError(f"jail {argv[2]} did not start: {started.stderr.decode().strip()}")
    init = _InitProcess.of_pid(int(started.stdout))
    if init is None:
        raise JailError(f"jail {argv[2]} died right after starting")
    return init


@dataclass(frozen=True)
class _InitProcess:
    """The host pid of a jail's init and its start time (clock ticks after boot)."""

    pid: int
    start_time: int

    @classmethod
    def of_pid(cls, pid: int) -> _InitProcess | None:
        """The live (not zombie) process `pid`, or None."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        # Fields after the command name, which is in parentheses and may contain anything.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            return None
        return cls(pid, int(fields[19]))

    def is_alive(self) -> bool:
        return _InitProcess.of_pid(self.pid) == self

    def kill(self) -> None:
        # Checked right before, so a reused pid is not killed. (A pidfd would close the small
        # remaining window, but the jail's cgroups are emptied right after anyway.)
        if self.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _teardown(init: _InitProcess | None, cgroups: SandboxCgroups, socket_path: Path) -> None:
    """Kill a jail's processes (killing init ends its pid namespace), remove cgroups and socket."""
    if init is not None:
        init.kill()
    cgroups.kill_all()
    cgroups.remove()
    socket_path.unlink(missing_ok=True)


class LinuxJail(Jail):
    def __init__(
        self,
        sandbox_id: str,
        root: Path,
        init: _InitProcess,
        cgroups: SandboxCgroups,
        socket_path: Path,
        address: str | None = None,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.root = root
        self.init_pid = init.pid
        self.handle = f"{init.pid}:{init.start_time}"
        if address is not None:  # its own network namespace; else the host's loopback
            self.address = address
            self.handle += f":{address}"
        self._init = init
        self._cgroups = cgroups
        self._socket_path = socket_path
        self._init_pidfd: int | None = None  # opened on first use, see open_root

    def _gone(self) -> OSError:
        return OSError(errno.ESRCH, f"jail {self.sandbox_id} is not running")

    def _pidfd(self) -> int:
        """A pidfd of init: it names that very process, never one that reuses its pid."""
        if self._init_pidfd is None:
            try:
                pidfd = os.pidfd_open(self._init.pid)
            except OSError:
                raise self._gone() from None
            if not self._init.is_alive():  # checked after opening: the pid was not reused
                os.close(pidfd)
                raise self._gone()
            self._init_pidfd = pidfd
            weakref.finalize(self, os.close, pidfd)
        return self._init_pidfd

    async def exec(self, spec: ExecSpec) -> LinuxProcess:
        request = _encode_exec(spec)
        ours: list[int] = []  # stdin write end, stdout and stderr read ends
        theirs: list[int] = []  # the other ends, for the process
        if spec.pty is None:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
            stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
            ours = [stdin_w, stdout_r, stderr_r]
            theirs = [stdin_r, stdout_w, stderr_w]
        conn = await self._connect()
        try:
            try:
                await _send(conn, request, theirs)
            finally:
                for fd in theirs:
                    os.close(fd)
            reply, fds = await _receive(conn)
            kind, pid, value = _parse_reply(reply)
            if kind in (_REPLY_FAILED, _REPLY_NO_WORKDIR):
                error = WorkdirError if kind == _REPLY_NO_WORKDIR else ExecError
                raise error(value, reply[_REPLY.size :].decode(errors="replace"))
            if kind != _REPLY_STARTED or len(fds) != (0 if spec.pty is None else 1):
                for fd in fds:
                    os.close(fd)
                raise JailError(f"unexpected reply {kind} from the jail's init")
        except BaseException:
            conn.close()
            for fd in ours:
                os.close(fd)
            raise
        if spec.pty is None:
            return LinuxProcess(
                self, conn, pid, stdin_fd=ours[0], stdout_fd=ours[1], stderr_fd=ours[2], pty_fd=None
            )
        return LinuxProcess(
            self, conn, pid, stdin_fd=None, stdout_fd=None, stderr_fd=None, pty_fd=fds[0]
        )

    async def signal(self, pid: int, signum: int) -> None:
        conn = await self._connect()
        try:
            await _send(conn, _SIGNAL_REQUEST.pack(_OP_SIGNAL, pid, signum), [])
            reply, fds = await _receive(conn)
        finally:
            conn.close()
        for fd in fds:
            os.close(fd)
        kind, _, value = _parse_reply(reply)
        if kind != _REPLY_SIGNALLED:
            raise JailError(reply[_REPLY.size :].decode(errors="replace") or "bad signal reply")
        if value == errno.ESRCH:
            raise ProcessNotFound(f"no process {pid} in jail {self.sandbox_id}")
        if value != 0:
            raise JailError(f"signal {signum} to {pid}: {os.strerror(value)}")

    async def _connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.setblocking(False)
        # A unix connect does not complete later as TCP's does: EAGAIN means init's listen
        # backlog is full right now, and the connect must simply be tried again.
        for attempt in range(_CONNECT_ATTEMPTS):
            try:
                conn.connect(str(self._socket_path))
                return conn
            except BlockingIOError:
                await asyncio.sleep(min(0.001 * 2**attempt, 0.05))
            except OSError as e:
                conn.close()
                raise JailError(f"jail {self.sandbox_id} is not running ({e.strerror})") from e
        conn.close()
        raise JailError(f"jail {self.sandbox_id} is not accepting requests (backlog full)")

    async def freeze(self) -> None:
        await asyncio.to_thread(self._cgroups.freeze)

    async def thaw(self) -> None:
        await asyncio.to_thread(self._cgroups.thaw)

    async def stats(self) -> JailStats:
        return await asyncio.to_thread(self._cgroups.stats)

    def is_alive(self) -> bool:
        return self._init.is_alive()

    def open_root(self) -> ConfinedRoot:
        # init's root is the jail's own mount tree (it pivot_root'ed into it). Checked after
        # opening, through init's pidfd: had init ended and its pid been reused meanwhile, the
        # signal would find no process (a dead init's root cannot be opened at all).
        pidfd = self._pidfd()
        try:
            root = ConfinedRoot(Path(f"/proc/{self._init.pid}/root"), key=str(self.root))
        except OSError:
            raise self._gone() from None
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            root.close()
            raise self._gone() from None
        return root

    async def stop(self) -> None:
        await asyncio.to_thread(_teardown, self._init, self._cgroups, self._socket_path)


class LinuxProcess(JailProcess):
    """A process started by a jail's init, which reports its exit on the starting connection."""

    def __init__(
        self,
        jail: LinuxJail,
        conn: socket.socket,
        pid: int,
        *,
        stdin_fd: int | None,
        stdout_fd: int | None,
        stderr_fd: int | None,
        pty_fd: int | None,
    ) -> None:
        self.pid = pid
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.pty_fd = pty_fd
        self._jail = jail
        self._conn = conn
        self._status: ExitStatus | None = None
        self._wait_lock = asyncio.Lock()

    async def wait(self) -> ExitStatus:
        async with self._wait_lock:
            while self._status is None:
                reply, fds = await _receive(self._conn)
                for fd in fds:
                    os.close(fd)
                if not reply:
                    # init is gone, and with it the pid namespace: the kernel SIGKILLed us all.
                    self._status = ExitStatus(-signal.SIGKILL, signal.SIGKILL)
                    break
                kind, pid, value = _parse_reply(reply)
                if kind == _REPLY_EXITED and pid == self.pid:
                    self._status = _exit_status(value)
            self._conn.close()
            return self._status

    async def signal(self, signum: int) -> None:
        if self._status is not None:
            raise ProcessNotFound(f"process {self.pid} has exited")
        await self._jail.signal(self.pid, signum)


_CONNECT_ATTEMPTS = 200  # about 10 s of backlog-full retries


def _encode_exec(spec: ExecSpec) -> bytes:
    rows, cols = spec.pty or (0, 0)
    if spec.pty is not None and not (0 < rows < 65536 and 0 < cols < 65536):
        raise ExecError(errno.EINVAL, f"bad terminal size {spec.pty}")
    if not spec.argv:
        raise ExecError(errno.EINVAL, "empty argv")
    env = [f"{key}={value}" for key, value in spec.env.items()]
    if any(not key or "=" in key for key in spec.env):
        raise ExecError(errno.EINVAL, "bad environment variable name")
    strings = [spec.cwd, *spec.argv, *env]
    if any("\0" in s for s in strings):
        raise ExecError(errno.EINVAL, "NUL character in argv, env or cwd")
    groups = spec.user.groups or (spec.user.gid,)
    request = b"".join(
        [
            _EXEC_REQUEST.pack(
                _OP_EXEC,
                spec.user.uid,
                spec.user.gid,
                len(groups),
                len(spec.argv),
                len(env),
                rows,
                cols,
            ),
            struct.pack(f"={len(groups)}I", *groups),
            *(s.encode() + b"\0" for s in strings),
        ]
    )
    if len(request) > MAX_REQUEST_BYTES:
        raise ExecError(errno.E2BIG, f"argv and env exceed {MAX_REQUEST_BYTES} bytes")
    return request


def _parse_reply(reply: bytes) -> tuple[int, int, int]:
    if len(reply) < _REPLY.size:
        raise JailError("the jail's init closed the connection")
    kind, pid, value = _REPLY.unpack_from(reply)
    return kind, pid, value


def _exit_status(wait_status: int) -> ExitStatus:
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        return ExitStatus(-signum, signum)
    return ExitStatus(os.WEXITSTATUS(wait_status))


async def _send(conn: socket.socket, data: bytes, fds: Iterable[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    while True:
        try:
            conn.sendmsg([data], ancillary if ancillary[0][2] else [])
            return
        except BlockingIOError:
            await _ready(conn, writable=True)


async def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the fds that came with it (close-on-exec); b"" when the peer closed."""
    while True:
        try:
            data, ancillary, _, _ = conn.recvmsg(
                4096, socket.CMSG_SPACE(3 * _FD), socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            await _ready(conn, writable=False)
            continue
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % _FD]))
        return data, fds


async def _ready(conn: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = conn.fileno()
    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
