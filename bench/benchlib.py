"""Small helpers shared by the bench scripts (run as `python bench/bench_*.py`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of the samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def mount_overlay(lower: Path, base: Path) -> Path:
    """A writable overlay of `lower` under `base` (upper, work, merged); returns merged."""
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mount = await asyncio.create_subprocess_exec(
        "mount", "-t", "overlay", "overlay", "-o", options, str(merged)
    )
    if await mount.wait() != 0:
        raise SystemExit(f"cannot mount an overlay on {lower}")
    return merged


def timed_calls(
    n: int, *calls: Callable[[], object], rounds: int = 5, warmup: int = 100
) -> list[list[float]]:
    """n timings (ms) of each call, in interleaved rounds of back-to-back calls, so that the
    drifting load of a shared machine hits every call alike; each call warmed up first."""
    for call in calls:
        for _ in range(min(warmup, n)):
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, timings in zip(calls, samples, strict=True):
            for _ in range(max(1, n // rounds)):
                started = time.perf_counter()
                call()
                timings.append((time.perf_counter() - started) * 1000)
    return samples
