"""overlayfs storage: templates are plain trees, sandboxes are overlay mounts on top of them.

Layout under the base directory B (must be on a filesystem overlayfs accepts as upper, e.g.
ext4 or xfs — not zfs-fuse):
  B/templates/NAME/rootfs                   a template's tree (the lowerdir)
  B/sandboxes/ID/{upper,work,merged}        a sandbox: merged = overlay(lower=rootfs, upper)
  B/sandboxes/ID/template                   which template the sandbox stacks on
  B/incoming/PID-NAME/rootfs                a template being made by process PID
  B/trash/PID-NAME                          being deleted

A snapshot copies the sandbox's merged view into a new, independent template tree, so it
survives the sandbox and its parent template. A template cannot be deleted while a sandbox
stacks on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

from coppice_jails._libc import MNT_DETACH, libc
from coppice_jails.storage.base import (
    Storage,
    StorageError,
    check_name,
    leftover_owner_is_dead,
    run_command,
)


def _mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise StorageError(
            f"mount -t overlay -o {options} {target} failed: {os.strerror(err)} "
            "(the data directory must be on a filesystem overlayfs accepts as upper, e.g. ext4)"
        )


def _unmount(target: Path) -> None:
    """Unmount if mounted; fall back to a lazy unmount while something still holds it."""
    path = os.fsencode(target)
    if libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more), or gone
        return
    if err == errno.EBUSY and libc.umount2(path, MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    raise StorageError(f"umount {target} failed: {os.strerror(err)}")


def _tree_size(root: Path) -> int:
    """Disk usage of a tree (allocated blocks, hard links counted once), like `du -s`."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return total + os.lstat(root).st_blocks * 512


class OverlayStorage(Storage):
    name = "overlay"

    def __init__(self, base_dir: Path) -> None:
        base_dir = Path(base_dir).absolute()
        # overlayfs mount options are separated by ',' and lowerdirs by ':'.
        if any(c in str(base_dir) for c in ",:\\"):
            raise StorageError(f"overlay base directory {base_dir} must not contain , : or \\")
        self.base_dir = base_dir
        self._templates = base_dir / "templates"
        self._sandboxes = base_dir / "sandboxes"
        self._incoming = base_dir / "incoming"
        self._trash = base_dir / "trash"
        self._ready = False
        self._template_sizes: dict[str, int] = {}

    # Plumbing -------------------------------------------------------------------------------
    def _ensure_ready(self) -> None:
        """Create the layout and drop leftovers of interrupted work (runs in a thread)."""
        if self._ready:
            return
        for d in (self._templates, self._sandboxes, self._incoming, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        for entry in self._incoming.iterdir():
            if leftover_owner_is_dead(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self._trash.iterdir():
            if leftover_owner_is_dead(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
        self._ready = True

    def _work_entry(self, parent: Path, name: str) -> Path:
        return parent / f"{os.getpid()}-{name}"

    def _template_rootfs(self, template: str) -> Path:
        return self._templates / check_name("template", template) / "rootfs"

    def _sandbox_dir(self, sandbox_id: str) -> Path:
        return self._sandboxes / check_name("sandbox", sandbox_id)

    # Templates ------------------------------------------------------------------------------
    async def template_root(self, template: str) -> Path:
        rootfs = self._template_rootfs(template)
        if not await self.has_template(template):
            raise StorageError(f"no template {template!r} in {self._templates}")
        return rootfs

    async def add_template(self, template: str, source: Path) -> None:
        check_name("template", template)
        await asyncio.to_thread(self._ensure_ready)
        if await self.has_template(template):
            raise StorageError(f"template {template!r} already exists")
        if not await asyncio.to_thread(source.is_dir):
            raise StorageError(f"template source {source} is not a directory")
        incoming = self._work_entry(self._incoming, template)
        await asyncio.to_thread(self._prepare_incoming, incoming)
        try:
            same_fs = (await asyncio.to_thread(os.stat, source)).st_dev == (
                await asyncio.to_thread(os.stat, incoming)
            ).st_dev
            if same_fs:
                await asyncio.to_thread(os.rename, source, incoming / "rootfs")
            else:
                await self._copy_tree(source, incoming / "rootfs")
            await asyncio.to_thread(self._publish, incoming, template)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            raise

    def _prepare_incoming(self, incoming: Path) -> None:
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.mkdir()

    async def _copy_tree(self, source: Path, target: Path) -> None:
        # -x: a sandbox's merged view may have mounts on it (in other namespaces); stay on it.
        await run_command("cp", "-a", "-x", "--reflink=auto", "--", str(source), str(target))

    def _publish(self, incoming: Path, template: str) -> None:
        target = self._templates / template
        try:
            # rename(2) would replace an empty directory; mkdir first to refuse any existing one.
            target.mkdir()
        except FileExistsError as e:
            raise StorageError(f"template {template!r} already exists") from e
        try:
            os.rename(incoming / "rootfs", target / "rootfs")
        except BaseException:
            target.rmdir()
            raise
        incoming.rmdir()

    async def has_template(self, template: str) -> bool:
        return await asyncio.to_thread(self._template_rootfs(template).is_dir)

    async def list_templates(self) -> list[str]:
        def names() -> list[str]:
            self._ensure_ready()
            return sorted(e.name for e in self._templates.iterdir() if (e / "rootfs").is_dir())

        return await asyncio.to_thread(names)

    async def template_size(self, template: str) -> int:
        return await asyncio.to_thread(_tree_size, await self.template_root(template))

    async def delete_template(self, template: str) -> None:
        check_name("template", template)
        self._template_sizes.pop(template, None)

        def delete() -> None:
            self._ensure_ready()
            users = sorted(
                e.name for e in self._sandboxes.iterdir() if _read_text(e / "template") == template
            )
            if users:
                raise StorageError(
                    f"template {template!r} is in use by sandboxes: {', '.join(users)}"
                )
            doomed = self._work_entry(self._trash, template)
            try:
                os.rename(self._templates / template, doomed)
            except FileNotFoundError:
                return
            shutil.rmtree(doomed)

        await asyncio.to_thread(delete)

    # Sandboxes ------------------------------------------------------------------------------
    async def clone(self, template: str, sandbox_id: str) -> Path:
        lower = self._template_rootfs(template)
        sandbox = self._sandbox_dir(sandbox_id)

        def make() -> Path:
            self._ensure_ready()
            if not lower.is_dir():
                raise StorageError(f"no template {template!r} in {self._templates}")
            try:
                sandbox.mkdir()
            except FileExistsError as e:
                raise StorageError(f"sandbox {sandbox_id!r} already exists") from e
            try:
                (sandbox / "template").write_text(template)
                for d in ("upper", "work", "merged"):
                    (sandbox / d).mkdir()
                _mount_overlay(lower, sandbox / "upper", sandbox / "work", sandbox / "merged")
            except BaseException:
                shutil.rmtree(sandbox, ignore_errors=True)
                raise
            return sandbox / "merged"

        return await asyncio.to_thread(make)

    async def snapshot(self, sandbox_id: str, template: str) -> None:
        merged = self._sandbox_dir(sandbox_id) / "merged"
        check_name("template", template)
        if not await asyncio.to_thread(os.path.ismount, merged):
            raise StorageError(f"no mounted sandbox {sandbox_id!r}")
        if await self.has_template(template):
            raise StorageError(f"template {template!r} already exists")
        incoming = self._work_entry(self._incoming, template)
        await asyncio.to_thread(self._prepare_incoming, incoming)
        try:
            await self._copy_tree(merged, incoming / "rootfs")
            await asyncio.to_thread(self._publish, incoming, template)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            raise

    async def destroy(self, sandbox_id: str) -> None:
        sandbox = self._sandbox_dir(sandbox_id)

        def remove() -> None:
            self._ensure_ready()
            _unmount(sandbox / "merged")
            # Rename first so a half-removed sandbox never shows up in list_sandboxes.
            doomed = self._work_entry(self._trash, sandbox_id)
            try:
                os.rename(sandbox, doomed)
            except FileNotFoundError:
                return
            shutil.rmtree(doomed)

        await asyncio.to_thread(remove)

    async def disk_used(self, sandbox_id: str) -> int:
        sandbox = self._sandbox_dir(sandbox_id)

        def measure() -> tuple[str, int]:
            return (sandbox / "template").read_text(), _tree_size(sandbox / "upper")

        try:
            template, written = await asyncio.to_thread(measure)
        except FileNotFoundError as e:
            raise StorageError(f"no sandbox {sandbox_id!r}") from e
        # Templates never change: each is measured once. (A file the sandbox changed counts in
        # both layers, as it does take space in both.)
        if template not in self._template_sizes:
            self._template_sizes[template] = await self.template_size(template)
        return self._template_sizes[template] + written

    async def list_sandboxes(self) -> list[str]:
        def names() -> list[str]:
            self._ensure_ready()
            return sorted(e.name for e in self._sandboxes.iterdir())

        return await asyncio.to_thread(names)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
