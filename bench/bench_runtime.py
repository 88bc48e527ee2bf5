"""Speed and footprint of the Linux jail runtime, against the raw floor measured in the same run.

    .venv/bin/python bench/bench_runtime.py [--rootfs DIR] [--runs N]

Measures: exec of /bin/true in a jail (p50/p95) against a plain asyncio spawn of /bin/true on the
host; jail start until the first exec is possible; create = overlay mount + start, with the
host's network and with a network namespace of its own (netns.py, from its pool), alternating in
one run; stop; and the host memory an idle jail costs (its coppice-init and its cgroup's charge).
Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchlib import mount_overlay, percentile

from coppice_jails.runtime.base import ExecSpec, Limits, User
from coppice_jails.runtime.linux import LinuxJail, LinuxRuntime

ROOT = User("root", 0, 0, "/root", (0,))
ENV = {"PATH": "/usr/bin:/bin"}


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return (time.perf_counter() - start) * 1000


async def host_true() -> None:
    process = await asyncio.create_subprocess_exec("/bin/true")
    await process.wait()


async def jail_true(jail: LinuxJail) -> None:
    process = await jail.exec(ExecSpec(["/bin/true"], ROOT, "/", ENV))
    await process.wait()
    for fd in (process.stdin_fd, process.stdout_fd, process.stderr_fd):
        if fd is not None:
            os.close(fd)


def idle_cost(jail: LinuxJail) -> tuple[int, int, int]:
    """(RSS, PSS, cgroup memory charge) in bytes of an idle jail."""
    status = Path(f"/proc/{jail.init_pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    rollup = Path(f"/proc/{jail.init_pid}/smaps_rollup").read_text()
    pss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    charged = int(
        Path(f"/sys/fs/cgroup/memory/coppice/{jail.sandbox_id}/memory.usage_in_bytes").read_text()
    )
    return rss * 1024, pss * 1024, charged


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rootfs", type=Path, help="default: the built base template")
    parser.add_argument("--runs", type=int, default=30, help="jails to start and stop")
    parser.add_argument("--execs", type=int, default=300)
    args = parser.parse_args()
    if args.rootfs is None:
        from coppice_jails.testing import built_template_root

        args.rootfs = await asyncio.to_thread(built_template_root, "base")
    work = Path(tempfile.mkdtemp(prefix="coppice-bench-"))
    runtime = LinuxRuntime(work / "data")
    net_runtime = LinuxRuntime(work / "data", network=True)
    roots: list[Path] = []
    jails: list[LinuxJail] = []
    try:
        # Warm up: compile coppice-init, detect cgroups, fill caches.
        warm_root = await mount_overlay(args.rootfs, work / "warm")
        roots.append(warm_root)
        warm = await runtime.start(f"bench{uuid.uuid4().hex[:12]}", warm_root, Limits())
        jails.append(warm)
        for _ in range(20):
            await host_true()
            await jail_true(warm)
        warm_root = await mount_overlay(args.rootfs, work / "warm-net")
        roots.append(warm_root)
        jails.append(await net_runtime.start(f"bench{uuid.uuid4().hex[:12]}", warm_root, Limits()))

        floor = [await timed(host_true) for _ in range(args.execs)]
        in_jail = [await timed(lambda: jail_true(warm)) for _ in range(args.execs)]

        mounts, starts, creates, stops, net_creates = [], [], [], [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            root = await mount_overlay(args.rootfs, work / f"sb{i}")
            t1 = time.perf_counter()
            roots.append(root)
            jail = await runtime.start(f"bench{uuid.uuid4().hex[:12]}", root, Limits())
            t2 = time.perf_counter()
            jails.append(jail)
            mounts.append((t1 - t0) * 1000)
            starts.append((t2 - t1) * 1000)
            creates.append((t2 - t0) * 1000)
            t0 = time.perf_counter()
            root = await mount_overlay(args.rootfs, work / f"net{i}")
            roots.append(root)
            jails.append(await net_runtime.start(f"bench{uuid.uuid4().hex[:12]}", root, Limits()))
            net_creates.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.5)  # let the jails settle into idleness
        costs = [await asyncio.to_thread(idle_cost, jail) for jail in jails[2::2]]
        for jail in jails[2:]:
            stops.append(await timed(jail.stop))
        del jails[2:]

        def row(name: str, samples: list[float], target: str) -> str:
            p50, p95 = statistics.median(samples), percentile(samples, 0.95)
            return f"{name:<34} {p50:>8.2f} {p95:>8.2f}   {target}"

        print(f"{'ms (n)':<34} {'p50':>8} {'p95':>8}   target")
        print(row(f"host spawn /bin/true ({len(floor)})", floor, "floor"))
        print(row(f"jail exec /bin/true ({len(in_jail)})", in_jail, "p50 <= 4 ms"))
        ratio = statistics.median(in_jail) / statistics.median(floor)
        print(f"{'  jail exec / floor':<34} {ratio:>8.2f}x")
        print(row(f"overlay mount ({len(mounts)})", mounts, "(storage helper's part)"))
        print(row(f"jail start, exec possible ({len(starts)})", starts, ""))
        print(row(f"create = mount + start ({len(creates)})", creates, "p50 <= 30 ms"))
        print(row(f"  the same, own netns ({len(net_creates)})", net_creates, "p50 <= 30 ms"))
        ratio = statistics.median(net_creates) / statistics.median(creates)
        print(f"{'  own netns / host network':<34} {ratio:>8.2f}x")
        print(row(f"stop ({len(stops)})", stops, "p50 <= 50 ms (with storage destroy)"))
        mib = 1024 * 1024
        rss, pss, charged = (statistics.median(c[i] for c in costs) / mib for i in range(3))
        print(
            f"idle jail: coppice-init RSS {rss:.2f} MiB, PSS {pss:.2f} MiB; "
            f"cgroup charge {charged:.2f} MiB (target <= 2 MiB)"
        )
    finally:
        for jail in jails:
            await jail.stop()
        await net_runtime.close()
        for root in roots:
            umount = await asyncio.create_subprocess_exec("umount", "--lazy", str(root))
            await umount.wait()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
