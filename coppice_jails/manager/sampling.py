"""Usage metrics of running sandboxes: sampled every few seconds, and on demand."""

from __future__ import annotations

import asyncio
import logging

from coppice_jails.manager.base import ManagerBase
from coppice_jails.manager.metrics import Capacity, Metrics
from coppice_jails.manager.model import MIB

log = logging.getLogger(__name__)


class Sampling(ManagerBase):
    async def metrics(
        self, sandbox_id: str, start: float | None = None, end: float | None = None
    ) -> list[Metrics]:
        """The sandbox's samples from `start` to `end` (unix seconds; default: its whole kept
        life), oldest first; a running sandbox sampled never yet is sampled now."""
        await self.latest_metrics(sandbox_id)
        return self._metrics.between(sandbox_id, start, end)

    async def latest_metrics(self, sandbox_id: str) -> Metrics | None:
        """The newest sample (None for a sandbox never sampled while running)."""
        await self.get(sandbox_id)
        if not self._metrics.has(sandbox_id):
            await self._sample_if_running(sandbox_id)
        return self._metrics.latest(sandbox_id)

    async def _sample_if_running(self, sandbox_id: str) -> None:
        live = self.get_live(sandbox_id)
        if live is None:
            return  # paused (frozen jails use nothing, as E2B's paused VMs) or gone
        record = live.record
        stats = await live.jail.stats()
        disk_used = await self.storage.disk_used(sandbox_id)
        now_live = self.get_live(sandbox_id)
        if now_live is None or now_live.jail is not live.jail:
            return  # killed or paused meanwhile
        capacity = Capacity(record.cpu_count, record.memory_mb * MIB, record.disk_size_mb * MIB)
        self._metrics.record(sandbox_id, record.started_at, capacity, stats, disk_used)

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            next_round = loop.time() + self._metrics_interval
            for sandbox_id in list(self._live):
                try:
                    await self._sample_if_running(sandbox_id)
                except Exception:
                    log.warning("could not sample sandbox %s", sandbox_id, exc_info=True)
            await asyncio.sleep(max(next_round - loop.time(), 0.0))
