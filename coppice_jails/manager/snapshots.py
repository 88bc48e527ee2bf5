"""Templates as the API sees them, snapshots of a sandbox's files, and forks (sandboxes made
from an internal snapshot that lives only as long as they do)."""

from __future__ import annotations

import builtins

from coppice_jails.manager.errors import Conflict, InvalidArgument, SandboxError
from coppice_jails.manager.lifecycle import Lifecycle
from coppice_jails.manager.model import (
    FORK_PREFIX,
    SNAPSHOT_NAME,
    SNAPSHOT_PREFIX,
    CreateSpec,
    new_id,
)
from coppice_jails.manager.rollback import all_or_nothing
from coppice_jails.registry import SandboxRecord, SnapshotPage, SnapshotRecord
from coppice_jails.storage.base import StorageError
from coppice_jails.templates import ALIASES, TemplateError, TemplateInfo, UnknownTemplate


class Snapshots(Lifecycle):
    # Templates -------------------------------------------------------------------------------
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

    async def _template_exists(self, name: str) -> bool:
        if await self.registry.find_snapshot(name) is not None:
            return True
        try:
            await self.templates.get(name)
        except UnknownTemplate:
            return False
        return True

    # Snapshots -------------------------------------------------------------------------------
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
        async with all_or_nothing(f"Snapshot of sandbox {record.id} failed") as undo:
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

    # Forks -----------------------------------------------------------------------------------
    async def fork(
        self, sandbox_id: str, count: int, timeout_seconds: int
    ) -> builtins.list[SandboxRecord | SandboxError]:
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
            allow_public_traffic=False if parent.traffic_access_token else None,
        )
        alias = parent.alias or parent.template
        results: builtins.list[SandboxRecord | SandboxError] = []
        for _ in range(count):
            try:
                results.append(await self._create_from(info, alias, spec))
            except SandboxError as e:
                results.append(e)
        await self.log_event(sandbox_id, "info", "sandbox forked", count=str(count))
        await self._collect_fork_template(template.snapshot_id)
        return results
