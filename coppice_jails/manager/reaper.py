"""The reaper: ends each running sandbox at its end time (kills it, or pauses it if autoPause)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from coppice_jails.manager.errors import NotFound
from coppice_jails.manager.lifecycle import Lifecycle

log = logging.getLogger(__name__)


class Reaper(Lifecycle):
    async def reap_due(self) -> list[str]:
        """End every running sandbox whose end time has passed (kill, or pause if autoPause)."""
        ended: list[str] = []
        for due in await self.registry.due_sandboxes(self._clock()):
            try:
                async with self._locked(due.id) as record:
                    # The end time may have moved, or the sandbox paused, meanwhile.
                    if record.state != "running" or record.end_at > self._clock():
                        continue
                    if record.auto_pause:
                        await self._pause_locked(record)
                    else:
                        await self._kill_locked(record)
                if not record.auto_pause:
                    await self._forget(record)
                ended.append(record.id)
            except NotFound:
                continue  # killed meanwhile
            except Exception:
                log.exception("reaper could not end sandbox %s", due.id)
        return ended

    async def _reap_forever(self) -> None:
        while True:
            try:
                await self.reap_due()
                next_end = await self.registry.next_end()
            except Exception:
                log.exception("reaper pass failed")
                next_end = None
            # Wake at the next end time, when told an end time changed, or at least every second
            # (another process may have changed the registry).
            delay = 1.0 if next_end is None else min(max(next_end - self._clock(), 0.0), 1.0)
            self._wake_reaper.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake_reaper.wait()
