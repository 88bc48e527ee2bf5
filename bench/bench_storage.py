"""Clone and destroy latency of the storage backends against the raw floor, in one run.

    .venv/bin/python bench/bench_storage.py [--runs 20] [--tree DIR] [--backends overlay,zfs]

overlay: OverlayStorage.clone/destroy vs `mount -t overlay` / `umount` + `rm -rf` run directly.
zfs:     ZfsStorage.clone/destroy on a fresh zfs-fuse pool (made and destroyed by the bench)
         vs `zfs clone` / `zfs unmount` + `zfs destroy` retried every 50 ms from a shell.
The template is a small generated tree unless --tree gives a real root filesystem (clone cost
does not depend on the tree's size for either backend). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from coppice_jails.storage.base import Storage, run_command
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.storage.zfs import ZfsStorage
from coppice_jails.testing import zfs_test_pool

Row = tuple[str, str, list[float], list[float]]


def small_tree(root: Path) -> Path:
    for d in ("etc", "bin", "usr/lib", "home/user"):
        (root / d).mkdir(parents=True)
    for i in range(50):
        (root / "usr" / "lib" / f"f{i}").write_bytes(b"x" * 4096)
    (root / "etc" / "hostname").write_text("bench\n")
    return root


async def timed(n: int, step: Callable[[int], Awaitable[object]]) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await step(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def bench_storage(storage: Storage, template: str, n: int) -> tuple[list[float], list[float]]:
    clone = await timed(n, lambda i: storage.clone(template, f"bench{i}"))
    destroy = await timed(n, lambda i: storage.destroy(f"bench{i}"))
    return clone, destroy


async def bench_overlay(tree: Path, work: Path, n: int) -> list[Row]:
    storage = OverlayStorage(work / "overlay")
    await storage.add_template("bench", tree)
    clone, destroy = await bench_storage(storage, "bench", n)
    lower = await storage.template_root("bench")
    raw = work / "raw"

    async def raw_mount(i: int) -> None:
        d = raw / str(i)
        for sub in ("upper", "work", "merged"):
            await asyncio.to_thread((d / sub).mkdir, parents=True)
        options = f"lowerdir={lower},upperdir={d}/upper,workdir={d}/work"
        await run_command("mount", "-t", "overlay", "overlay", "-o", options, f"{d}/merged")

    async def raw_unmount(i: int) -> None:
        d = raw / str(i)
        await run_command("umount", f"{d}/merged")
        await run_command("rm", "-rf", str(d))

    raw_clone = await timed(n, raw_mount)
    raw_destroy = await timed(n, raw_unmount)
    await storage.delete_template("bench")
    return [
        ("overlay", "clone", clone, raw_clone),
        ("overlay", "destroy", destroy, raw_destroy),
    ]


async def bench_zfs(tree: Path, dataset: str, n: int) -> list[Row]:
    storage = ZfsStorage(dataset)
    await storage.add_template("bench", tree)
    clone, destroy = await bench_storage(storage, "bench", n)
    origin = f"{dataset}/templates/bench@base"
    raw = f"{dataset}/raw"
    await run_command("zfs", "create", raw)

    async def raw_clone(i: int) -> None:
        await run_command("zfs", "clone", origin, f"{raw}/c{i}")

    async def raw_destroy(i: int) -> None:
        target = f"{raw}/c{i}"
        await run_command(
            "sh", "-c",
            f"zfs unmount {target} 2>/dev/null; until zfs destroy {target} 2>/dev/null; "
            f"do sleep 0.05; zfs unmount {target} 2>/dev/null; done; :",
        )  # fmt: skip

    raw_clones = await timed(n, raw_clone)
    raw_destroys = await timed(n, raw_destroy)
    await storage.delete_template("bench")
    return [
        ("zfs-fuse", "clone", clone, raw_clones),
        ("zfs-fuse", "destroy", destroy, raw_destroys),
    ]


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[-1]


def print_table(rows: list[Row], n: int) -> None:
    print(f"\n{n} runs each, milliseconds")
    header = (
        f"{'backend':<10}{'op':<9}{'p50':>8}{'p90':>8}{'raw p50':>10}{'raw p90':>10}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for backend, op, ours, raw in rows:
        print(
            f"{backend:<10}{op:<9}{p50(ours):>8.2f}{p90(ours):>8.2f}"
            f"{p50(raw):>10.2f}{p90(raw):>10.2f}{p50(ours) / p50(raw):>8.2f}"
        )


async def main_async(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="coppice-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        tree = args.tree or await asyncio.to_thread(small_tree, work / "tree")
        backends = args.backends.split(",")
        if "overlay" in backends:
            # add_template moves a tree on the same filesystem: give it a copy.
            copy = work / "overlay-tree"
            await run_command("cp", "-a", str(tree), str(copy))
            rows += await bench_overlay(copy, work, args.runs)
        if "zfs" in backends:
            with zfs_test_pool() as dataset:
                rows += await bench_zfs(tree, dataset, args.runs)
    print_table(rows, args.runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tree", type=Path, help="a root filesystem to use as the template")
    parser.add_argument("--backends", default="overlay,zfs")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
