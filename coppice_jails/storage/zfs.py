"""ZFS storage: templates are datasets with an `@base` snapshot, sandboxes are clones of it.

Layout under the parent dataset DS (same `zfs` CLI on FreeBSD, Linux OpenZFS and zfs-fuse):
  DS/templates/NAME@base   a template; it counts as one only once `@base` exists, which is
                           the last step of making it
  DS/sandboxes/ID          a sandbox root: `zfs clone DS/templates/NAME@base DS/sandboxes/ID`
A template being made carries the user property `coppice:builder=PID`; one without `@base`
whose builder has died is a leftover and is destroyed the next time the storage is used.

Snapshotting a sandbox clones `ID@base` into the template's place and promotes the clone, so
the new template owns the snapshot (its `@base` appears at that moment) and the sandbox
becomes its clone: the sandbox stays usable and mounted, and can be destroyed while the
template lives on, with no copy. (No `zfs rename`: it unmounts every clone of the dataset.)
Each sandbox records the template it was cloned from (`coppice:template`), so deleting a
template can tell a sandbox that only depends on it through such a promotion (and promotes
it back first) from one cloned from it (which makes the template in use). A template keeps
depending on its parent template, so a parent cannot be deleted while templates or
sandboxes made from it exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from coppice_jails.storage.base import (
    CommandFailed,
    Storage,
    StorageError,
    check_name,
    pid_is_alive,
    run_command,
)

SNAPSHOT = "base"
BUILDER_PROPERTY = "coppice:builder"
TEMPLATE_PROPERTY = "coppice:template"
# zfs-fuse answers "dataset is busy" to most first destroys of a mounted clone; retrying every
# 50 ms after an unmount succeeds within one or two attempts (platform notes §5).
BUSY_RETRY_SECONDS = 0.05
BUSY_RETRY_ATTEMPTS = 100
DETACH_COPIES_AFTER_ATTEMPTS = 5


def _missing(error: CommandFailed) -> bool:
    return "does not exist" in error.stderr or "could not find" in error.stderr


def _busy(error: CommandFailed) -> bool:
    return "busy" in error.stderr


class ZfsStorage(Storage):
    name = "zfs"

    def __init__(self, dataset: str) -> None:
        if not dataset or dataset.startswith("/") or dataset.endswith("/") or "@" in dataset:
            raise StorageError(f"invalid ZFS dataset {dataset!r}: expected POOL/path")
        self.dataset = dataset
        self._templates = f"{dataset}/templates"
        self._sandboxes = f"{dataset}/sandboxes"
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._sandboxes_mountpoint: Path | None = None

    # Plumbing -------------------------------------------------------------------------------
    async def _zfs(self, *args: str) -> str:
        return await run_command("zfs", *args)

    async def _ensure_ready(self) -> None:
        """Create the parent datasets and drop leftovers of interrupted template work, once."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            try:
                await self._zfs("list", "-H", "-o", "name", self.dataset)
            except CommandFailed as e:
                raise StorageError(
                    f"ZFS dataset {self.dataset!r} is not usable (create it first, e.g. "
                    f"`zfs create -p {self.dataset}`): {e.stderr.strip()}"
                ) from e
            for child in (self._templates, self._sandboxes):
                try:
                    await self._zfs("create", "-p", child)
                except CommandFailed as e:
                    if "already exists" not in e.stderr:
                        raise
            await self._drop_unfinished_templates()
            self._sandboxes_mountpoint = await self._mountpoint(self._sandboxes)
            self._ready = True

    async def _children(self, parent: str) -> list[str]:
        out = await self._zfs("list", "-H", "-o", "name", "-t", "filesystem", "-d", "1", parent)
        prefix = parent + "/"
        return sorted(line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix))

    async def _mountpoint(self, dataset: str) -> Path:
        value = (await self._zfs("get", "-H", "-o", "value", "mountpoint", dataset)).strip()
        if not value.startswith("/"):
            raise StorageError(f"dataset {dataset} has no mountpoint (mountpoint={value})")
        return Path(value)

    async def _mounted_root(self, dataset: str) -> Path:
        mounted = (await self._zfs("get", "-H", "-o", "value", "mounted", dataset)).strip()
        if mounted != "yes":
            await self._zfs("mount", dataset)
        return await self._mountpoint(dataset)

    async def _destroy_dataset(self, dataset: str) -> None:
        """Destroy a dataset and its snapshots; a missing dataset is already destroyed.

        zfs-fuse answers "busy" while the dataset is mounted anywhere: unmount and retry. A
        mount namespace created while it was mounted (a jail that did not detach the host's
        mounts) keeps a copy that nothing but that namespace's end releases; after a few
        attempts, detach such copies of this dataset's mount in the other namespaces.
        """
        for attempt in range(BUSY_RETRY_ATTEMPTS):
            if attempt == DETACH_COPIES_AFTER_ATTEMPTS:
                await self._detach_copies_elsewhere(dataset)
            try:
                await self._zfs("unmount", dataset)
            except CommandFailed as e:
                if _missing(e):
                    return
                # "not currently mounted" and transient busy both mean: just try to destroy.
            try:
                await self._zfs("destroy", "-r", dataset)
                return
            except CommandFailed as e:
                if _missing(e):
                    return
                if "dependent clones" in e.stderr:
                    dependents = [
                        line.strip()
                        for line in e.stderr.splitlines()
                        if line.strip().startswith(self.dataset + "/")
                    ]
                    raise StorageError(
                        f"{dataset} is in use by: {', '.join(dependents) or e.stderr.strip()}"
                    ) from e
                if not _busy(e) or attempt == BUSY_RETRY_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(BUSY_RETRY_SECONDS)

    async def _detach_copies_elsewhere(self, dataset: str) -> None:
        try:
            mountpoint = str(await self._mountpoint(dataset))
        except StorageError:
            return  # a snapshot, or mountpoint=none: no mount to hold it
        for pid in await asyncio.to_thread(other_mount_namespace_pids):
            # Not mounted there is the usual answer; any failure just leaves the retry to fail.
            with contextlib.suppress(StorageError):
                await run_command(
                    "nsenter", f"--mount=/proc/{pid}/ns/mnt", "umount", "-l", "--", mountpoint
                )

    async def _drop_unfinished_templates(self) -> None:
        out = await self._zfs(
            "list",
            "-H",
            "-o",
            f"name,{BUILDER_PROPERTY}",
            "-t",
            "filesystem",
            "-d",
            "1",
            self._templates,
        )
        finished = set(await self._finished_templates())
        prefix = self._templates + "/"
        for line in out.splitlines():
            dataset, _, builder = line.partition("\t")
            name = dataset[len(prefix) :]
            builder_alive = builder.isdigit() and pid_is_alive(int(builder))
            if dataset.startswith(prefix) and name not in finished and not builder_alive:
                await self._destroy_dataset(dataset)

    # Templates ------------------------------------------------------------------------------
    async def template_root(self, template: str) -> Path:
        await self._require_template(template)
        return await self._mounted_root(f"{self._templates}/{template}")

    async def add_template(self, template: str, source: Path) -> None:
        check_name("template", template)
        await self._ensure_ready()
        if await self.has_template(template):
            raise StorageError(f"template {template!r} already exists")
        if not await asyncio.to_thread(source.is_dir):
            raise StorageError(f"template source {source} is not a directory")
        dataset = f"{self._templates}/{template}"
        try:
            await self._zfs("create", "-o", f"{BUILDER_PROPERTY}={os.getpid()}", dataset)
        except CommandFailed as e:
            if "already exists" in e.stderr:
                raise StorageError(f"template {template!r} already exists") from e
            raise
        try:
            root = await self._mounted_root(dataset)
            await run_command("cp", "-a", "--reflink=auto", f"{source}/.", f"{root}/")
            await self._zfs("set", "readonly=on", dataset)
            await self._zfs("snapshot", f"{dataset}@{SNAPSHOT}")
        except BaseException:
            await asyncio.shield(self._destroy_dataset(dataset))
            raise

    async def has_template(self, template: str) -> bool:
        check_name("template", template)
        return template in await self.list_templates()

    async def list_templates(self) -> list[str]:
        await self._ensure_ready()
        return await self._finished_templates()

    async def _finished_templates(self) -> list[str]:
        out = await self._zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", self._templates)
        prefix, suffix = self._templates + "/", "@" + SNAPSHOT
        names = []
        for line in out.splitlines():
            if line.startswith(prefix) and line.endswith(suffix):
                name = line[len(prefix) : -len(suffix)]
                if "/" not in name:
                    names.append(name)
        return sorted(names)

    async def template_size(self, template: str) -> int:
        await self._require_template(template)
        out = await self._zfs(
            "get", "-H", "-p", "-o", "value", "referenced", f"{self._templates}/{template}"
        )
        return int(out.strip())

    async def delete_template(self, template: str) -> None:
        check_name("template", template)
        await self._ensure_ready()
        dataset = f"{self._templates}/{template}"
        origin = f"{dataset}@{SNAPSHOT}"
        out = await self._zfs(
            "list", "-H", "-o", f"name,origin,{TEMPLATE_PROPERTY}", "-t", "filesystem", "-r",
            self.dataset,
        )  # fmt: skip
        promoted_sources, users = [], []
        for line in out.splitlines():
            name, clone_origin, cloned_from = line.split("\t")
            if clone_origin != origin:
                continue
            if name.startswith(self._sandboxes + "/") and cloned_from not in ("-", template):
                promoted_sources.append(name)  # depends on it only since snapshot() promoted
            else:
                users.append(name)
        if users:
            raise StorageError(f"template {template!r} is in use by: {', '.join(users)}")
        for sandbox in promoted_sources:
            # Hand the snapshot back: the template becomes a clone of the sandbox, deletable.
            await self._zfs("promote", sandbox)
        await self._destroy_dataset(dataset)

    async def _require_template(self, template: str) -> None:
        if not await self.has_template(template):
            raise StorageError(f"no template {template!r} in ZFS dataset {self.dataset}")

    # Sandboxes ------------------------------------------------------------------------------
    async def clone(self, template: str, sandbox_id: str) -> Path:
        check_name("template", template)
        check_name("sandbox", sandbox_id)
        await self._ensure_ready()
        dataset = f"{self._sandboxes}/{sandbox_id}"
        try:
            await self._zfs(
                "clone", "-o", f"{TEMPLATE_PROPERTY}={template}",
                f"{self._templates}/{template}@{SNAPSHOT}", dataset,
            )  # fmt: skip
        except CommandFailed as e:
            if "exists" in e.stderr and "does not exist" not in e.stderr:
                raise StorageError(f"sandbox {sandbox_id!r} already exists") from e
            if _missing(e):
                raise StorageError(f"no template {template!r} in {self.dataset}") from e
            raise
        # The clone inherits its parent's mountpoint; ask zfs only if something overrode it.
        assert self._sandboxes_mountpoint is not None
        root = self._sandboxes_mountpoint / sandbox_id
        if not await asyncio.to_thread(os.path.ismount, root):
            try:
                root = await self._mounted_root(dataset)
            except BaseException:
                await asyncio.shield(self._destroy_dataset(dataset))
                raise
        return root

    async def snapshot(self, sandbox_id: str, template: str) -> None:
        check_name("sandbox", sandbox_id)
        check_name("template", template)
        await self._ensure_ready()
        if await self.has_template(template):
            raise StorageError(f"template {template!r} already exists")
        sandbox = f"{self._sandboxes}/{sandbox_id}"
        snapshot = f"{sandbox}@{SNAPSHOT}"
        dataset = f"{self._templates}/{template}"
        # A snapshot left by an interrupted earlier attempt would block ours.
        await self._destroy_dataset(snapshot)
        try:
            await self._zfs("snapshot", snapshot)
        except CommandFailed as e:
            if _missing(e):
                raise StorageError(f"no sandbox {sandbox_id!r}") from e
            raise
        try:
            await self._zfs(
                "clone",
                "-o",
                f"{BUILDER_PROPERTY}={os.getpid()}",
                "-o",
                "readonly=on",
                snapshot,
                dataset,
            )
        except CommandFailed as e:
            await asyncio.shield(self._destroy_dataset(snapshot))
            if "already exists" in e.stderr:
                raise StorageError(f"template {template!r} already exists") from e
            raise
        try:
            # The clone takes over the snapshot: the sandbox becomes a clone of the template.
            await self._zfs("promote", dataset)
        except BaseException:
            await asyncio.shield(self._destroy_dataset(dataset))
            await asyncio.shield(self._destroy_dataset(snapshot))
            raise

    async def destroy(self, sandbox_id: str) -> None:
        check_name("sandbox", sandbox_id)
        await self._ensure_ready()
        await self._destroy_dataset(f"{self._sandboxes}/{sandbox_id}")

    async def disk_used(self, sandbox_id: str) -> int:
        check_name("sandbox", sandbox_id)
        out = await self._zfs(
            "get", "-H", "-p", "-o", "value", "referenced", f"{self._sandboxes}/{sandbox_id}"
        )
        return int(out.strip())

    async def list_sandboxes(self) -> list[str]:
        await self._ensure_ready()
        return await self._children(self._sandboxes)


def other_mount_namespace_pids() -> list[int]:
    """One pid for each mount namespace other than ours that we may enter (kernel threads and
    processes whose namespace we cannot read are left alone)."""
    seen = {os.readlink("/proc/self/ns/mnt")}
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry.name}/ns/mnt")
            os.readlink(f"/proc/{entry.name}/exe")  # kernel threads have none
        except OSError:
            continue
        if namespace not in seen:
            seen.add(namespace)
            pids.append(int(entry.name))
    return pids
