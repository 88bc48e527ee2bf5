"""SandboxManager: the parts of the manager composed, and its own start and stop."""

from __future__ import annotations

import asyncio
import contextlib

from coppice_jails.manager.reaper import Reaper
from coppice_jails.manager.reconcile import Reconciler
from coppice_jails.manager.sampling import Sampling
from coppice_jails.manager.snapshots import Snapshots


class SandboxManager(Snapshots, Reaper, Sampling, Reconciler):
    """Create, kill, pause, resume, snapshot and fork sandboxes over three backends (template
    catalog, copy-on-write storage, jail runtime); see the modules of each part."""

    _reaper: asyncio.Task[None] | None = None
    _sampler: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        """Reconcile the registry with the backends, then start the reaper and the sampler.

        Returns what reconciliation did, one line per fix, for the service log.
        """
        report = await self.reconcile()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="sandbox-reaper")
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_forever(), name="sandbox-metrics")
        return report

    async def close(self) -> None:
        """Stop the reaper and the sampler. Sandboxes keep running: a restarted service finds
        them again."""
        for task in (self._reaper, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reaper = self._sampler = None
