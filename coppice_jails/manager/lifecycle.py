"""Create, kill, pause, resume, connect, and move a sandbox's end time."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import replace
from pathlib import Path

from coppice_jails.manager.base import ManagerBase
from coppice_jails.manager.errors import Conflict, InvalidArgument, OperationFailed
from coppice_jails.manager.model import (
    CLIENT_ID,
    MIB,
    ConnectResult,
    CreateSpec,
    LiveSandbox,
    new_id,
)
from coppice_jails.manager.rollback import all_or_nothing
from coppice_jails.registry import SandboxRecord
from coppice_jails.templates import TemplateInfo


class Lifecycle(ManagerBase):
    # Create ----------------------------------------------------------------------------------
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
        async with all_or_nothing("Creating the sandbox failed") as undo:
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
                traffic_access_token=(
                    secrets.token_hex(32) if spec.allow_public_traffic is False else None
                ),
            )
            await self.registry.insert_sandbox(record)
        await self._new_jail(LiveSandbox(record, jail, info))
        self._wake_reaper.set()
        await self.log_event(sandbox_id, "info", "sandbox created", template=storage_template)
        return record

    # Kill ------------------------------------------------------------------------------------
    async def kill(self, sandbox_id: str) -> None:
        async with self._locked(sandbox_id) as record:
            await self._kill_locked(record)
        await self._forget(record)

    async def _kill_locked(self, record: SandboxRecord) -> None:
        """Stop the jail, destroy the root, drop the record (in that order: a failure half-way
        leaves a record that a retried kill finishes, so nothing is rolled back)."""
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

    # End time --------------------------------------------------------------------------------
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
        async with all_or_nothing(f"Pausing sandbox {sandbox_id} failed") as undo:
            if jail is not None:
                # Pushed first: a freeze that fails half-way may have frozen some processes.
                undo.push("thaw", jail.thaw)
                await jail.freeze()
            await self.registry.update_sandbox(sandbox_id, state="paused")
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
        old_jail = await self._jail_of(record)
        async with all_or_nothing(f"Resuming sandbox {record.id} failed") as undo:
            if old_jail is None:
                jail = await self.runtime.start(
                    record.id, Path(record.storage_ref), self._limits(record)
                )
                undo.push("stop jail", jail.stop)
            else:
                jail = old_jail
                await jail.thaw()
                # The registry still says paused if the update below fails: so must the jail.
                undo.push("freeze again", jail.freeze)
            end = self._clock() + timeout_seconds
            await self.registry.update_sandbox(
                record.id, state="running", end_at=end, jail_handle=jail.handle
            )
        record = replace(record, state="running", end_at=end, jail_handle=jail.handle)
        info = await self._template_of(record)
        if old_jail is None:
            await self._new_jail(LiveSandbox(record, jail, info))
        else:
            self._live[record.id] = LiveSandbox(record, jail, info)
        self._wake_reaper.set()
        await self.log_event(record.id, "info", "sandbox resumed")
        return record
