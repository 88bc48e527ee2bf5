"""The cgroups of one sandbox: limits, freezing, accounting and killing everything in it.

cgroup v2 is used when the unified hierarchy at /sys/fs/cgroup offers memory, cpu and pids.
Otherwise (v1, or a v1/v2 hybrid like Debian hosts with systemd's hybrid mode) each v1 controller
gets a group `<mount>/coppice/<sandbox id>`; on a hybrid a group in the controller-less v2 tree
is added too, for its `cgroup.kill`.

All methods block (they touch cgroupfs): call them from a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coppice_jails.runtime.base import JailError, JailStats, Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "coppice"
CPU_PERIOD_USEC = 100_000
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
_V2_CONTROLLERS = {"memory", "cpu", "pids"}
_POLL_SECONDS = 0.001


class CgroupError(JailError):
    pass


@dataclass(frozen=True)
class CgroupLayout:
    """Where sandbox cgroups live on this host."""

    v2: Path | None  # the unified hierarchy used for everything (pure v2 host)
    v1: dict[str, Path]  # controller -> its mount (v1 / hybrid host)
    unified: Path | None  # hybrid: the controller-less v2 mount, for cgroup.kill

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT) -> CgroupLayout:
        controllers = root / "cgroup.controllers"
        if controllers.exists() and set(controllers.read_text().split()) >= _V2_CONTROLLERS:
            return cls(v2=root, v1={}, unified=None)
        v1 = {c: root / c for c in _V1_CONTROLLERS if (root / c / "cgroup.procs").exists()}
        missing = {"memory", "cpu", "pids", "freezer"} - v1.keys()
        if missing:
            raise CgroupError(f"cgroup controllers not available: {', '.join(sorted(missing))}")
        unified = root / "unified"
        return cls(v2=None, v1=v1, unified=unified if (unified / "cgroup.procs").exists() else None)

    def parents(self) -> list[Path]:
        """The `coppice` directory of every hierarchy used: a sandbox has a group in each."""
        if self.v2 is not None:
            return [self.v2 / PARENT]
        # cpu and cpuacct are often one mount with two names: one group serves both.
        mounts = {str(p.resolve()): p for p in self.v1.values()}
        dirs = [p / PARENT for p in mounts.values()]
        return dirs + ([self.unified / PARENT] if self.unified is not None else [])

    def sandbox(self, sandbox_id: str) -> SandboxCgroups:
        return SandboxCgroups(self, sandbox_id)


class SandboxCgroups:
    def __init__(self, layout: CgroupLayout, sandbox_id: str) -> None:
        self.layout = layout
        self.sandbox_id = sandbox_id
        self.dirs = [parent / sandbox_id for parent in layout.parents()]

    def _controller(self, name: str) -> Path:
        if self.layout.v2 is not None:
            return self.layout.v2 / PARENT / self.sandbox_id
        return self.layout.v1[name] / PARENT / self.sandbox_id

    @property
    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    # Lifecycle ------------------------------------------------------------------------------
    def create(self, limits: Limits) -> None:
        if self.layout.v2 is not None:
            parent = self.layout.v2 / PARENT
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+memory +cpu +pids")
        for d in self.dirs:
            d.parent.mkdir(exist_ok=True)
            d.mkdir()
        self._write_limits(limits)

    def _write_limits(self, limits: Limits) -> None:
        quota = (
            None
            if limits.cpu_millicores is None
            else max(1000, limits.cpu_millicores * CPU_PERIOD_USEC // 1000)
        )
        if self.layout.v2 is not None:
            d = self._controller("memory")
            if limits.memory_bytes is not None:
                _write(d / "memory.max", str(limits.memory_bytes))
                _write(d / "memory.swap.max", "0")
            _write(d / "cpu.max", f"{quota or 'max'} {CPU_PERIOD_USEC}")
            _write(d / "pids.max", str(limits.pids or "max"))
            return
        if limits.memory_bytes is not None:
            memory = self._controller("memory")
            _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
            # No swapping past the limit either (memsw must be set after, and >=, the limit).
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        cpu = self._controller("cpu")
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_USEC))
        _write(cpu / "cpu.cfs_quota_us", str(quota or -1))
        _write(self._controller("pids") / "pids.max", str(limits.pids or "max"))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            try:
                found.update(int(line) for line in procs.read_text().split())
            except FileNotFoundError:
                continue
        return found

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the sandbox's groups and wait until they are empty."""
        kill_files = [d / "cgroup.kill" for d in self.dirs if (d / "cgroup.kill").exists()]
        deadline = time.monotonic() + timeout
        while True:
            # Thaw first: a frozen process would not die until thawed.
            if self.exists():
                self.thaw()
            for kill_file in kill_files:
                _write_if_exists(kill_file, "1")
            remaining = self.pids()
            if not remaining:
                return
            # Without cgroup.kill (or if one raced with a fork): kill what is listed.
            for pid in remaining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise CgroupError(f"processes of {self.sandbox_id} survive SIGKILL: {remaining}")
            time.sleep(_POLL_SECONDS)

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir every group (they must be empty); succeeds if they are already gone."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # An exiting task may keep a v1 group busy for a moment after it left procs.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(_POLL_SECONDS)

    # Freezer --------------------------------------------------------------------------------
    def freeze(self, timeout: float = 10.0) -> None:
        """Stop every process of the sandbox; all or nothing (thawed again on failure)."""
        d = self._controller("freezer")
        if self.layout.v2 is not None:
            _write(d / "cgroup.freeze", "1")
            frozen = _wait_for(lambda: "frozen 1" in (d / "cgroup.events").read_text(), timeout)
        else:
            state = d / "freezer.state"

            def frozen_v1() -> bool:
                # v1 can stay FREEZING when a task escaped the first pass (e.g. one being
                # forked right then); writing FROZEN again freezes the stragglers.
                _write(state, "FROZEN")
                return state.read_text().strip() == "FROZEN"

            frozen = _wait_for(frozen_v1, timeout)
        if not frozen:
            # A task stuck in the kernel (e.g. uninterruptible I/O) holds the freeze back.
            self.thaw()
            raise CgroupError(f"the processes of {self.sandbox_id} could not be frozen")

    def thaw(self) -> None:
        if self.layout.v2 is not None:
            _write_if_exists(self._controller("freezer") / "cgroup.freeze", "0")
        else:
            _write_if_exists(self._controller("freezer") / "freezer.state", "THAWED")

    # Accounting -----------------------------------------------------------------------------
    def stats(self) -> JailStats:
        if self.layout.v2 is not None:
            d = self._controller("memory")
            cpu_stat = dict(
                line.split() for line in (d / "cpu.stat").read_text().splitlines() if line
            )
            limit = (d / "memory.max").read_text().strip()
            return JailStats(
                cpu_usage_usec=int(cpu_stat["usage_usec"]),
                memory_bytes=int((d / "memory.current").read_text()),
                memory_limit_bytes=None if limit == "max" else int(limit),
                pids=int((d / "pids.current").read_text()),
            )
        memory = self._controller("memory")
        v1_limit = int((memory / "memory.limit_in_bytes").read_text())
        return JailStats(
            cpu_usage_usec=int((self._controller("cpuacct") / "cpuacct.usage").read_text()) // 1000,
            memory_bytes=int((memory / "memory.usage_in_bytes").read_text()),
            # v1 reports "unlimited" as a huge page-rounded number.
            memory_limit_bytes=None if v1_limit >= 2**62 else v1_limit,
            pids=int((self._controller("pids") / "pids.current").read_text()),
        )


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_if_exists(path: Path, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _write(path, text)


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether the condition came true within the timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True
