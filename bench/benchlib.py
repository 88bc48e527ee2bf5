"""Small helpers shared by the bench scripts (run as `python bench/bench_*.py`)."""

from __future__ import annotations

import asyncio
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
