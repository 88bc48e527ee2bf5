"""The manager's state and what every part of it shares: the backends, the sandboxes that have
a jail in this process, per-sandbox locks, observers, template lookup and the event log.

The registry stays the single source of truth; the live table only caches the records of
sandboxes whose jail this process holds, and every change of them goes through the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from coppice_jails.manager.errors import InvalidArgument, NotFound, TemplateNotFound
from coppice_jails.manager.metrics import SAMPLE_INTERVAL_SECONDS, MetricsSeries
from coppice_jails.manager.model import (
    FORK_PREFIX,
    MAX_TIMEOUT_SECONDS,
    Clock,
    LiveSandbox,
    SandboxObserver,
    TemplateCatalog,
)
from coppice_jails.registry import (
    EventRecord,
    LogLevel,
    Page,
    Registry,
    SandboxQuery,
    SandboxRecord,
)
from coppice_jails.runtime.base import Jail, Limits, Runtime
from coppice_jails.storage.base import Storage
from coppice_jails.templates import TemplateInfo, UnknownTemplate

log = logging.getLogger(__name__)


class ManagerBase:
    def __init__(
        self,
        registry: Registry,
        storage: Storage,
        runtime: Runtime,
        templates: TemplateCatalog,
        *,
        limits: Limits | None = None,
        disk_size_mb: int = 10 * 1024,
        max_timeout: int = MAX_TIMEOUT_SECONDS,
        clock: Clock = time.time,
        metrics_interval: float = SAMPLE_INTERVAL_SECONDS,
    ) -> None:
        self.registry = registry
        self.storage = storage
        self.runtime = runtime
        self.templates = templates
        self.limits = limits or Limits()
        self.disk_size_mb = disk_size_mb
        self.max_timeout = max_timeout
        self._clock = clock
        self._live: dict[str, LiveSandbox] = {}  # every sandbox that has a jail (running or frozen)
        self._observers: list[SandboxObserver] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._metrics = MetricsSeries(clock)
        self._metrics_interval = metrics_interval
        self._wake_reaper = asyncio.Event()

    # Observers -------------------------------------------------------------------------------
    def add_observer(self, observer: SandboxObserver) -> None:
        self._observers.append(observer)

    async def _new_jail(self, live: LiveSandbox) -> None:
        """Record a sandbox's (new) jail and tell the observers."""
        self._live[live.record.id] = live
        for observer in self._observers:
            try:
                await observer.sandbox_started(live)
            except Exception:
                log.exception("observer failed on start of %s", live.record.id)

    async def _jail_ending(self, sandbox_id: str) -> None:
        for observer in self._observers:
            try:
                await observer.sandbox_ending(sandbox_id)
            except Exception:
                log.exception("observer failed before the end of %s", sandbox_id)

    async def _jail_ended(self, sandbox_id: str) -> None:
        self._live.pop(sandbox_id, None)
        for observer in self._observers:
            try:
                await observer.sandbox_stopped(sandbox_id)
            except Exception:
                log.exception("observer failed on end of %s", sandbox_id)

    # Locks -----------------------------------------------------------------------------------
    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _locked(self, sandbox_id: str) -> AsyncIterator[SandboxRecord]:
        """Hold the sandbox's lock and yield its current record; NotFound for unknown ids,
        which get no lock (so made-up ids cannot grow the lock table)."""
        await self.get(sandbox_id)
        async with self._lock(sandbox_id):
            yield await self.get(sandbox_id)

    # Reading ---------------------------------------------------------------------------------
    async def get(self, sandbox_id: str) -> SandboxRecord:
        # Sandboxes with a jail in this process are read from memory: every change of them goes
        # through this manager, which writes the registry and this copy together.
        live = self._live.get(sandbox_id)
        if live is not None:
            return live.record
        record = await self.registry.get_sandbox(sandbox_id)
        if record is None:
            raise NotFound(f"Sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it")
        return record

    async def list_sandboxes(self, query: SandboxQuery) -> Page:
        return await self.registry.list_sandboxes(query)

    def get_live(self, sandbox_id: str) -> LiveSandbox | None:
        """The running sandbox with this id (no I/O: safe to call from request routing)."""
        live = self._live.get(sandbox_id)
        return live if live is not None and live.record.state == "running" else None

    def most_recent_live(self) -> LiveSandbox | None:
        running = [s for s in self._live.values() if s.record.state == "running"]
        return max(running, key=lambda s: s.record.started_at, default=None)

    async def _jail_of(self, record: SandboxRecord) -> Jail | None:
        live = self._live.get(record.id)
        if live is not None:
            return live.jail
        return await self.runtime.attach(record.id, Path(record.storage_ref), record.jail_handle)

    def _check_timeout(self, seconds: int) -> None:
        if seconds <= 0:
            raise InvalidArgument("Timeout must be greater than 0")
        if seconds > self.max_timeout:
            hours = self.max_timeout // 3600
            raise InvalidArgument(f"Timeout cannot be greater than {hours} hours")

    @staticmethod
    def _limits(record: SandboxRecord) -> Limits:
        return Limits(
            memory_bytes=record.memory_bytes,
            cpu_millicores=record.cpu_millicores,
            pids=record.pids,
        )

    # Templates -------------------------------------------------------------------------------
    async def _resolve_template(self, name: str) -> TemplateInfo:
        """The template for a template name, alias, or snapshot id or name."""
        snapshot = await self.registry.find_snapshot(name)
        try:
            return await self.templates.get(snapshot.snapshot_id if snapshot else name)
        except UnknownTemplate as e:
            raise TemplateNotFound(str(e)) from e

    async def _template_of(self, record: SandboxRecord) -> TemplateInfo:
        """The sandbox's template (for its process defaults); it cannot be deleted while used."""
        return await self._resolve_template(record.template)

    async def _collect_fork_template(self, template: str) -> None:
        """Delete a fork's internal template once no sandbox uses it."""
        if not template.startswith(FORK_PREFIX):
            return
        if await self.registry.count_using_template(template):
            return
        try:
            await self.templates.delete(template)
            await self.registry.delete_snapshot(template)
        except Exception:
            log.exception("could not delete unused fork template %s", template)

    # Event log -------------------------------------------------------------------------------
    async def logs(
        self,
        sandbox_id: str,
        *,
        since: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[EventRecord]:
        await self.get(sandbox_id)
        return await self.registry.events(
            sandbox_id, since=since, limit=limit, newest_first=newest_first
        )

    async def log_event(
        self, sandbox_id: str, level: LogLevel, message: str, **fields: str
    ) -> None:
        """Add to a sandbox's log (GET /sandboxes/{id}/logs); e.g. process start/exit from the
        gateway. Never fails: a lost log line must not fail the operation it describes."""
        try:
            await self.registry.append_event(sandbox_id, level, message, fields)
        except Exception:
            log.exception("could not log event %r of sandbox %s", message, sandbox_id)
