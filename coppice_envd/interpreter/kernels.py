"""Jupyter kernels running inside a sandbox's jail, driven from the gateway over ZeroMQ.

The kernel is started with `Jail.exec`, so it runs confined, as the sandbox's user, under the
sandbox's limits. Its connection file (ports on the jail's address, `Jail.address`, and the HMAC
key that signs every message) is written into the sandbox root through `ConfinedRoot`.
The gateway talks to it with jupyter_client's asyncio client; no Jupyter server is involved.

Interrupts are `interrupt_request` messages on the control channel: a signal to whatever wrapper
the runtime uses to enter the jail would not reach the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from coppice_jails.runtime.base import (
    ExecSpec,
    ExitStatus,
    Jail,
    JailError,
    JailProcess,
    ProcessNotFound,
    User,
)
from coppice_jails.runtime.pipes import FdReader

log = logging.getLogger(__name__)

KERNEL_DIR = "/run/coppice"  # in the sandbox: connection files and the bash kernel's source
READY_TIMEOUT = 60.0  # a cold kernel in a jail on a busy machine takes seconds, not minutes
SHUTDOWN_GRACE = 1.0  # after a shutdown_request, before SIGKILL
_LAST_WORDS_SECONDS = 0.05
_PORT_ATTEMPTS = 3
_OUTPUT_TAIL = 4096  # bytes of the kernel's own stdout/stderr kept to explain a failed start
_BASH_KERNEL_FILE = "bash_kernel.py"
_JAVA_KERNEL_FILES = ("java_kernel.py", "CoppiceJShell.java")  # our kernel over jdk.jshell
_RICH_DISPLAY_FILE = "rich_display.py"  # E2B's rich results (`e2b/chart`, `e2b/data`, images)

Message = dict[str, Any]


class KernelStartError(Exception):
    """The kernel could not be started or did not become ready; the message says why."""


class KernelDied(Exception):
    """The kernel process ended while a request was waiting for it."""

    def __init__(self, status: ExitStatus | None, *, stopped: bool = False) -> None:
        self.status = status
        self.stopped = stopped  # by Coppice (restart, delete, replaced after an interrupt)
        if stopped or status is None:
            how = "it was stopped"
        elif status.signal is not None:
            how = f"killed by signal {status.signal}"
        else:
            how = f"exit code {status.exit_code}"
        super().__init__(f"the kernel died ({how})")


@dataclass(frozen=True)
class KernelLanguage:
    """How one language's kernel is launched in the jail."""

    name: str
    # argv before `<connection_flag> <connection file>`
    argv: tuple[str, ...]
    needs_bash_kernel: bool = False
    # payload files the kernel reads at start, put into KERNEL_DIR first (readable by everyone)
    startup_files: tuple[str, ...] = ()
    connection_flag: str = "-f"
    env: tuple[tuple[str, str], ...] = ()  # on top of the context's environment
    # The kernel is installed in a sandbox when one of these paths exists there (a template
    # without it has no default context of this language, and no kernel warmed); empty: always.
    installed_paths: tuple[str, ...] = ()
    # Seconds of quiet awaited after the reply and idle status: a kernel that publishes some
    # output from another task may send it after both (it then carries the parent of whatever
    # request is current, so the next request must not go out before it).
    late_output_grace: float = 0.0


# Colors off and full reprs, as the official code-interpreter template configures IPython.
# No SQLite history: In/Out/%history still work in memory, and each cell skips a database write
# (about a third of a `run_code("x = 1")` on a busy machine) and leaves nothing in the user's home.
_IPYTHON_OPTIONS = (
    "--InteractiveShell.colors=nocolor",
    "--PlainTextFormatter.max_seq_length=0",
    "--HistoryManager.enabled=False",
    "--IPKernelApp.log_level=ERROR",
)
# ipykernel sleeps 0.5 ms before every execute_reply (`_execute_sleep`, a workaround for clients
# that read only the reply; we wait for the idle status, which follows every output on iopub).
_KERNEL_OPTIONS = ("--Kernel._execute_sleep=0",)

# ipykernel imports debugpy (half a second, with a pkg_resources scan) and IPython imports jedi,
# for a debugger and completions the code-interpreter API never uses: hidden while the kernel
# loads (about a third of its start), importable by user code afterwards. As ipykernel_launcher,
# no module of the working directory is imported while loading.
_QUICK_LOAD = (
    "import sys\n"
    "if sys.path[0] == '': del sys.path[0]\n"
    "sys.modules.update(debugpy=None, jedi=None)\n"
    "import ipykernel.ipkernel, ipykernel.kernelapp, IPython.core.completer\n"
    "del sys.modules['debugpy'], sys.modules['jedi']\n"
)
# Before each execute_reply ipykernel flushes stdout and stderr, each a round trip to its IOPub
# thread (and a tussle for the GIL) even when there is nothing to send: skipped when nothing is
# buffered or pending. With `_execute_sleep` gone too, a `run_code("x = 1")` took ~3 ms less
# here. Kernels whose OutStream lacks these attributes keep their own flush.
_QUICK_FLUSH = (
    "import ipykernel.iostream as _iostream\n"
    "def _flush_unless_idle(self, _flush=_iostream.OutStream.flush):\n"
    "    lock = getattr(self, '_buffer_lock', None)\n"
    "    if lock is not None and not getattr(self, '_flush_pending', True):\n"
    "        with lock:\n"
    "            if not self._buffer.tell():\n"
    "                return\n"
    "    _flush(self)\n"
    "_iostream.OutStream.flush = _flush_unless_idle\n"
    "del _iostream, _flush_unless_idle\n"
)
# Where ipykernel lands: Debian's python3-ipykernel, or pip into /usr/local (python and bash).
_IPYKERNEL_PATHS = (
    "/usr/lib/python3/dist-packages/ipykernel",
    "/usr/local/lib/python3.11/dist-packages/ipykernel",
)

LANGUAGES: Mapping[str, KernelLanguage] = {
    "python": KernelLanguage(
        "python",
        (
            "python3",
            "-c",
            f"{_QUICK_LOAD}{_QUICK_FLUSH}ipykernel.kernelapp.launch_new_instance()\n",
            *_IPYTHON_OPTIONS,
            *_KERNEL_OPTIONS,
            # The display formatters and hooks E2B's template sets up with IPython startup files,
            # from us rather than from the template, so no template and no user home need them.
            f"--IPKernelApp.exec_files={KERNEL_DIR}/{_RICH_DISPLAY_FILE}",
        ),
        startup_files=(_RICH_DISPLAY_FILE,),
        installed_paths=_IPYKERNEL_PATHS,
    ),
    "bash": KernelLanguage(
        "bash",
        (
            "python3",
            "-c",
            f"{_QUICK_LOAD}{_QUICK_FLUSH}import runpy\n"
            f"runpy.run_path('{KERNEL_DIR}/{_BASH_KERNEL_FILE}', run_name='__main__')\n",
            "--IPKernelApp.log_level=ERROR",
            *_KERNEL_OPTIONS,
        ),
        needs_bash_kernel=True,
        installed_paths=_IPYKERNEL_PATHS,
    ),
    **{
        # One Deno kernel per context, TypeScript either way (plain JavaScript is TypeScript).
        name: KernelLanguage(
            name,
            ("deno", "jupyter", "--kernel"),
            connection_flag="--conn",
            # Plain text/plain results (Deno.inspect colours them otherwise); no update check
            # over the network at every start.
            env=(("NO_COLOR", "1"), ("DENO_NO_UPDATE_CHECK", "1"), ("DENO_NO_PROMPT", "1")),
            # Deno 2.9 publishes an execute_result now and then just after the idle status.
            late_output_grace=0.03,
            installed_paths=("/usr/local/bin/deno", "/usr/bin/deno"),
        )
        for name in ("javascript", "typescript")
    },
    "r": KernelLanguage(
        "r",
        ("R", "--no-save", "--no-restore", "--slave", "-e", "IRkernel::main()"),
        connection_flag="--args",
        installed_paths=(
            "/usr/lib/R/site-library/IRkernel",
            "/usr/local/lib/R/site-library/IRkernel",
        ),
    ),
    # Our kernel over the JDK's jdk.jshell (payload/java_kernel.py): Debian packages no IJava.
    "java": KernelLanguage(
        "java",
        (
            "python3",
            "-c",
            f"{_QUICK_LOAD}{_QUICK_FLUSH}import runpy\n"
            f"runpy.run_path('{KERNEL_DIR}/{_JAVA_KERNEL_FILES[0]}', run_name='__main__')\n",
            "--IPKernelApp.log_level=ERROR",
            *_KERNEL_OPTIONS,
        ),
        startup_files=_JAVA_KERNEL_FILES,
        installed_paths=(
            "/usr/bin/jshell",
            "/usr/lib/jvm/java-17-openjdk-amd64/bin/jshell",
            "/usr/lib/jvm/java-17-openjdk-arm64/bin/jshell",
        ),
    ),
}


def _free_ports(count: int) -> list[int]:
    """Ports nobody on the host's loopback listens on right now (the kernel binds them moments
    later, as Jupyter does; a jail with a network of its own has all but its user's free)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _connection_info(address: str) -> KernelConnectionInfo:
    shell, iopub, stdin, control, hb = _free_ports(5)
    return {
        "transport": "tcp",
        "ip": address,
        "shell_port": shell,
        "iopub_port": iopub,
        "stdin_port": stdin,
        "control_port": control,
        "hb_port": hb,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }


def _write_in_sandbox(jail: Jail, path: str, data: bytes, user: User) -> None:
    """Write `path` (in KERNEL_DIR) inside the sandbox, readable by `user` only. Blocking."""
    with jail.open_root() as confined:
        parent_fd, name = confined.parent(KERNEL_DIR)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o711, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        fd = confined.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchown(fd, user.uid, user.gid)
            os.fchmod(fd, 0o600)
            os.write(fd, data)
        finally:
            os.close(fd)


def _install_bash_kernel(jail: Jail, user: User) -> None:
    """Copy bash_kernel.py into the sandbox's KERNEL_DIR. Blocking."""
    payload = resources.files("coppice_envd.interpreter.payload")
    source = payload.joinpath(_BASH_KERNEL_FILE).read_bytes()
    _write_in_sandbox(jail, f"{KERNEL_DIR}/{_BASH_KERNEL_FILE}", source, user)


def _install_startup_files(jail: Jail, names: Sequence[str]) -> None:
    """Copy payload files into the sandbox's KERNEL_DIR, root's and readable by every user's
    kernel; each replaced by a rename, so a kernel starting meanwhile reads a whole file. Blocking.
    """
    payload = resources.files("coppice_envd.interpreter.payload")
    with jail.open_root() as confined:
        parent_fd, dir_name = confined.parent(KERNEL_DIR)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(dir_name, 0o711, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        for name in names:
            source = payload.joinpath(name).read_bytes()
            dir_fd, entry = confined.parent(f"{KERNEL_DIR}/{name}")
            tmp = f".{entry}.{secrets.token_hex(8)}"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
                try:
                    os.fchown(fd, 0, 0)
                    os.fchmod(fd, 0o644)
                    os.write(fd, source)
                finally:
                    os.close(fd)
                os.rename(tmp, entry, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            finally:
                os.close(dir_fd)


def installed_languages(jail: Jail) -> list[str]:
    """The LANGUAGES whose kernel the sandbox has, in table order. Blocking."""
    found: list[str] = []
    with jail.open_root() as confined:
        for name, language in LANGUAGES.items():
            for path in language.installed_paths:
                try:
                    os.close(confined.open(path, os.O_PATH))
                except OSError:
                    continue
                found.append(name)
                break
            else:
                if not language.installed_paths:
                    found.append(name)
    return found


def _remove_in_sandbox(jail: Jail, path: str) -> None:
    """Remove `path` from the sandbox if it is there. Blocking."""
    with contextlib.suppress(OSError), jail.open_root() as confined:
        parent_fd, name = confined.parent(path)
        try:
            os.unlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)


class _OutputTail:
    """Drains one of the kernel's pipes, keeping its last bytes for error messages; owns the fd."""

    def __init__(self, fd: int) -> None:
        self.data = b""
        self._fd = fd
        self._ended = asyncio.Event()
        self._reader = FdReader(fd, 65536, self._keep, self.cancel)

    def _keep(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-_OUTPUT_TAIL:]

    async def finished(self) -> str:
        """What was read, once the pipe is at EOF (or after a second at most)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), 1.0)
        return self.data.decode("utf-8", "replace").strip()

    def cancel(self) -> None:
        """Stop reading and close the fd (at EOF, or when the kernel is dropped)."""
        if not self._ended.is_set():
            self._reader.pause()
            os.close(self._fd)
            self._ended.set()


class KernelRun:
    """The messages of one request to the kernel (iopub and shell/control replies, by parent)."""

    def __init__(self, kernel: Kernel, msg_id: str) -> None:
        self._kernel = kernel
        self.msg_id = msg_id
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()

    def deliver(self, msg: Message | None) -> None:
        """A message for this request, or None: the kernel died."""
        self._queue.put_nowait(msg)

    async def next(self) -> Message:
        """The next message; KernelDied if the kernel has ended."""
        msg = await self._queue.get()
        if msg is None:
            self._queue.put_nowait(None)  # every later call sees the death too
            raise KernelDied(self._kernel.exit_status, stopped=self._kernel.stopping)
        return msg

    async def messages(self) -> AsyncIterator[Message]:
        """Every message of an execution, until the kernel is idle again and has replied."""
        replied = idle = aborted = False
        try:
            while not (replied and (idle or aborted)):
                msg = await self.next()
                kind = msg["msg_type"]
                if kind == "status":
                    idle = msg["content"].get("execution_state") == "idle"
                elif kind.endswith("_reply"):
                    replied = True
                    aborted = msg["content"].get("status") in ("aborted", "abort")
                yield msg
            grace = self._kernel.language.late_output_grace
            while grace:
                try:
                    async with asyncio.timeout(grace):
                        msg = await self.next()
                except TimeoutError:
                    break
                yield msg
        finally:
            self.close()

    def close(self) -> None:
        self._kernel._runs.pop(self.msg_id, None)


class Kernel:
    """One live kernel process in a jail and the client connected to it."""

    def __init__(
        self,
        *,
        kernel_id: str,
        language: KernelLanguage,
        jail: Jail,
        process: JailProcess,
        client: AsyncKernelClient,
        connection_path: str,
    ) -> None:
        self.kernel_id = kernel_id
        self.language = language
        self.jail = jail
        self.process = process
        self.client = client
        self.connection_path = connection_path
        self.exit_status: ExitStatus | None = None
        self._runs: dict[str, KernelRun] = {}
        self._ended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._outputs: list[_OutputTail] = []
        self._releasing: asyncio.Task[None] | None = None
        self.stopping = False  # shutdown() or kill() was asked for
        self.on_exit: Callable[[Kernel], None] | None = None  # called once the process ended

    @classmethod
    async def start(
        cls,
        jail: Jail,
        *,
        kernel_id: str,
        language: KernelLanguage,
        user: User,
        cwd: str,
        env: Mapping[str, str],
        zmq_context: zmq.asyncio.Context,
    ) -> Kernel:
        """Start a kernel in `jail` and wait until it answers; KernelStartError if it does not."""
        attempt = 1
        while True:
            try:
                return await cls._start(
                    jail,
                    kernel_id=kernel_id,
                    language=language,
                    user=user,
                    cwd=cwd,
                    env=env,
                    zmq_context=zmq_context,
                )
            except KernelStartError as err:
                # The free ports we picked can be taken before the kernel binds them: pick again.
                if "Address already in use" not in str(err) or attempt == _PORT_ATTEMPTS:
                    raise
                attempt += 1

    @classmethod
    async def _start(
        cls,
        jail: Jail,
        *,
        kernel_id: str,
        language: KernelLanguage,
        user: User,
        cwd: str,
        env: Mapping[str, str],
        zmq_context: zmq.asyncio.Context,
    ) -> Kernel:
        info = _connection_info(jail.address)
        connection_path = f"{KERNEL_DIR}/kernel-{kernel_id}.json"
        try:
            await asyncio.to_thread(
                _write_in_sandbox, jail, connection_path, json.dumps(info).encode(), user
            )
            if language.needs_bash_kernel:
                await asyncio.to_thread(_install_bash_kernel, jail, user)
            if language.startup_files:
                await asyncio.to_thread(_install_startup_files, jail, language.startup_files)
        except OSError as err:
            raise KernelStartError(f"cannot prepare the {language.name} kernel: {err}") from err
        argv: Sequence[str] = [*language.argv, language.connection_flag, connection_path]
        spec = ExecSpec(argv=argv, user=user, cwd=cwd, env={**env, **dict(language.env)})
        try:
            process = await jail.exec(spec)
        except JailError as err:  # ExecError, or the jail is gone
            await asyncio.to_thread(_remove_in_sandbox, jail, connection_path)
            raise KernelStartError(f"cannot start the {language.name} kernel: {err}") from err
        client = AsyncKernelClient(context=zmq_context)
        client.load_connection_info(info)
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        kernel = cls(
            kernel_id=kernel_id,
            language=language,
            jail=jail,
            process=process,
            client=client,
            connection_path=connection_path,
        )
        kernel._watch()
        try:
            await kernel._wait_ready()
        except (KernelDied, TimeoutError) as err:
            output = await kernel._output()
            await kernel.kill()
            reason = output or ("no answer" if isinstance(err, TimeoutError) else str(err))
            raise KernelStartError(f"the {language.name} kernel did not start: {reason}") from err
        except BaseException:
            await kernel.kill()
            raise
        return kernel

    def _watch(self) -> None:
        if self.process.stdin_fd is not None:
            os.close(self.process.stdin_fd)
        for fd in (self.process.stdout_fd, self.process.stderr_fd):
            if fd is not None:
                self._outputs.append(_OutputTail(fd))
        self._tasks = [
            asyncio.create_task(self._pump(self.client.iopub_channel)),
            asyncio.create_task(self._pump(self.client.shell_channel)),
            asyncio.create_task(self._pump(self.client.control_channel)),
            asyncio.create_task(self._wait_exit()),
        ]

    async def _output(self) -> str:
        return "\n".join([text for tail in self._outputs if (text := await tail.finished())])

    async def _pump(self, channel: Any) -> None:
        while True:
            msg: Message = await channel.get_msg()
            run = self._runs.get(msg.get("parent_header", {}).get("msg_id", ""))
            if run is not None:
                run.deliver(msg)

    async def _wait_exit(self) -> None:
        try:
            self.exit_status = await self.process.wait()
            # Let what the kernel sent just before it died reach its requests first.
            await asyncio.sleep(_LAST_WORDS_SECONDS)
        finally:
            self._ended.set()
            for run in self._runs.values():
                run.deliver(None)
        if self.on_exit is not None:
            self.on_exit(self)
        await self._release()

    @property
    def alive(self) -> bool:
        return not self._ended.is_set()

    def _send(self, channel: Any, msg_type: str, content: Message) -> KernelRun:
        if not self.alive:
            raise KernelDied(self.exit_status, stopped=self.stopping)
        msg = self.client.session.msg(msg_type, content)
        run = KernelRun(self, msg["header"]["msg_id"])
        self._runs[run.msg_id] = run
        channel.send(msg)
        return run

    def execute(self, code: str, *, silent: bool = False) -> KernelRun:
        """Send an execute_request; iterate the returned run's `messages()` for its output."""
        return self._send(
            self.client.shell_channel,
            "execute_request",
            {
                "code": code,
                "silent": silent,
                "store_history": not silent,
                "user_expressions": {},
                "allow_stdin": False,
                # Calls queue here, never in the kernel; with stop_on_error an error's
                # abort window could swallow the next call.
                "stop_on_error": False,
            },
        )

    async def interrupt(self) -> None:
        """Ask the kernel to interrupt what it runs (KeyboardInterrupt in Python)."""
        with contextlib.suppress(KernelDied):
            self._send(self.client.control_channel, "interrupt_request", {}).close()

    async def _wait_ready(self) -> None:
        """Until the kernel answers on shell and its iopub messages reach us."""
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                run = self._send(self.client.shell_channel, "kernel_info_request", {})
                heard_iopub = False
                try:
                    while True:
                        msg = await run.next()
                        if msg["msg_type"] == "status":
                            heard_iopub = True
                        elif msg["msg_type"] == "kernel_info_reply":
                            break
                    # The busy status is published before the reply; give iopub a moment.
                    if not heard_iopub:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.05):
                                while not heard_iopub:
                                    heard_iopub = (await run.next())["msg_type"] == "status"
                finally:
                    run.close()
                if heard_iopub:
                    return

    async def shutdown(self) -> None:
        """Ask the kernel to exit; kill it if it does not within SHUTDOWN_GRACE."""
        self.stopping = True
        if self.alive:
            with contextlib.suppress(KernelDied):
                self._send(
                    self.client.control_channel, "shutdown_request", {"restart": False}
                ).close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), SHUTDOWN_GRACE)
        await self.kill()

    async def kill(self) -> None:
        """Kill the kernel process (if it runs) and release everything it held."""
        self.stopping = True
        if self.alive:
            with contextlib.suppress(ProcessNotFound, ProcessLookupError):
                await self.process.signal(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), 5.0)
        await self._release()

    async def _release(self) -> None:
        """Close the client and remove the connection file (once; every caller waits for it)."""
        if self._releasing is None:
            self._releasing = asyncio.create_task(self._close())
        await asyncio.shield(self._releasing)

    async def _close(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for tail in self._outputs:
            tail.cancel()
        self.client.stop_channels()
        await asyncio.to_thread(_remove_in_sandbox, self.jail, self.connection_path)
