"""The per-sandbox metrics series: cpu share between samples, time windows, bounded history."""

from __future__ import annotations

from coppice_jails.manager.metrics import Capacity, MetricsSeries
from coppice_jails.runtime.base import JailStats

CAPACITY = Capacity(cpu_count=2, mem_total=512 << 20, disk_total=10 << 30)


def stats(cpu_usec: int, memory: int = 1 << 20) -> JailStats:
    return JailStats(cpu_usage_usec=cpu_usec, memory_bytes=memory, memory_limit_bytes=None, pids=1)


def test_cpu_share_is_over_the_time_since_the_previous_sample() -> None:
    now = [100.0]
    series = MetricsSeries(lambda: now[0])
    now[0] = 110.0
    first = series.record("s", 100.0, CAPACITY, stats(2_000_000), disk_used=7)
    assert (first.cpu_used_pct, first.mem_total, first.disk_used) == (10.0, 512 << 20, 7)
    now[0] = 115.0
    second = series.record("s", 100.0, CAPACITY, stats(12_000_000), disk_used=9)
    assert second.cpu_used_pct == 100.0  # 10 s of cpu in 5 s of 2 cpus: all of it
    assert series.latest("s") == second


def test_windows_are_whole_seconds_and_history_is_bounded() -> None:
    now = [0.0]
    series = MetricsSeries(lambda: now[0], kept=3)
    for t in (10.0, 15.0, 20.5, 25.0):
        now[0] = t
        series.record("s", 0.0, CAPACITY, stats(0), disk_used=0)
    assert [m.timestamp for m in series.between("s")] == [15.0, 20.5, 25.0]
    assert [m.timestamp for m in series.between("s", 15, 20)] == [15.0, 20.5]
    assert series.between("s", 0, 9) == []
    assert series.between("other") == []
    series.forget("s")
    assert not series.has("s")
    assert series.latest("s") is None
