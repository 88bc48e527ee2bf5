"""The template store: a root filesystem in a Storage plus metadata (default user, workdir, env).

Metadata lives as JSON in `<data_dir>/templates/<name>.json`, written atomically and last, so
a template counts only once both its files and its metadata exist. Templates come from the
builder (builder.py), from a rootfs tarball, or from a sandbox's snapshot. Work in progress
happens in `<data_dir>/build/<pid>-<name>` under a per-name lock file; leftovers of a process
that died are removed the next time the store is used.

Storage layout note: give OverlayStorage a base directory other than `<data_dir>` itself
(e.g. `<data_dir>/overlay`): its `templates/<name>/` dirs would share a directory with the
metadata files here.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import fcntl
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

from coppice_jails._libc import MNT_DETACH, libc
from coppice_jails.confined import ConfinedRoot
from coppice_jails.storage.base import (
    Storage,
    StorageError,
    check_name,
    leftover_owner_is_dead,
)
from coppice_jails.templates.builder import NPM_REGISTRY, RECIPES, Recipe, TemplateBuilder
from coppice_jails.templates.model import (
    ALIASES,
    DEFAULT_ENV,
    DEFAULT_USER,
    Progress,
    TemplateError,
    TemplateInfo,
    UnknownTemplate,
    quiet,
)
from coppice_jails.templates.run import run_logged
from coppice_jails.templates.tarball import check_tar_members
from coppice_jails.users import UnknownUser, lookup_user

_LOCK_POLL_SECONDS = 0.2


class TemplateStore:
    """Templates of one data dir on one Storage. All methods are safe to call from the loop."""

    def __init__(
        self,
        data_dir: Path,
        storage: Storage,
        cache_dir: Path | None = None,
        mirror: str | None = None,
        npm_registry: str = NPM_REGISTRY,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.storage = storage
        self._meta_dir = self.data_dir / "templates"
        self._build_dir = self.data_dir / "build"
        cache = Path(cache_dir).absolute() if cache_dir else self.data_dir / "cache"
        self._builder = TemplateBuilder(cache, mirror, npm_registry)
        self._ready = False
        self._ready_lock = asyncio.Lock()

    # Queries --------------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """The template an alias stands for (`default` → `base`)."""
        return ALIASES.get(name, name)

    async def list(self) -> list[TemplateInfo]:
        await self._ensure_ready()
        in_storage = set(await self.storage.list_templates())
        infos = await asyncio.to_thread(self._read_all_metadata)
        return [info for info in infos if info.name in in_storage]

    async def get(self, name: str) -> TemplateInfo:
        """A template's metadata (aliases resolved); UnknownTemplate names the available ones."""
        await self._ensure_ready()
        resolved = self.resolve(name)
        info = await asyncio.to_thread(self._read_metadata, resolved)
        if info is None:
            await self._raise_unknown(name)
        assert info is not None
        return info

    async def root(self, name: str) -> Path:
        """Where the template's files are (for reading only)."""
        return await self.storage.template_root((await self.get(name)).name)

    async def _raise_unknown(self, name: str) -> None:
        available = sorted({i.name for i in await self.list()} | set(ALIASES))
        buildable = sorted(set(RECIPES) - set(available))
        message = f"unknown template {name!r}; available: {', '.join(available) or 'none'}"
        if buildable:
            message += f" (buildable: {', '.join(buildable)})"
        raise UnknownTemplate(message)

    # Making and removing --------------------------------------------------------------------
    async def ensure(self, name: str, progress: Progress | None = None) -> TemplateInfo:
        """The template, built first if it is a known recipe that has not been built yet."""
        resolved = self.resolve(name)
        with contextlib.suppress(UnknownTemplate):
            info = await self.get(resolved)
            if await self.storage.has_template(info.name):
                return info
            if resolved not in RECIPES:
                raise TemplateError(
                    f"template {name!r} has no files in {self.storage.name} storage "
                    f"(made with {info.backend}?); import it again"
                )
        if resolved not in RECIPES:
            await self._raise_unknown(name)
        return await self._build(resolved, progress or quiet, exist_ok=True)

    async def build(self, name: str, progress: Progress | None = None) -> TemplateInfo:
        """Build a template from its recipe (`base`, `code-interpreter-v1`)."""
        resolved = self.resolve(name)
        if resolved not in RECIPES:
            raise TemplateError(
                f"no recipe to build {name!r}; buildable: {', '.join(sorted(RECIPES))}"
            )
        return await self._build(resolved, progress or quiet, exist_ok=False)

    async def import_tar(
        self, name: str, tar_path: Path, progress: Progress | None = None
    ) -> TemplateInfo:
        """A template from a root filesystem tarball (plain or compressed)."""
        say = progress or quiet
        self._check_new_name(name)
        tar_path = Path(tar_path)
        async with self._creating(name) as work:
            say(f"checking {tar_path}")
            count = await asyncio.to_thread(check_tar_members, tar_path)
            rootfs = work / "rootfs"
            await asyncio.to_thread(rootfs.mkdir)
            say(f"unpacking {count} entries")
            await run_logged(
                [
                    "tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
                    "-f", str(tar_path), "-C", str(rootfs),
                ],
                say,
            )  # fmt: skip
            return await self._publish(name, rootfs, say, origin="import")

    async def snapshot_sandbox(self, sandbox_id: str, name: str, parent: str) -> TemplateInfo:
        """A new template from a sandbox's current files, inheriting its template's defaults."""
        self._check_new_name(name)
        parent_info = await self.get(parent)
        async with self._creating(name):
            await self.storage.snapshot(sandbox_id, name)
            info = TemplateInfo(
                name=name,
                backend=self.storage.name,
                created=_now(),
                size_bytes=await self.storage.template_size(name),
                user=parent_info.user,
                workdir=parent_info.workdir,
                env=dict(parent_info.env),
                origin="snapshot",
                parent=parent_info.name,
            )
            await asyncio.to_thread(self._write_metadata, info)
            return info

    async def delete(self, name: str) -> None:
        """Remove a template (refused while sandboxes or other templates depend on it)."""
        info = await self.get(name)
        if name in ALIASES:
            raise TemplateError(f"{name!r} is an alias of {info.name!r}; delete that instead")
        async with self._name_lock(info.name):
            # Files first: if they are in use, the metadata must stay.
            await self.storage.delete_template(info.name)
            await asyncio.to_thread(self._metadata_path(info.name).unlink, True)

    # Building -------------------------------------------------------------------------------
    async def _build(self, name: str, say: Progress, exist_ok: bool) -> TemplateInfo:
        recipe = RECIPES[name]
        parent = await self.ensure(recipe.parent, say) if recipe.parent else None
        started = time.monotonic()
        async with self._creating(name, exist_ok=exist_ok) as work:
            existing = await asyncio.to_thread(self._read_metadata, name)
            if existing is not None:
                if await self.storage.has_template(name):
                    return existing  # built by someone else while we waited for the lock
                # Metadata without files: made on another storage backend; build for this one.
                await asyncio.to_thread(self._metadata_path(name).unlink)
            rootfs = work / "rootfs"
            parent_root = await self.storage.template_root(parent.name) if parent else None
            await self._builder.build_tree(recipe, rootfs, parent_root, say)
            info = await self._publish(name, rootfs, say, origin="build", recipe=recipe)
        say(f"[{name}] built in {time.monotonic() - started:.1f} s ({info.size_bytes >> 20} MiB)")
        return info

    async def _publish(
        self,
        name: str,
        rootfs: Path,
        say: Progress,
        origin: str,
        recipe: Recipe | None = None,
    ) -> TemplateInfo:
        """Hand a finished tree to the storage and write the metadata (the last step)."""
        user, workdir = await asyncio.to_thread(_default_user, rootfs)
        say(f"[{name}] storing in {self.storage.name} storage")
        await self.storage.add_template(name, rootfs)
        info = TemplateInfo(
            name=name,
            backend=self.storage.name,
            created=_now(),
            size_bytes=await self.storage.template_size(name),
            user=user,
            workdir=workdir,
            env=dict(DEFAULT_ENV),
            origin=origin,
            parent=recipe.parent if recipe else None,
            recipe=recipe.digest() if recipe else None,
        )
        await asyncio.to_thread(self._write_metadata, info)
        return info

    # Locks, work dirs, leftovers ------------------------------------------------------------
    def _check_new_name(self, name: str) -> None:
        try:
            check_name("template", name)
        except StorageError as e:
            raise TemplateError(str(e)) from e
        if name in ALIASES:
            raise TemplateError(f"{name!r} is reserved (an alias of {ALIASES[name]!r})")

    @contextlib.asynccontextmanager
    async def _creating(self, name: str, exist_ok: bool = False) -> AsyncIterator[Path]:
        """Hold the name's lock and a fresh work dir; on any failure, leave nothing behind."""
        self._check_new_name(name)
        await self._ensure_ready()
        claimed_before = await asyncio.to_thread(self._lock_path(name).exists)
        async with self._name_lock(name):
            if not exist_ok and await asyncio.to_thread(self._metadata_path(name).exists):
                raise TemplateError(f"template {name!r} already exists")
            if await self.storage.has_template(name) and not await asyncio.to_thread(
                self._metadata_path(name).exists
            ):
                # Files without metadata: an interrupted earlier attempt of ours, or a storage
                # template someone else made (the manager's sandbox snapshots): not ours to drop.
                if not claimed_before:
                    raise TemplateError(f"{name!r} is already used by another storage template")
                await self.storage.delete_template(name)
            work = self._build_dir / f"{os.getpid()}-{name}"
            await asyncio.to_thread(_remove_tree, work)
            await asyncio.to_thread(work.mkdir, parents=True)
            try:
                yield work
            except BaseException:
                if not await asyncio.to_thread(self._metadata_path(name).exists):
                    with contextlib.suppress(StorageError):
                        await asyncio.shield(self.storage.delete_template(name))
                raise
            finally:
                await asyncio.shield(asyncio.to_thread(_remove_tree, work))

    @contextlib.asynccontextmanager
    async def _name_lock(self, name: str) -> AsyncIterator[None]:
        """An flock shared by every process using this data dir (polled: cancellable).

        The lock file also claims the name: storage templates without metadata are dropped as
        leftovers only if their name was claimed here (others belong to the manager)."""
        await asyncio.to_thread(self._build_dir.mkdir, parents=True, exist_ok=True)
        fd = await asyncio.to_thread(
            os.open, self._lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            # Another process holds it: there is no event to wait on, so poll.
            while not _try_lock(fd):  # noqa: ASYNC110
                await asyncio.sleep(_LOCK_POLL_SECONDS)
            yield
        finally:
            os.close(fd)

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await asyncio.to_thread(self._meta_dir.mkdir, parents=True, exist_ok=True)
                await self._drop_leftovers()
                self._ready = True

    async def _drop_leftovers(self) -> None:
        """Remove work dirs of dead builders and template files that never got metadata."""

        def dead_work_dirs() -> list[Path]:
            if not self._build_dir.is_dir():
                return []
            entries = self._build_dir.iterdir()
            return [p for p in entries if p.is_dir() and leftover_owner_is_dead(p.name)]

        for work in await asyncio.to_thread(dead_work_dirs):
            await asyncio.to_thread(_remove_tree, work)
        known = {i.name for i in await asyncio.to_thread(self._read_all_metadata)}
        for name in set(await self.storage.list_templates()) - known:
            async with self._try_claimed_lock(name) as locked:
                if locked and not await asyncio.to_thread(self._metadata_path(name).exists):
                    with contextlib.suppress(StorageError):
                        await self.storage.delete_template(name)

    @contextlib.asynccontextmanager
    async def _try_claimed_lock(self, name: str) -> AsyncIterator[bool]:
        """The name's lock without waiting, if the name was ever claimed here (else False)."""
        try:
            fd = await asyncio.to_thread(os.open, self._lock_path(name), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            yield _try_lock(fd)
        finally:
            os.close(fd)

    def _lock_path(self, name: str) -> Path:
        return self._build_dir / f"{name}.lock"

    # Metadata files -------------------------------------------------------------------------
    def _metadata_path(self, name: str) -> Path:
        return self._meta_dir / f"{name}.json"

    def _read_metadata(self, name: str) -> TemplateInfo | None:
        try:
            check_name("template", name)
            return TemplateInfo.from_json(self._metadata_path(name).read_text())
        except (FileNotFoundError, StorageError):
            return None

    def _read_all_metadata(self) -> builtins.list[TemplateInfo]:
        infos = []
        for path in sorted(self._meta_dir.glob("*.json")):
            info = self._read_metadata(path.name.removesuffix(".json"))
            if info is not None:
                infos.append(info)
        return infos

    def _write_metadata(self, info: TemplateInfo) -> None:
        path = self._metadata_path(info.name)
        tmp = path.with_name(f".{info.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(info.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# Helpers (blocking ones run in threads) -----------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _default_user(rootfs: Path) -> tuple[str, str]:
    """(`user`, its home) if the tree has that user with an existing home, else root's."""
    root = ConfinedRoot(rootfs)
    try:
        try:
            user = lookup_user(root, DEFAULT_USER)
        except UnknownUser:
            return "root", "/root" if _confined_is_dir(root, "/root") else "/"
        return user.name, user.home if _confined_is_dir(root, user.home) else "/"
    finally:
        root.close()


def _confined_is_dir(root: ConfinedRoot, path: str) -> bool:
    try:
        fd = root.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    os.close(fd)
    return True


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting anything still mounted below (never recursing into a mount)."""
    if not path.exists():
        return
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        _lazy_unmount(mount)
    # --one-file-system: if an unmount failed, refuse to descend rather than delete through it.
    done = os.spawnvp(os.P_WAIT, "rm", ["rm", "-rf", "--one-file-system", "--", str(path)])
    if done != 0:
        raise TemplateError(f"could not remove {path} (rm exit {done})")


def _lazy_unmount(target: str) -> None:
    if libc.umount2(os.fsencode(target), MNT_DETACH) != 0 and ctypes.get_errno() not in (
        errno.EINVAL,
        errno.ENOENT,
    ):
        raise TemplateError(f"umount {target}: {os.strerror(ctypes.get_errno())}")
