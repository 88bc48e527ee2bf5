"""Reconciliation after a (re)start: the registry and the backends are made to agree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from coppice_jails.manager.base import ManagerBase
from coppice_jails.manager.model import FORK_PREFIX, LiveSandbox
from coppice_jails.registry import SandboxRecord


class Reconciler(ManagerBase):
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
