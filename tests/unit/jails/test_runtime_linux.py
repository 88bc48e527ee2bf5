"""The Linux jail runtime, for real: namespaces, pivot_root, cgroups and coppice-init as PID 1."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from fixtures import REPO

from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import (
    ExecError,
    ExecSpec,
    ExitStatus,
    JailError,
    JailProcess,
    Limits,
    ProcessNotFound,
    User,
    WorkdirError,
)
from coppice_jails.runtime.cgroups import CgroupLayout
from coppice_jails.runtime.linux import LinuxJail, LinuxRuntime
from coppice_jails.testing import built_template_root
from coppice_jails.users import lookup_user

ROOT_USER = User("root", 0, 0, "/root", (0,))
NOBODY = User("nobody", 65534, 65534, "/nonexistent", (65534,))
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# Generous bound so a broken jail fails the test instead of hanging it; never a speed check.
HANG = 60.0

# -- Sandbox roots: the one place to swap in the real template builder --------------------------

MakeRoot = Callable[[], Path]


@pytest.fixture
def make_root(tmp_path: Path) -> Iterator[MakeRoot]:
    """Writable copy-on-write sandbox roots: overlayfs on the built base template, unmounted
    afterwards."""
    base_root = built_template_root("base")
    mounted: list[Path] = []

    def make() -> Path:
        base = tmp_path / f"root{len(mounted)}"
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        options = f"lowerdir={base_root},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, merged], check=True)
        mounted.append(merged)
        return merged

    yield make
    for merged in mounted:
        subprocess.run(["umount", "--lazy", merged], check=True)


# -- Runtime and cleanup --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One per session: coppice-init is compiled once into data_dir/libexec.
    return tmp_path_factory.mktemp("coppice-data")


@pytest.fixture
async def runtime(data_dir: Path, make_root: MakeRoot) -> AsyncIterator[LinuxRuntime]:
    # Depends on make_root so that jails are destroyed before their roots are unmounted.
    rt = LinuxRuntime(data_dir)
    yield rt
    for sandbox_id in await rt.list_jails():
        if sandbox_id.startswith(_test_prefix):
            await rt.destroy_leftover(sandbox_id)


_test_prefix = f"t{os.getpid()}x"


def new_id() -> str:
    return f"{_test_prefix}{uuid.uuid4().hex[:16]}"


@pytest.fixture
async def jail(runtime: LinuxRuntime, make_root: MakeRoot) -> LinuxJail:
    return await runtime.start(new_id(), make_root(), Limits())


# -- Helpers --------------------------------------------------------------------------------------
async def pipe_reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A reader on the event loop for a pipe or PTY master; closing the transport closes fd."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def read_all(fd: int) -> bytes:
    """Everything read from a pipe or PTY master until EOF; closes the fd."""
    reader, transport = await pipe_reader(fd)
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except OSError as e:  # a PTY master reads EIO once the terminal is gone
        if e.errno != errno.EIO:
            raise
    finally:
        transport.close()
    return b"".join(chunks)


async def run(
    jail: LinuxJail,
    argv: list[str],
    *,
    user: User = ROOT_USER,
    cwd: str = "/",
    stdin: bytes = b"",
) -> tuple[ExitStatus, str, str]:
    process = await jail.exec(ExecSpec(argv, user, cwd, ENV))
    assert process.stdin_fd is not None
    assert process.stdout_fd is not None
    assert process.stderr_fd is not None
    os.write(process.stdin_fd, stdin)  # small: fits the pipe buffer
    os.close(process.stdin_fd)
    out, err, status = await asyncio.wait_for(
        asyncio.gather(read_all(process.stdout_fd), read_all(process.stderr_fd), process.wait()),
        HANG,
    )
    return status, out.decode(), err.decode()


async def sh(jail: LinuxJail, script: str, *, user: User = ROOT_USER, cwd: str = "/") -> str:
    status, out, err = await run(jail, ["sh", "-c", script], user=user, cwd=cwd)
    assert status == ExitStatus(0), err
    return out


def cgroup_dirs(sandbox_id: str) -> list[Path]:
    return CgroupLayout.detect().sandbox(sandbox_id).dirs


def processes_rooted_at(root: Path) -> list[int]:
    """Host pids of every process whose root directory is `root`."""
    wanted = os.stat(root)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.path.samestat(os.stat(entry / "root"), wanted):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def python_subprocess(script: str, *args: str) -> asyncio.subprocess.Process:
    """A separate Python process (a stand-in for the service), run from the repository."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(script),
        *args,
        cwd=REPO,
        stdout=subprocess.PIPE,
    )


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(HANG):
        while not await asyncio.to_thread(condition):  # noqa: ASYNC110 - polling a file
            await asyncio.sleep(0.01)


# -- Isolation ------------------------------------------------------------------------------------
async def test_ps_shows_only_the_jails_processes(jail: LinuxJail) -> None:
    status, out, _ = await run(jail, ["ps", "-e", "-o", "pid=,comm="])
    assert status == ExitStatus(0)
    (init_pid, init_name), (_, ps_name) = (line.split() for line in out.strip().splitlines())
    assert (init_pid, ps_name) == ("1", "ps")
    assert init_name.startswith("coppice-init")


async def test_hostname_is_the_sandbox_id(jail: LinuxJail) -> None:
    assert (await sh(jail, "hostname")).strip() == jail.sandbox_id


async def test_runs_as_the_sandbox_user_in_its_home(jail: LinuxJail) -> None:
    def resolve() -> User:
        with ConfinedRoot(jail.root) as root:
            return lookup_user(root, "user")

    user = await asyncio.to_thread(resolve)
    assert (user.uid, user.home) == (1000, "/home/user")
    out = await sh(jail, "id -u; id -g; pwd; touch mine; stat -c %U mine", user=user, cwd=user.home)
    assert out.split() == ["1000", "1000", "/home/user", "user"]


async def test_root_is_the_sandbox_root(jail: LinuxJail) -> None:
    assert (await sh(jail, "readlink /proc/self/root")).strip() == "/"
    # Seen from the host, the jail's root directory is the sandbox root.
    assert await asyncio.to_thread(os.path.samefile, f"/proc/{jail.init_pid}/root", jail.root)
    await sh(jail, "echo inside > /written-in-jail")
    assert (jail.root / "written-in-jail").read_text() == "inside\n"
    # The jail's /dev is its own, not the sandbox tree's nor the host's; /tmp is the tree's.
    out = await sh(jail, "ls /dev/pts; echo > /tmp/in-tmp && ls /tmp")
    assert out.split() == ["ptmx", "in-tmp"]
    assert (jail.root / "tmp" / "in-tmp").exists()
    assert not (jail.root / "dev" / "pts" / "ptmx").exists()


async def test_open_root_sees_the_jail_s_mounts_and_fails_once_it_is_gone(
    jail: LinuxJail,
) -> None:
    await sh(jail, "echo shared > /dev/shm/in-shm")
    with await asyncio.to_thread(jail.open_root) as root:
        assert root.key == str(jail.root)
        assert root.read_bytes("/dev/shm/in-shm") == b"shared\n"
        assert root.read_bytes("/proc/1/comm").startswith(b"coppice-init")
        assert root.resolve("/proc/../dev/../tmp") == "/tmp"
        with pytest.raises(OSError, match="symbolic links") as magic:
            root.open("/proc/1/root/etc/hostname")  # magic links stay shut
        assert magic.value.errno == errno.ELOOP
    assert not (jail.root / "dev" / "shm" / "in-shm").exists()
    await jail.stop()
    with pytest.raises(OSError, match="is not running") as gone:
        await asyncio.to_thread(jail.open_root)
    assert gone.value.errno == errno.ESRCH


ESCAPE_ATTEMPTS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def mount():
    if libc.mount(b"t", b"/mnt", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
def attempt(name, action):
    try:
        action()
        print(name, "succeeded")
    except OSError as e:
        print(name, "refused", e.errno)
attempt("chroot", lambda: (os.mkdir("/escape"), os.chroot("/escape")))
attempt("mknod", lambda: os.mknod("/tmp/disk", 0o600 | 0o60000, os.makedev(8, 0)))
attempt("core_pattern", lambda: open("/proc/sys/kernel/core_pattern", "w").write("|/x"))
attempt("mount", mount)
"""


async def test_root_in_the_jail_cannot_get_out(jail: LinuxJail) -> None:
    """No user namespace, so root is real root: the ways out of a jail must all be closed."""
    status, out, err = await run(jail, ["python3", "-c", ESCAPE_ATTEMPTS])
    assert status == ExitStatus(0), err
    assert out.splitlines() == [
        f"chroot refused {errno.EPERM}",
        f"mknod refused {errno.EPERM}",
        f"core_pattern refused {errno.EROFS}",
        f"mount refused {errno.EPERM}",
    ]
    # Host paths (data dir, sandbox root, cgroups) do not show in init's command line.
    assert (await sh(jail, "cat /proc/1/cmdline")).rstrip("\0") == "coppice-init"
    # Root still runs as root for ordinary work: owning files, switching users.
    assert await sh(jail, "touch /f && chown 1000:1000 /f && stat -c %u /f") == "1000\n"
    assert await sh(jail, "su -s /bin/sh -c 'id -u' user") == "1000\n"


async def test_the_jail_holds_no_other_mounts(runtime: LinuxRuntime, make_root: MakeRoot) -> None:
    """Host mounts (another sandbox's root here) are not kept alive by a jail's namespace."""
    other_root = make_root()
    jail = await runtime.start(new_id(), make_root(), Limits())
    # A process that only joins the jail's mount namespace sees all of it from the namespace's
    # root (the jail's /proc would not show a host pid, so read its mountinfo from the host).
    namespace = f"/proc/{jail.init_pid}/ns/mnt"
    visitor = await asyncio.create_subprocess_exec("nsenter", f"--mount={namespace}", "sleep", "99")
    visitor_namespace = f"/proc/{visitor.pid}/ns/mnt"
    try:
        await wait_until(lambda: os.readlink(visitor_namespace) == os.readlink(namespace))
        mountinfo = await asyncio.to_thread(Path(f"/proc/{visitor.pid}/mountinfo").read_text)
    finally:
        visitor.kill()
        await visitor.wait()
    mount_points = sorted(line.split()[4] for line in mountinfo.splitlines())
    assert mount_points == [
        "/", "/dev", "/dev/pts", "/dev/shm", "/proc", "/proc/bus", "/proc/fs", "/proc/irq",
        "/proc/sys",
    ]  # fmt: skip
    assert str(other_root) not in mountinfo


async def test_pty_process_sees_a_terminal(jail: LinuxJail) -> None:
    process = await jail.exec(
        ExecSpec(["sh", "-c", "tty; stty size"], ROOT_USER, "/", ENV, (33, 111))
    )
    assert process.pty_fd is not None
    assert (process.stdin_fd, process.stdout_fd, process.stderr_fd) == (None, None, None)
    out, status = await asyncio.wait_for(
        asyncio.gather(read_all(process.pty_fd), process.wait()), HANG
    )
    assert status == ExitStatus(0)
    assert out.decode().split() == ["/dev/pts/0", "33", "111"]


async def test_concurrent_execs(jail: LinuxJail) -> None:
    results = await asyncio.gather(*(sh(jail, f"echo {i}") for i in range(20)))
    assert results == [f"{i}\n" for i in range(20)]


async def test_a_burst_of_execs_loses_none(jail: LinuxJail) -> None:
    """More execs than init's listen backlog holds, while init cannot accept (frozen): the
    connects beyond the backlog are retried, none is lost."""
    await jail.freeze()
    burst = [asyncio.create_task(run(jail, ["true"])) for _ in range(300)]
    await asyncio.sleep(0.5)
    await jail.thaw()
    results = await asyncio.gather(*burst)
    assert [status for status, _, _ in results] == [ExitStatus(0)] * 300


# -- Exec results and errors ----------------------------------------------------------------------
async def test_stdin_stdout_stderr_are_separate(jail: LinuxJail) -> None:
    status, out, err = await run(jail, ["sh", "-c", "cat; echo oops >&2; exit 3"], stdin=b"hello")
    assert (status, out, err) == (ExitStatus(3), "hello", "oops\n")


async def test_exec_failures_are_errors_not_processes(jail: LinuxJail) -> None:
    with pytest.raises(ExecError) as missing:
        await jail.exec(ExecSpec(["no-such-program"], ROOT_USER, "/", ENV))
    assert missing.value.errno == errno.ENOENT
    assert not isinstance(missing.value, WorkdirError)
    with pytest.raises(WorkdirError) as bad_cwd:
        await jail.exec(ExecSpec(["true"], ROOT_USER, "/no/such/dir", ENV))
    assert bad_cwd.value.errno == errno.ENOENT
    await sh(jail, "mkdir -p /root/private && chmod 700 /root")
    with pytest.raises(WorkdirError) as not_for_user:  # checked as the process's own user
        await jail.exec(ExecSpec(["true"], NOBODY, "/root/private", ENV))
    assert not_for_user.value.errno == errno.EACCES
    await sh(jail, "echo > /not-executable")
    with pytest.raises(ExecError) as denied:
        await jail.exec(ExecSpec(["/not-executable"], ROOT_USER, "/", ENV))
    assert denied.value.errno == errno.EACCES
    # The host's binaries are not reachable either: PATH is searched inside the jail.
    with pytest.raises(ExecError):
        await jail.exec(ExecSpec([sys.executable], ROOT_USER, "/", ENV))
    assert (await sh(jail, "echo still fine")) == "still fine\n"


@pytest.mark.parametrize(
    ("argv", "env", "pty"),
    [
        ([], ENV, None),
        (["echo", "a\0b"], ENV, None),
        (["true"], {"A=B": "c"}, None),
        (["true"], ENV, (0, 80)),
        (["x" * 200_000], ENV, None),
    ],
)
async def test_bad_exec_requests_are_refused(
    jail: LinuxJail, argv: list[str], env: dict[str, str], pty: tuple[int, int] | None
) -> None:
    with pytest.raises(ExecError):
        await jail.exec(ExecSpec(argv, ROOT_USER, "/", env, pty))
    assert await sh(jail, "echo fine") == "fine\n"


async def test_exit_by_signal_is_reported(jail: LinuxJail) -> None:
    process = await jail.exec(ExecSpec(["sleep", "1000"], ROOT_USER, "/", ENV))
    await process.signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), HANG) == ExitStatus(-15, signal.SIGTERM)
    for fd in (process.stdin_fd, process.stdout_fd, process.stderr_fd):
        assert fd is not None
        os.close(fd)
    status, _, _ = await run(jail, ["sh", "-c", "kill -KILL $$"])
    assert status == ExitStatus(-9, signal.SIGKILL)
    assert not status.exited


async def test_signal_to_unknown_pid_is_not_found(jail: LinuxJail) -> None:
    with pytest.raises(ProcessNotFound):
        await jail.signal(4_000_000, signal.SIGTERM)
    with pytest.raises(ProcessNotFound):
        await jail.signal(1, signal.SIGKILL)  # init is not a target
    process = await jail.exec(ExecSpec(["true"], ROOT_USER, "/", ENV))
    for fd in (process.stdin_fd, process.stdout_fd, process.stderr_fd):
        assert fd is not None
        os.close(fd)
    await process.wait()
    with pytest.raises(ProcessNotFound):
        await process.signal(signal.SIGTERM)
    assert jail.is_alive()


# -- Limits ---------------------------------------------------------------------------------------
FORK_UNTIL_REFUSED = """
import os, time
forked = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
        forked += 1
except OSError as e:
    print(forked, e.errno, flush=True)
time.sleep(1000)
"""


async def test_fork_bomb_hits_pids_limit_while_another_sandbox_works(
    runtime: LinuxRuntime, make_root: MakeRoot
) -> None:
    bombed = await runtime.start(new_id(), make_root(), Limits(pids=32))
    other = await runtime.start(new_id(), make_root(), Limits(pids=32))
    process = await bombed.exec(
        ExecSpec(["python3", "-c", FORK_UNTIL_REFUSED], ROOT_USER, "/", ENV)
    )
    assert process.stdout_fd is not None
    stdin_fd, stderr_fd = process.stdin_fd, process.stderr_fd
    assert stdin_fd is not None
    assert stderr_fd is not None
    os.close(stdin_fd)
    os.close(stderr_fd)
    # The forked sleepers keep stdout open: read the one line, not until EOF.
    reader, transport = await pipe_reader(process.stdout_fd)
    line = await asyncio.wait_for(reader.readline(), HANG)
    transport.close()
    forked, err = (int(x) for x in line.split())
    assert err == errno.EAGAIN
    assert forked < 32
    assert (await bombed.stats()).pids == 32
    with pytest.raises(ExecError) as refused:  # init cannot fork either
        await bombed.exec(ExecSpec(["true"], ROOT_USER, "/", ENV))
    assert refused.value.errno == errno.EAGAIN
    assert await sh(other, "echo unaffected") == "unaffected\n"
    await bombed.stop()
    assert await asyncio.wait_for(process.wait(), HANG) == ExitStatus(-9, signal.SIGKILL)


async def test_shell_fork_bomb_is_contained_and_stopped(
    runtime: LinuxRuntime, make_root: MakeRoot
) -> None:
    bombed = await runtime.start(new_id(), make_root(), Limits(pids=64))
    other = await runtime.start(new_id(), make_root(), Limits())
    bomb = await bombed.exec(ExecSpec(["bash", "-c", "b() { b | b & }; b"], ROOT_USER, "/", ENV))
    for fd in (bomb.stdin_fd, bomb.stdout_fd, bomb.stderr_fd):
        assert fd is not None
        os.close(fd)

    async def at_limit() -> None:
        while (await bombed.stats()).pids < 64:  # noqa: ASYNC110 - polling the cgroup
            await asyncio.sleep(0.01)

    await asyncio.wait_for(at_limit(), HANG)
    assert await sh(other, "echo unaffected") == "unaffected\n"
    await bombed.stop()
    assert processes_rooted_at(bombed.root) == []
    assert not any(d.exists() for d in cgroup_dirs(bombed.sandbox_id))
    await asyncio.wait_for(bomb.wait(), HANG)


async def test_memory_hog_is_oom_killed_inside_its_limit(
    runtime: LinuxRuntime, make_root: MakeRoot
) -> None:
    jail = await runtime.start(new_id(), make_root(), Limits(memory_bytes=64 * 1024 * 1024))
    status, _, _ = await run(jail, ["python3", "-c", "b = b'x' * (512 << 20)"])
    assert status == ExitStatus(-9, signal.SIGKILL)
    stats = await jail.stats()
    assert stats.memory_limit_bytes == 64 * 1024 * 1024
    assert stats.memory_bytes <= 64 * 1024 * 1024
    assert jail.is_alive()
    assert await sh(jail, "echo survived") == "survived\n"


async def test_stats(jail: LinuxJail) -> None:
    await sh(jail, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done")
    stats = await jail.stats()
    assert stats.pids == 1  # just init, now
    assert stats.cpu_usage_usec > 0
    assert stats.memory_bytes > 0
    assert stats.memory_limit_bytes == Limits().memory_bytes


# -- Freeze ---------------------------------------------------------------------------------------
async def test_freeze_stops_a_loop_and_thaw_resumes_it(jail: LinuxJail) -> None:
    counter = jail.root / "counter"
    loop = await jail.exec(
        ExecSpec(
            [
                "sh",
                "-c",
                "i=0; while :; do i=$((i+1)); echo $i > /counter.new; "
                "mv /counter.new /counter; done",
            ],
            ROOT_USER,
            "/",
            ENV,
        )
    )

    def count() -> int:
        try:
            return int(counter.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    await wait_until(lambda: count() > 3)
    await jail.freeze()
    frozen_at = await asyncio.to_thread(count)
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(count) == frozen_at
    await jail.thaw()
    await wait_until(lambda: count() > frozen_at + 3)
    await loop.signal(signal.SIGKILL)
    assert await asyncio.wait_for(loop.wait(), HANG) == ExitStatus(-9, signal.SIGKILL)
    for fd in (loop.stdin_fd, loop.stdout_fd, loop.stderr_fd):
        assert fd is not None
        os.close(fd)


async def test_stop_of_a_frozen_jail(jail: LinuxJail) -> None:
    sleeper = await jail.exec(ExecSpec(["sleep", "1000"], ROOT_USER, "/", ENV))
    for fd in (sleeper.stdin_fd, sleeper.stdout_fd, sleeper.stderr_fd):
        assert fd is not None
        os.close(fd)
    await jail.freeze()
    await jail.stop()
    assert await asyncio.wait_for(sleeper.wait(), HANG) == ExitStatus(-9, signal.SIGKILL)
    assert processes_rooted_at(jail.root) == []
    assert not any(d.exists() for d in cgroup_dirs(jail.sandbox_id))


# -- Stop, restart, leftovers ---------------------------------------------------------------------
async def test_stop_leaves_nothing(runtime: LinuxRuntime, jail: LinuxJail, data_dir: Path) -> None:
    sleeper = await jail.exec(ExecSpec(["sleep", "1000"], ROOT_USER, "/", ENV))
    for fd in (sleeper.stdin_fd, sleeper.stdout_fd, sleeper.stderr_fd):
        assert fd is not None
        os.close(fd)
    assert len(processes_rooted_at(jail.root)) == 2
    await jail.stop()
    assert await asyncio.wait_for(sleeper.wait(), HANG) == ExitStatus(-9, signal.SIGKILL)
    assert not jail.is_alive()
    assert processes_rooted_at(jail.root) == []
    assert not any(d.exists() for d in cgroup_dirs(jail.sandbox_id))
    assert not (data_dir / "run" / f"{jail.sandbox_id}.sock").exists()
    assert jail.sandbox_id not in await runtime.list_jails()
    with pytest.raises(JailError, match="not running"):
        await jail.exec(ExecSpec(["true"], ROOT_USER, "/", ENV))
    await jail.stop()  # idempotent


START_AND_EXIT = """
import asyncio, sys
from pathlib import Path
from coppice_jails.runtime.base import Limits
from coppice_jails.runtime.linux import LinuxRuntime

async def main() -> None:
    jail = await LinuxRuntime(Path(sys.argv[1])).start(sys.argv[2], Path(sys.argv[3]), Limits())
    print(jail.handle)

asyncio.run(main())
"""


async def start_in_other_process(data_dir: Path, sandbox_id: str, root: Path) -> str:
    service = await python_subprocess(START_AND_EXIT, str(data_dir), sandbox_id, str(root))
    out, _ = await asyncio.wait_for(service.communicate(), HANG)
    assert service.returncode == 0
    return out.decode().strip()


async def test_jail_outlives_its_starter_and_is_attached_again(
    runtime: LinuxRuntime, make_root: MakeRoot, data_dir: Path
) -> None:
    sandbox_id, root = new_id(), make_root()
    handle = await start_in_other_process(data_dir, sandbox_id, root)
    jail = await runtime.attach(sandbox_id, root, handle)
    assert jail is not None
    assert jail.is_alive()
    assert (await sh(jail, "hostname")).strip() == sandbox_id
    pid, start_time = handle.split(":")
    assert await runtime.attach(sandbox_id, root, f"{pid}:{int(start_time) + 1}") is None
    assert sandbox_id in await runtime.list_jails()
    await jail.stop()
    assert await runtime.attach(sandbox_id, root, handle) is None


async def test_destroy_leftover_of_a_jail_without_record(
    runtime: LinuxRuntime, make_root: MakeRoot, data_dir: Path
) -> None:
    sandbox_id, root = new_id(), make_root()
    await start_in_other_process(data_dir, sandbox_id, root)
    assert sandbox_id in await runtime.list_jails()
    assert processes_rooted_at(root) != []
    await runtime.destroy_leftover(sandbox_id)
    assert sandbox_id not in await runtime.list_jails()
    assert processes_rooted_at(root) == []
    assert not any(d.exists() for d in cgroup_dirs(sandbox_id))


# Runs start() but stops forever at a chosen point, to be SIGKILLed there like a crashed service.
START_AND_HANG = """
import asyncio, subprocess, sys, time
from pathlib import Path
from coppice_jails.runtime import linux
from coppice_jails.runtime.base import Limits

stage = sys.argv[4]
runtime = linux.LinuxRuntime(Path(sys.argv[1]))
if stage == "cgroups":
    prepare = runtime._prepare
    def hang_after_prepare(*args):
        prepare(*args)
        print("reached", flush=True)
        time.sleep(1000)
    runtime._prepare = hang_after_prepare
else:
    def hang_after_spawn(argv):
        init = subprocess.Popen(argv, stdout=subprocess.PIPE)
        if stage == "ready":
            init.stdout.readline()  # the jail is up
        print("reached", flush=True)
        time.sleep(1000)
    linux._run_init = hang_after_spawn
asyncio.run(runtime.start(sys.argv[2], Path(sys.argv[3]), Limits()))
"""


@pytest.mark.parametrize("stage", ["cgroups", "spawned", "ready"])
async def test_kill_9_during_start_leaves_nothing_after_cleanup(
    runtime: LinuxRuntime, make_root: MakeRoot, data_dir: Path, stage: str
) -> None:
    sandbox_id, root = new_id(), make_root()
    service = await python_subprocess(START_AND_HANG, str(data_dir), sandbox_id, str(root), stage)
    assert service.stdout is not None
    assert await asyncio.wait_for(service.stdout.readline(), HANG) == b"reached\n"
    service.kill()
    await service.wait()
    assert sandbox_id in await runtime.list_jails()
    if stage == "ready":  # the jail itself is up and outlives its starter
        assert processes_rooted_at(root) != []
    await runtime.destroy_leftover(sandbox_id)
    assert sandbox_id not in await runtime.list_jails()
    assert processes_rooted_at(root) == []
    assert not any(d.exists() for d in cgroup_dirs(sandbox_id))
    assert not (data_dir / "run" / f"{sandbox_id}.sock").exists()


async def test_jails_of_another_data_dir_are_not_ours(
    runtime: LinuxRuntime, make_root: MakeRoot, tmp_path_factory: pytest.TempPathFactory
) -> None:
    theirs = LinuxRuntime(tmp_path_factory.mktemp("other"))
    sandbox_id = new_id()
    other = await theirs.start(sandbox_id, make_root(), Limits())
    try:
        assert sandbox_id not in await runtime.list_jails()
        with pytest.raises(Exception, match="cgroups of another jail"):
            await runtime.start(sandbox_id, make_root(), Limits())
        assert other.is_alive()
        assert (await sh(other, "hostname")).strip() == sandbox_id
    finally:
        await other.stop()


async def test_same_id_twice_is_refused(runtime: LinuxRuntime, make_root: MakeRoot) -> None:
    first = await runtime.start(new_id(), make_root(), Limits())
    with pytest.raises(Exception, match="exists already"):
        await runtime.start(first.sandbox_id, make_root(), Limits())
    assert await sh(first, "echo fine") == "fine\n"


async def test_bad_sandbox_ids_are_refused(runtime: LinuxRuntime, make_root: MakeRoot) -> None:
    for bad in ("../x", "a/b", "", "UPPER", "a" * 64):
        with pytest.raises(Exception, match="invalid sandbox id"):
            await runtime.start(bad, make_root(), Limits())


async def test_too_long_socket_path_is_a_clear_error(make_root: MakeRoot, tmp_path: Path) -> None:
    deep = LinuxRuntime(tmp_path / ("d" * 100))
    with pytest.raises(Exception, match="socket path too long"):
        await deep.start(new_id(), make_root(), Limits())


async def test_start_failure_rolls_back(runtime: LinuxRuntime, tmp_path: Path) -> None:
    sandbox_id = new_id()
    with pytest.raises(Exception, match="did not start"):
        await runtime.start(sandbox_id, tmp_path / "no-such-root", Limits())
    assert sandbox_id not in await runtime.list_jails()
    assert not any(d.exists() for d in cgroup_dirs(sandbox_id))


# -- A network namespace per jail -----------------------------------------------------------------
@pytest.fixture
async def net_runtime(data_dir: Path, make_root: MakeRoot) -> AsyncIterator[LinuxRuntime]:
    rt = LinuxRuntime(data_dir, network=True)
    yield rt
    for sandbox_id in await rt.list_jails():
        if sandbox_id.startswith(_test_prefix):
            await rt.destroy_leftover(sandbox_id)
    await rt.close()


CONNECT = """
import socket, sys
try:
    data = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).recv(100)
    print("connected:", data.decode())
except OSError as e:
    print(type(e).__name__)
"""
SERVE_ONCE = """
import socket
s = socket.create_server(("0.0.0.0", 8001))
print("listening", flush=True)
conn, peer = s.accept()
conn.sendall(b"hello from " + peer[0].encode())
"""


async def connect_from(jail: LinuxJail, address: str, port: int) -> str:
    status, out, err = await run(jail, ["python3", "-c", CONNECT, address, str(port)])
    assert status == ExitStatus(0), err
    return out.strip()


async def serve_once_in(jail: LinuxJail) -> JailProcess:
    """A listener on port 8001 of the jail, answering one connection, once it listens."""
    server = await jail.exec(ExecSpec(["python3", "-c", SERVE_ONCE], ROOT_USER, "/", ENV))
    assert server.stdin_fd is not None
    assert server.stderr_fd is not None
    os.close(server.stdin_fd)
    os.close(server.stderr_fd)
    assert server.stdout_fd is not None
    reader, transport = await pipe_reader(server.stdout_fd)
    try:
        assert await asyncio.wait_for(reader.readline(), HANG) == b"listening\n"
    finally:
        transport.close()
    return server


def host_side(jail: LinuxJail) -> str:
    """The host's address on the jail's link (its gateway)."""
    return str(ipaddress.ip_address(jail.address) - 1)


def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


async def test_a_jail_listener_is_reached_at_the_jail_s_address(
    net_runtime: LinuxRuntime, make_root: MakeRoot
) -> None:
    jail = await net_runtime.start(new_id(), make_root(), Limits())
    assert jail.address.startswith("10.231.")
    assert jail.handle.endswith(f":{jail.address}")
    server = await serve_once_in(jail)
    reader, writer = await asyncio.open_connection(jail.address, 8001)
    assert await reader.read() == f"hello from {host_side(jail)}".encode()
    writer.close()
    assert await asyncio.wait_for(server.wait(), HANG) == ExitStatus(0)
    server = await serve_once_in(jail)  # and its own loopback works
    assert await connect_from(jail, "127.0.0.1", 8001) == "connected: hello from 127.0.0.1"
    assert await asyncio.wait_for(server.wait(), HANG) == ExitStatus(0)
    await jail.stop()


async def test_jails_reach_neither_each_other_nor_host_services(
    net_runtime: LinuxRuntime, make_root: MakeRoot
) -> None:
    a = await net_runtime.start(new_id(), make_root(), Limits())
    b = await net_runtime.start(new_id(), make_root(), Limits())
    server = await serve_once_in(b)
    host_any = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", 0)
    host_loop = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    any_port = host_any.sockets[0].getsockname()[1]
    loop_port = host_loop.sockets[0].getsockname()[1]
    try:
        assert await connect_from(a, b.address, 8001) in ("TimeoutError", "timeout")
        assert await connect_from(a, host_side(a), any_port) in ("TimeoutError", "timeout")
        assert await connect_from(a, host_side(b), any_port) in ("TimeoutError", "timeout")
        assert await connect_from(a, "127.0.0.1", loop_port) == "ConnectionRefusedError"
        assert await connect_from(a, "127.0.0.1", any_port) == "ConnectionRefusedError"
        # ... while the host reaches b's listener
        reader, writer = await asyncio.open_connection(b.address, 8001)
        assert await reader.read() == f"hello from {host_side(b)}".encode()
        writer.close()
        assert await asyncio.wait_for(server.wait(), HANG) == ExitStatus(0)
    finally:
        host_any.close()
        host_loop.close()
        await a.stop()
        await b.stop()


@pytest.fixture
def outside_host() -> Iterator[str]:
    """An "outside" host in a network namespace of the test's own, linked to the host (TEST-NET-2
    addresses), answering one connection on port 8001 with the address it saw; its address."""
    ns, link = f"cpt{os.getpid()}", f"cpo{os.getpid() % 100000}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", "198.51.100.1/30", "dev", link)
        ip("link", "set", link, "up")
        ip("-n", ns, "addr", "add", "198.51.100.2/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        command = ["ip", "netns", "exec", ns, sys.executable, "-c", SERVE_ONCE]
        with subprocess.Popen(command, stdout=subprocess.PIPE) as server:
            assert server.stdout is not None
            assert server.stdout.readline() == b"listening\n"
            yield "198.51.100.2"
            server.kill()
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


async def test_outbound_traffic_is_masqueraded(
    net_runtime: LinuxRuntime, make_root: MakeRoot, outside_host: str
) -> None:
    """The jail reaches an outside host, which sees the host's address on its link."""
    jail = await net_runtime.start(new_id(), make_root(), Limits())
    try:
        assert await connect_from(jail, outside_host, 8001) == "connected: hello from 198.51.100.1"
    finally:
        await jail.stop()


async def test_a_stopped_jail_leaves_no_network_behind(
    net_runtime: LinuxRuntime, make_root: MakeRoot, data_dir: Path
) -> None:
    jail = await net_runtime.start(new_id(), make_root(), Limits())
    shown = await asyncio.to_thread(
        subprocess.run,
        ["ip", "-o", "-4", "addr", "show", "to", host_side(jail)],
        check=True,
        capture_output=True,
        text=True,
    )
    link = shown.stdout.split()[1]
    assert link.startswith("cpj")
    await net_runtime.close()  # the namespaces the pool kept ready go
    assert list((data_dir / "run" / "netns").iterdir()) == []
    assert link in host_links()
    await jail.stop()
    await wait_until(lambda: link not in host_links())
