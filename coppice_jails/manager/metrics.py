"""Usage of each running sandbox, sampled over its life as E2B collects it (every few seconds),
so that `get_metrics(start, end)` answers a time series."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from coppice_jails.runtime.base import JailStats

SAMPLE_INTERVAL_SECONDS = 5.0  # E2B's collection bucket
KEPT_SAMPLES = 1440  # per sandbox: its last two hours at that interval


@dataclass(frozen=True)
class Metrics:
    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int


@dataclass(frozen=True)
class Capacity:
    """What a sandbox may use, to go with each sample of what it uses."""

    cpu_count: int
    mem_total: int
    disk_total: int


@dataclass(frozen=True)
class _Sample:
    metrics: Metrics
    cpu_usage_usec: int  # the jail's counter, for the next sample's cpu share


class MetricsSeries:
    """The samples of every sandbox, oldest first. Not thread-safe: use from the event loop."""

    def __init__(self, clock: Callable[[], float], kept: int = KEPT_SAMPLES) -> None:
        self._clock = clock
        self._kept = kept
        self._series: dict[str, deque[_Sample]] = {}

    def record(
        self,
        sandbox_id: str,
        started_at: float,
        capacity: Capacity,
        stats: JailStats,
        disk_used: int,
    ) -> Metrics:
        """Add a sample taken now; its cpu share is over the time since the previous sample
        (or since the sandbox started)."""
        now = self._clock()
        series = self._series.setdefault(sandbox_id, deque(maxlen=self._kept))
        since, usage_before = started_at, 0
        if series:
            since, usage_before = series[-1].metrics.timestamp, series[-1].cpu_usage_usec
        wall_usec = max((now - since) * 1e6, 1.0)
        used = max(stats.cpu_usage_usec - usage_before, 0)
        metrics = Metrics(
            timestamp=now,
            cpu_count=capacity.cpu_count,
            cpu_used_pct=round(min(100.0, 100.0 * used / (wall_usec * capacity.cpu_count)), 2),
            mem_used=stats.memory_bytes,
            mem_total=stats.memory_limit_bytes or capacity.mem_total,
            mem_cache=0,
            disk_used=disk_used,
            disk_total=capacity.disk_total,
        )
        series.append(_Sample(metrics, stats.cpu_usage_usec))
        return metrics

    def has(self, sandbox_id: str) -> bool:
        return bool(self._series.get(sandbox_id))

    def between(
        self, sandbox_id: str, start: float | None = None, end: float | None = None
    ) -> list[Metrics]:
        """Samples with start <= timestamp < end + 1 (whole seconds, as the API asks)."""
        return [
            sample.metrics
            for sample in self._series.get(sandbox_id, ())
            if (start is None or sample.metrics.timestamp >= start)
            and (end is None or sample.metrics.timestamp < end + 1)
        ]

    def latest(self, sandbox_id: str) -> Metrics | None:
        series = self._series.get(sandbox_id)
        return series[-1].metrics if series else None

    def forget(self, sandbox_id: str) -> None:
        self._series.pop(sandbox_id, None)
