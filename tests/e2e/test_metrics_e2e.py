"""`get_metrics` through the official SDK against a real `coppice serve`: a time series sampled
over the sandbox's life (every 5 s, as E2B), with the real disk usage of its clone."""

from __future__ import annotations

import datetime
import time

import pytest
from e2b import Sandbox
from fixtures.stack import Stack

pytestmark = pytest.mark.slow


def test_metrics_are_a_series_over_the_sandbox_s_life(
    coppice_stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in coppice_stack.sdk_env().items():
        monkeypatch.setenv(key, value)
    started = datetime.datetime.now(datetime.UTC)
    with Sandbox.create(template="base", timeout=120) as sandbox:
        sandbox.commands.run("head -c 8000000 /dev/urandom > /home/user/blob")
        series = sandbox.get_metrics()
        deadline = time.monotonic() + 30  # a bound for a broken sampler, not a speed check
        while len(series) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            series = sandbox.get_metrics()
        assert len(series) >= 2
        stamps = [m.timestamp for m in series]
        assert stamps == sorted(stamps)
        assert len(set(stamps)) == len(stamps)
        latest = series[-1]
        assert latest.disk_used > 8_000_000
        assert latest.disk_total > latest.disk_used
        assert 0 < latest.mem_used <= latest.mem_total
        assert latest.cpu_count >= 1
        now = datetime.datetime.now(datetime.UTC)
        window = sandbox.get_metrics(start=started, end=now)
        assert window
        assert all(
            started.timestamp() - 1 <= m.timestamp.timestamp() <= now.timestamp() + 1
            for m in window
        )
        hour = datetime.timedelta(hours=1)
        assert sandbox.get_metrics(start=started - hour, end=started - hour / 2) == []
