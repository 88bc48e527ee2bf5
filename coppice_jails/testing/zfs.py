"""A real ZFS pool for tests: zfs-fuse on a sparse file, torn down even when tests fail.

Only one zfs-fuse daemon can run per machine (platform notes §5): reuse a live one, start one
only when its socket is dead, and stop it at the end only if we started it and no other pool
(another test run's) is still imported.

"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from coppice_jails.storage.zfs import other_mount_namespace_pids

ZFS_SOCKET = "/var/run/zfs/zfs_socket"
POOL_FILE_SIZE = "4G"


def zfs_daemon_is_live() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(ZFS_SOCKET)
        except OSError:
            return False
    return True


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done.stdout


def _start_daemon(pidfile: Path) -> int:
    _run("zfs-fuse", "--pidfile", str(pidfile))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if pidfile.exists() and zfs_daemon_is_live():
            with contextlib.suppress(ValueError):
                return int(pidfile.read_text().strip())
        time.sleep(0.05)
    raise RuntimeError("zfs-fuse did not come up (is another daemon starting?)")


def _stop_daemon(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def zfs_test_pool() -> Iterator[str]:
    """A fresh pool `coppicetest<random>` with a parent dataset; yields `POOL/coppice`."""
    if shutil.which("zfs-fuse") is None:
        raise RuntimeError("zfs-fuse is not installed (scripts/_setup.sh installs it)")
    workdir = Path(tempfile.mkdtemp(prefix="coppice-zfs-"))
    started_pid: int | None = None
    pool = f"coppicetest{secrets.token_hex(4)}"
    created = False
    try:
        if not zfs_daemon_is_live():
            started_pid = _start_daemon(workdir / "zfs-fuse.pid")
        _forget_dead_test_pools()
        image = workdir / "pool.img"
        _run("truncate", "-s", POOL_FILE_SIZE, str(image))
        _run("zpool", "create", "-m", str(workdir / "mnt"), pool, str(image))
        created = True
        _run("zfs", "create", f"{pool}/coppice")
        yield f"{pool}/coppice"
    finally:
        if created:
            _destroy_pool(pool)
        if started_pid is not None and not _run("zpool", "list", "-H", "-o", "name").strip():
            _stop_daemon(started_pid)
        shutil.rmtree(workdir, ignore_errors=True)


def _forget_dead_test_pools() -> None:
    """A test run killed with -9 leaves its pool in zpool.cache with the image file gone;
    the daemon brings it back FAULTED at its next start. Drop such pools of ours."""
    for line in _run("zpool", "list", "-H", "-o", "name,health").splitlines():
        name, _, health = line.partition("\t")
        if name.startswith("coppicetest") and health in ("FAULTED", "UNAVAIL"):
            with contextlib.suppress(RuntimeError):
                _run("zpool", "export", "-f", name)


def _destroy_pool(pool: str) -> None:
    # zfs-fuse refuses to destroy a pool with mounted datasets ("pool is busy"): unmount them,
    # deepest first, and retry for a moment (same trait as its busy destroys).
    with contextlib.suppress(RuntimeError):
        datasets = _run("zfs", "list", "-H", "-o", "name", "-t", "filesystem", "-r", pool)
        for dataset in sorted(datasets.split(), key=len, reverse=True):
            with contextlib.suppress(RuntimeError):
                _run("zfs", "unmount", dataset)
    for attempt in range(100):
        if attempt == 5:
            _detach_copies_elsewhere(pool)
        try:
            _run("zpool", "destroy", "-f", pool)
            return
        except RuntimeError:
            time.sleep(0.05)
    _run("zpool", "destroy", "-f", pool)


def _detach_copies_elsewhere(pool: str) -> None:
    """Mount namespaces made during the run (jails of concurrent tests) hold copies of the
    pool's mounts, which keep it busy: detach them there (see ZfsStorage.destroy)."""
    mountpoints = _run("zfs", "list", "-H", "-o", "mountpoint", "-r", pool).split()
    for pid in other_mount_namespace_pids():
        for mountpoint in sorted((m for m in mountpoints if m.startswith("/")), reverse=True):
            subprocess.run(
                ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "umount", "-l", "--", mountpoint],
                capture_output=True,
                check=False,
            )
