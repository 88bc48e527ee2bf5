"""The sandbox manager: create, kill, pause, resume, snapshot and fork sandboxes.

It drives three backends (template catalog, copy-on-write storage, jail runtime) and keeps the
registry the single source of truth. Every multi-step operation undoes what it made, in reverse,
when a later step fails. A reaper task ends each sandbox at its end time.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import re
import secrets
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from coppice_jails.metrics import SAMPLE_INTERVAL_SECONDS, Capacity, Metrics, MetricsSeries
from coppice_jails.registry import (
    EventRecord,
    LogLevel,
    Page,
    Registry,
    SandboxQuery,
    SandboxRecord,
    SnapshotPage,
    SnapshotRecord,
)
from coppice_jails.runtime.base import Jail, Limits, Runtime
from coppice_jails.storage.base import Storage, StorageError
from coppice_jails.templates import ALIASES, TemplateError, TemplateInfo, UnknownTemplate

log = logging.getLogger(__name__)

CLIENT_ID = "6532622b"  # E2B's constant, deprecated client id
DEFAULT_TIMEOUT_SECONDS = 300
MAX_TIMEOUT_SECONDS = 24 * 3600
ID_LENGTH = 20
_ID_ALPHABET = string.ascii_lowercase + string.digits
SNAPSHOT_PREFIX = "snap-"
FORK_PREFIX = "fork-"
# Snapshot names are client-chosen labels (E2B allows `team/name:tag`).
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MIB = 1024 * 1024


def new_id(prefix: str = "") -> str:
    """A fresh id: lowercase alphanumerics, safe as one DNS label."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


# Errors -------------------------------------------------------------------------------------
class SandboxError(Exception):
    """A request the manager refuses or could not carry out; the message is for the client."""


class NotFound(SandboxError):
    pass


class TemplateNotFound(NotFound):
    """An unknown template; the message names the available ones."""


class Conflict(SandboxError):
    pass


class InvalidArgument(SandboxError):
    pass


class OperationFailed(SandboxError):
    """A backend (storage, runtime, registry) failed; what was made has been rolled back."""


# Templates ----------------------------------------------------------------------------------
class TemplateCatalog(Protocol):
    """What the manager uses of the template store (`templates.TemplateStore`)."""

    def resolve(self, name: str) -> str: ...

    async def get(self, name: str) -> TemplateInfo:
        """Aliases resolved; UnknownTemplate (naming the available ones) if there is none."""
        ...

    async def list(self) -> builtins.list[TemplateInfo]: ...

    async def delete(self, name: str) -> None: ...

    async def snapshot_sandbox(self, sandbox_id: str, name: str, parent: str) -> TemplateInfo: ...


def template_aliases(name: str) -> builtins.list[str]:
    return sorted(alias for alias, target in ALIASES.items() if target == name)


# What the manager returns -------------------------------------------------------------------
@dataclass(frozen=True)
class LiveSandbox:
    """A sandbox with its jail, for the gateway (adapted to its SandboxLookup by the CLI)."""

    record: SandboxRecord
    jail: Jail
    template: TemplateInfo


class SandboxObserver(Protocol):
    """Told when a sandbox gets a jail, when it is about to be killed (its jail still running)
    and when its jail has ended, e.g. to warm, cut off or drop per-sandbox state in the
    gateway. Calls must return quickly; their errors are logged and ignored."""

    async def sandbox_started(self, live: LiveSandbox) -> None: ...

    async def sandbox_ending(self, sandbox_id: str) -> None: ...

    async def sandbox_stopped(self, sandbox_id: str) -> None: ...


@dataclass(frozen=True)
class CreateSpec:
    template: str
    timeout: int = DEFAULT_TIMEOUT_SECONDS
    metadata: Mapping[str, str] = field(default_factory=dict)
    env_vars: Mapping[str, str] = field(default_factory=dict)
    secure: bool = False
    auto_pause: bool = False
    allow_internet_access: bool | None = None


@dataclass(frozen=True)
class ConnectResult:
    record: SandboxRecord
    resumed: bool  # False: it was running and only its end time moved


Clock = Callable[[], float]


class _Undo:
    """Steps to take back, run in reverse when an operation fails half-way."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        self._steps.append((what, step))

    async def run(self) -> None:
        for what, step in reversed(self._steps):
            try:
                await step()
            except Exception:
                log.exception("rollback step failed: %s", what)
        self._steps.clear()


@contextlib.asynccontextmanager
async def _all_or_nothing(failure: str) -> AsyncIterator[_Undo]:
    """Steps pushed on the yielded _Undo are taken back (shielded) when the block fails; an
    error that is not already a SandboxError becomes OperationFailed("<failure>: <error>")."""
    undo = _Undo()
    try:
        yield undo
    except BaseException as e:
        await asyncio.shield(undo.run())
        if isinstance(e, Exception) and not isinstance(e, SandboxError):
            raise OperationFailed(f"{failure}: {e}") from e
        raise


class SandboxManager:
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
        self._reaper: asyncio.Task[None] | None = None
        self._wake_reaper = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None

    # Lifecycle of the manager ----------------------------------------------------------------
    async def start(self) -> list[str]:
        """Reconcile the registry with the backends, then start the reaper.

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

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _locked(self, sandbox_id: str) -> AsyncIterator[SandboxRecord]:
        """Hold the sandbox's lock and yield its current record; NotFound for unknown ids,
        which get no lock (so made-up ids cannot grow the lock table)."""
        await self.get(sandbox_id)
        async with self._lock(sandbox_id):
            yield await self.get(sandbox_id)

    # Templates -------------------------------------------------------------------------------
    async def _resolve_template(self, name: str) -> TemplateInfo:
        """The template for a template name, alias, or snapshot id or name."""
        snapshot = await self.registry.find_snapshot(name)
        try:
            return await self.templates.get(snapshot.snapshot_id if snapshot else name)
        except UnknownTemplate as e:
            raise TemplateNotFound(str(e)) from e

    async def list_templates(self) -> builtins.list[TemplateInfo]:
        """Built, imported and snapshot templates (not the internal ones of forks)."""
        return [t for t in await self.templates.list() if not t.name.startswith(FORK_PREFIX)]

    async def get_template(self, name: str) -> TemplateInfo:
        return await self._resolve_template(name)

    async def delete_template(self, name: str) -> None:
        """Delete a snapshot (by id or name) or a built template, unless a sandbox uses it."""
        snapshot = await self.registry.find_snapshot(name)
        if snapshot is None and name in ALIASES:
            raise Conflict(f"'{name}' is an alias of '{ALIASES[name]}'; delete that instead")
        target = (await self._resolve_template(name)).name
        users = await self.registry.count_using_template(target)
        if users:
            raise Conflict(f"Template '{name}' is used by {users} sandbox(es); kill them first")
        try:
            await self.templates.delete(target)
        except (TemplateError, StorageError) as e:
            # e.g. a snapshot's clones (zfs) still depend on it
            raise Conflict(f"Template '{name}' cannot be deleted: {e}") from e
        if snapshot is not None:
            await self.registry.delete_snapshot(snapshot.snapshot_id)

    # Create ----------------------------------------------------------------------------------
    def _check_timeout(self, seconds: int) -> None:
        if seconds <= 0:
            raise InvalidArgument("Timeout must be greater than 0")
        if seconds > self.max_timeout:
            hours = self.max_timeout // 3600
            raise InvalidArgument(f"Timeout cannot be greater than {hours} hours")

    async def create(self, spec: CreateSpec) -> SandboxRecord:
        self._check_timeout(spec.timeout)
        info = await self._resolve_template(spec.template)
        alias = spec.template if spec.template != info.name else None
        return await self._create_from(info, alias, spec)

    def sandbox_size(self) -> tuple[int, int]:
        """(cpu count, memory MiB) every sandbox gets under the configured limits."""
        cpus = (
            math.ceil(self.limits.cpu_millicores / 1000)
            if self.limits.cpu_millicores
            else os.cpu_count() or 1
        )
        memory = self.limits.memory_bytes or os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES"
        )
        return cpus, memory // MIB

    async def _create_from(
        self, info: TemplateInfo, alias: str | None, spec: CreateSpec
    ) -> SandboxRecord:
        storage_template = info.name
        sandbox_id = new_id()
        async with _all_or_nothing("Creating the sandbox failed") as undo:
            undo.push("destroy clone", lambda: self.storage.destroy(sandbox_id))
            root = await self.storage.clone(storage_template, sandbox_id)
            undo.push("remove jail leftovers", lambda: self.runtime.destroy_leftover(sandbox_id))
            jail = await self.runtime.start(sandbox_id, root, self.limits)
            undo.push("stop jail", jail.stop)
            now = self._clock()
            cpus, memory_mb = self.sandbox_size()
            record = SandboxRecord(
                id=sandbox_id,
                template=storage_template,
                alias=alias,
                storage_ref=str(root),
                jail_handle=jail.handle,
                state="running",
                started_at=now,
                end_at=now + spec.timeout,
                metadata=dict(spec.metadata),
                env_vars=dict(spec.env_vars),
                access_token=secrets.token_hex(32) if spec.secure else None,
                secure=spec.secure,
                auto_pause=spec.auto_pause,
                allow_internet_access=spec.allow_internet_access,
                client_id=CLIENT_ID,
                memory_bytes=self.limits.memory_bytes,
                cpu_millicores=self.limits.cpu_millicores,
                pids=self.limits.pids,
                cpu_count=cpus,
                memory_mb=memory_mb,
                disk_size_mb=self.disk_size_mb,
            )
            await self.registry.insert_sandbox(record)
        await self._new_jail(LiveSandbox(record, jail, info))
        self._wake_reaper.set()
        await self.log_event(sandbox_id, "info", "sandbox created", template=storage_template)
        return record

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

    # Kill and timeouts -----------------------------------------------------------------------
    async def kill(self, sandbox_id: str) -> None:
        async with self._locked(sandbox_id) as record:
            await self._kill_locked(record)
        await self._forget(record)

    async def _kill_locked(self, record: SandboxRecord) -> None:
        """Stop the jail, destroy the root, drop the record (in that order: a failure half-way
        leaves a record that a retried kill finishes)."""
        try:
            jail = await self._jail_of(record)
            if jail is not None:
                await self._jail_ending(record.id)
                await jail.stop()
            else:
                await self.runtime.destroy_leftover(record.id)
            await self._jail_ended(record.id)
            await self.storage.destroy(record.id)
            await self.registry.delete_sandbox(record.id)
        except Exception as e:
            raise OperationFailed(f"Killing sandbox {record.id} failed: {e}") from e

    async def _forget(self, record: SandboxRecord) -> None:
        """Drop what a killed sandbox left in memory, and its fork template once unused."""
        self._locks.pop(record.id, None)
        self._metrics.forget(record.id)
        await self._collect_fork_template(record.template)

    async def _set_end(self, record: SandboxRecord, end_at: float) -> SandboxRecord:
        await self.registry.update_sandbox(record.id, end_at=end_at)
        record = replace(record, end_at=end_at)
        self._refresh_live(record)
        self._wake_reaper.set()
        return record

    async def set_timeout(self, sandbox_id: str, seconds: int) -> SandboxRecord:
        """The end time becomes now + seconds, shorter or longer than before."""
        if seconds < 0:
            raise InvalidArgument("timeout: must not be negative")
        seconds = min(seconds, self.max_timeout)
        async with self._locked(sandbox_id) as record:
            return await self._set_end(record, self._clock() + seconds)

    async def refresh(self, sandbox_id: str, seconds: int) -> SandboxRecord:
        """The end time becomes now + seconds, only if that is later."""
        async with self._locked(sandbox_id) as record:
            end = max(record.end_at, self._clock() + min(seconds, self.max_timeout))
            return await self._set_end(record, end)

    def _refresh_live(self, record: SandboxRecord) -> None:
        live = self._live.get(record.id)
        if live is not None:
            self._live[record.id] = replace(live, record=record)

    # Pause and resume ------------------------------------------------------------------------
    async def pause(self, sandbox_id: str) -> SandboxRecord:
        async with self._locked(sandbox_id) as record:
            return await self._pause_locked(record)

    async def _pause_locked(self, record: SandboxRecord) -> SandboxRecord:
        sandbox_id = record.id
        if record.state == "paused":
            raise Conflict(f"Error pausing sandbox - sandbox '{sandbox_id}' is already paused")
        jail = await self._jail_of(record)
        try:
            if jail is not None:
                await jail.freeze()
            await self.registry.update_sandbox(sandbox_id, state="paused")
        except Exception as e:
            if jail is not None:
                with contextlib.suppress(Exception):
                    await jail.thaw()
            raise OperationFailed(f"Pausing sandbox {sandbox_id} failed: {e}") from e
        record = replace(record, state="paused")
        self._refresh_live(record)
        await self.log_event(sandbox_id, "info", "sandbox paused")
        return record

    async def connect(self, sandbox_id: str, timeout_seconds: int) -> ConnectResult:
        """Running: extend the end time to now + timeout if later. Paused: resume it."""
        self._check_timeout(timeout_seconds)
        async with self._locked(sandbox_id) as record:
            if record.state == "running":
                end = max(record.end_at, self._clock() + timeout_seconds)
                return ConnectResult(await self._set_end(record, end), resumed=False)
            return ConnectResult(await self._resume_locked(record, timeout_seconds), resumed=True)

    async def resume(self, sandbox_id: str, timeout_seconds: int) -> SandboxRecord:
        self._check_timeout(timeout_seconds)
        async with self._locked(sandbox_id) as record:
            if record.state == "running":
                raise Conflict(f"Sandbox {sandbox_id} is already running")
            return await self._resume_locked(record, timeout_seconds)

    async def _resume_locked(self, record: SandboxRecord, timeout_seconds: int) -> SandboxRecord:
        """Thaw a paused sandbox, or start a new jail on its root if the old one is gone."""
        jail = await self._jail_of(record)
        started_new = jail is None
        try:
            if jail is None:
                jail = await self.runtime.start(
                    record.id, Path(record.storage_ref), self._limits(record)
                )
            else:
                await jail.thaw()
            end = self._clock() + timeout_seconds
            await self.registry.update_sandbox(
                record.id, state="running", end_at=end, jail_handle=jail.handle
            )
        except Exception as e:
            if jail is not None and started_new:
                with contextlib.suppress(Exception):
                    await jail.stop()
            raise OperationFailed(f"Resuming sandbox {record.id} failed: {e}") from e
        record = replace(record, state="running", end_at=end, jail_handle=jail.handle)
        info = await self._template_of(record)
        if started_new:
            await self._new_jail(LiveSandbox(record, jail, info))
        else:
            self._live[record.id] = LiveSandbox(record, jail, info)
        self._wake_reaper.set()
        await self.log_event(record.id, "info", "sandbox resumed")
        return record

    @staticmethod
    def _limits(record: SandboxRecord) -> Limits:
        return Limits(
            memory_bytes=record.memory_bytes,
            cpu_millicores=record.cpu_millicores,
            pids=record.pids,
        )

    async def _template_of(self, record: SandboxRecord) -> TemplateInfo:
        """The sandbox's template (for its process defaults); it cannot be deleted while used."""
        return await self._resolve_template(record.template)

    # Snapshots and forks ---------------------------------------------------------------------
    async def _template_exists(self, name: str) -> bool:
        if await self.registry.find_snapshot(name) is not None:
            return True
        try:
            await self.templates.get(name)
        except UnknownTemplate:
            return False
        return True

    async def snapshot(self, sandbox_id: str, name: str | None = None) -> SnapshotRecord:
        if name is not None:
            if not SNAPSHOT_NAME.fullmatch(name):
                raise InvalidArgument(
                    "name: use 1-128 of [A-Za-z0-9._:/-], starting with a letter or digit"
                )
            if await self._template_exists(name):
                raise Conflict(f"A template or snapshot named '{name}' already exists")
        async with self._locked(sandbox_id) as record:
            snapshot = await self._make_snapshot(record, SNAPSHOT_PREFIX, name)
        await self.log_event(sandbox_id, "info", "snapshot created", snapshot=snapshot.snapshot_id)
        return snapshot

    async def _make_snapshot(
        self, record: SandboxRecord, prefix: str, name: str | None
    ) -> SnapshotRecord:
        """A new template from the sandbox's files (frozen meanwhile, for consistency), and its
        snapshot record; on failure, neither is left."""
        snapshot = SnapshotRecord(
            snapshot_id=new_id(prefix),
            names=(name,) if name else (),
            source_sandbox=record.id,
            source_template=record.template,
            created_at=self._clock(),
        )
        jail = await self._jail_of(record) if record.state == "running" else None
        async with _all_or_nothing(f"Snapshot of sandbox {record.id} failed") as undo:
            if jail is not None:
                await jail.freeze()
                undo.push("thaw", jail.thaw)
            await self.templates.snapshot_sandbox(record.id, snapshot.snapshot_id, record.template)
            undo.push("delete template", lambda: self.templates.delete(snapshot.snapshot_id))
            if jail is not None:
                await jail.thaw()
            await self.registry.insert_snapshot(snapshot)
        return snapshot

    async def list_snapshots(
        self,
        *,
        sandbox_id: str | None = None,
        name: str | None = None,
        limit: int = 100,
        next_token: str | None = None,
    ) -> SnapshotPage:
        page = await self.registry.list_snapshots(
            source_sandbox=sandbox_id, name=name, limit=limit, next_token=next_token
        )
        # Fork templates are internal: they live only as long as their forks.
        visible = [s for s in page.items if not s.snapshot_id.startswith(FORK_PREFIX)]
        return SnapshotPage(visible, page.next_token)

    async def fork(
        self, sandbox_id: str, count: int, timeout_seconds: int
    ) -> list[SandboxRecord | SandboxError]:
        """`count` new sandboxes with the parent's files; each succeeds or fails on its own."""
        if not 1 <= count <= 100:
            raise InvalidArgument("count: must be between 1 and 100")
        self._check_timeout(timeout_seconds)
        async with self._locked(sandbox_id) as parent:
            template = await self._make_snapshot(parent, FORK_PREFIX, None)
        info = await self._resolve_template(template.snapshot_id)
        spec = CreateSpec(
            template=template.snapshot_id,
            timeout=timeout_seconds,
            metadata=parent.metadata,
            env_vars=parent.env_vars,
            secure=parent.secure,
            auto_pause=parent.auto_pause,
            allow_internet_access=parent.allow_internet_access,
        )
        alias = parent.alias or parent.template
        results: list[SandboxRecord | SandboxError] = []
        for _ in range(count):
            try:
                results.append(await self._create_from(info, alias, spec))
            except SandboxError as e:
                results.append(e)
        await self.log_event(sandbox_id, "info", "sandbox forked", count=str(count))
        await self._collect_fork_template(template.snapshot_id)
        return results

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

    # Metrics and logs ------------------------------------------------------------------------
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

    # Reaper ----------------------------------------------------------------------------------
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

    # Reconciliation --------------------------------------------------------------------------
    async def reconcile(self) -> list[str]:
        """Make the registry and the backends agree after a (re)start; returns what was fixed.

        Running records whose jail died get a new jail on their existing root (or, if that
        fails, are kept as paused, filesystem only). Clones and jails that no record owns are
        destroyed. No record is dropped.
        """
        report: list[str] = []
        records = await self.registry.all_sandboxes()
        known = {r.id for r in records}
        for record in records:
            report.extend(await self._reattach(record))
        for orphan in sorted(set(await self.runtime.list_jails()) - known):
            try:
                await self.runtime.destroy_leftover(orphan)
                report.append(f"destroyed jail {orphan} (no record)")
            except Exception as e:
                report.append(f"could not destroy orphan jail {orphan}: {e}")
        for orphan in sorted(set(await self.storage.list_sandboxes()) - known):
            try:
                await self.storage.destroy(orphan)
                report.append(f"destroyed storage of {orphan} (no record)")
            except Exception as e:
                report.append(f"could not destroy orphan storage {orphan}: {e}")
        for template in await self.storage.list_templates():
            if template.startswith(FORK_PREFIX):
                await self._collect_fork_template(template)
        return report

    async def _reattach(self, record: SandboxRecord) -> list[str]:
        root = Path(record.storage_ref)
        jail = await self.runtime.attach(record.id, root, record.jail_handle)
        info = await self._template_of(record)
        if jail is not None:
            if record.state == "running":  # alive, but new to this process's observers
                await self._new_jail(LiveSandbox(record, jail, info))
            else:
                self._live[record.id] = LiveSandbox(record, jail, info)
            return []
        if record.state == "paused":
            return []  # paused sandboxes survive a restart as their filesystem; resume restarts
        try:
            await self.runtime.destroy_leftover(record.id)
            jail = await self.runtime.start(record.id, root, self._limits(record))
        except Exception as e:
            await self.registry.update_sandbox(record.id, state="paused")
            message = f"jail of sandbox {record.id} was dead and could not be restarted: {e}"
            await self.log_event(record.id, "error", message)
            return [message + "; kept as paused"]
        await self.registry.update_sandbox(record.id, jail_handle=jail.handle)
        await self._new_jail(LiveSandbox(replace(record, jail_handle=jail.handle), jail, info))
        await self.log_event(record.id, "warn", "jail was dead after a restart; started a new one")
        return [f"restarted the dead jail of sandbox {record.id}"]
