"""Templates: a root filesystem in a Storage plus metadata (default user, workdir, env).

Metadata lives as JSON in `<data_dir>/templates/<name>.json`, written atomically and last, so
a template counts only once both its files and its metadata exist. Templates come from a
builder (`debootstrap` + packages, see RECIPES), from a rootfs tarball, or from a sandbox's
snapshot. Work in progress happens in `<data_dir>/build/<pid>-<name>` under a per-name lock
file; leftovers of a process that died are removed the next time the store is used.

Storage layout note: give OverlayStorage a base directory other than `<data_dir>` itself
(e.g. `<data_dir>/overlay`): its `templates/<name>/` dirs would share a directory with the
metadata files here.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import signal
import stat
import tarfile
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from coppice_jails.confined import ConfinedRoot
from coppice_jails.storage.base import (
    Storage,
    StorageError,
    check_name,
    leftover_owner_is_dead,
)
from coppice_jails.users import UnknownUser, lookup_user

Progress = Callable[[str], None]

ALIASES: Mapping[str, str] = {"default": "base"}
DEFAULT_USER = "user"
DEFAULT_UID = 1000
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
NPM_REGISTRY = "https://registry.npmjs.org"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Bump when the build steps (not the package lists) change, to invalidate cached builds.
BUILDER_VERSION = 3
_LOCK_POLL_SECONDS = 0.2
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_BUILD_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


class TemplateError(Exception):
    pass


class UnknownTemplate(TemplateError, LookupError):
    pass


@dataclass(frozen=True)
class NpmRelease:
    """One npm release from the registry, pinned by its `dist.integrity` (sha512)."""

    version: str
    integrity: str  # "sha512-<base64>", as `npm view npm@VERSION dist.integrity` prints it

    @property
    def tarball(self) -> str:
        return f"npm-{self.version}.tgz"

    def url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/npm/-/{self.tarball}"

    def matches(self, data: bytes) -> bool:
        algorithm, _, expected = self.integrity.partition("-")
        return algorithm == "sha512" and base64.b64encode(hashlib.sha512(data).digest()) == (
            expected.encode()
        )


# Debian's own npm package pulls in 350 node-* packages (webpack, babel, eslint, ...: +175 MiB
# and twice the build time); npm from the registry is one self-contained tarball (19 MiB).
# 10.x is the newest line that runs on bookworm's Node 18.
NPM = NpmRelease(
    "10.9.9",
    "sha512-1g+6jLQvaIuB4zwvHL7yrXuXcWZwDsCtBX8bbWDqbvJSSr9nPiDDWTHNgwXR27iIcTTW7v3A57hDW9RYv2W4Yg==",
)


@dataclass(frozen=True)
class Recipe:
    """How to build a template: debootstrap minbase (parent None) or a copy of a parent, then
    Debian packages (apt, no recommends) and, optionally, npm from the registry."""

    name: str
    parent: str | None
    packages: tuple[str, ...]
    npm: NpmRelease | None = None

    def digest(self) -> str:
        """Changes whenever what the builder would produce changes (parents included)."""
        parent = RECIPES[self.parent].digest() if self.parent else None
        npm = [self.npm.version, self.npm.integrity] if self.npm else None
        spec = [BUILDER_VERSION, SUITE, self.name, parent, sorted(self.packages), npm]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


RECIPES: Mapping[str, Recipe] = {
    # What a user of E2B's `base` counts on (its image is python:3.11 plus Node and npm), from
    # Debian: bookworm's python 3.11 and Node 18 (E2B: 3.11, 20). Left out: build-essential
    # (+262 MB), gh (+40 MB), yarn: `sudo apt-get install build-essential gh`, `npm i -g yarn`.
    "base": Recipe(
        "base",
        None,
        (
            "bash", "coreutils", "procps", "sudo", "ca-certificates", "netbase",
            "python3", "python-is-python3", "python3-pip", "python3-venv",
            "nodejs",
            "curl", "wget", "git", "openssh-client",
            "unzip", "xz-utils", "bzip2", "file", "patch", "make",
            # Resolves the jail's own hostname (the sandbox id) so sudo & co. stay quiet.
            "libnss-myhostname",
        ),
        npm=NPM,
    ),
    "code-interpreter-v1": Recipe(
        "code-interpreter-v1",
        "base",
        (
            "python3-ipykernel", "python3-numpy", "python3-pandas", "python3-matplotlib",
            # Satisfies python3-fonttools' "scipy | munkres": without it apt picks scipy,
            # which drags in pythran, gcc and python3-dev (several hundred MB).
            "python3-munkres",
        ),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    backend: str
    created: str  # ISO 8601, UTC
    size_bytes: int
    user: str
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    origin: str = "build"  # build | import | snapshot
    parent: str | None = None
    recipe: str | None = None  # Recipe.digest() of a built template

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TemplateInfo:
        return cls(**json.loads(text))


def debian_mirror(sources: Path = DEBIAN_SOURCES) -> str:
    """The first `URIs:` of the machine's deb822 Debian sources, else deb.debian.org."""
    try:
        for line in sources.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "URIs" and value.split():
                return value.split()[0]
    except OSError:
        pass
    return FALLBACK_MIRROR


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
        self._cache_dir = Path(cache_dir).absolute() if cache_dir else self.data_dir / "cache"
        self._mirror = mirror
        self._npm_registry = npm_registry
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
        return await self._build(resolved, progress or _quiet, exist_ok=True)

    async def build(self, name: str, progress: Progress | None = None) -> TemplateInfo:
        """Build a template from its recipe (`base`, `code-interpreter-v1`)."""
        resolved = self.resolve(name)
        if resolved not in RECIPES:
            raise TemplateError(
                f"no recipe to build {name!r}; buildable: {', '.join(sorted(RECIPES))}"
            )
        return await self._build(resolved, progress or _quiet, exist_ok=False)

    async def import_tar(
        self, name: str, tar_path: Path, progress: Progress | None = None
    ) -> TemplateInfo:
        """A template from a root filesystem tarball (plain or compressed)."""
        say = progress or _quiet
        self._check_new_name(name)
        tar_path = Path(tar_path)
        async with self._creating(name) as work:
            say(f"checking {tar_path}")
            count = await asyncio.to_thread(check_tar_members, tar_path)
            rootfs = work / "rootfs"
            await asyncio.to_thread(rootfs.mkdir)
            say(f"unpacking {count} entries")
            await _stream(
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
            if parent is None:
                await self._debootstrap(recipe, rootfs, say)
            else:
                say(f"[{name}] copying {parent.name}")
                source = await self.storage.template_root(parent.name)
                await _stream(
                    ["cp", "-a", "-x", "--reflink=auto", "--", str(source), str(rootfs)], say
                )
            await self._apt_install(recipe, rootfs, say)
            if recipe.npm is not None:
                await self._install_npm(recipe.name, recipe.npm, rootfs, say)
            if parent is None:
                await self._add_default_user(recipe, rootfs, say)
            await asyncio.to_thread(_tidy_apt, rootfs)
            info = await self._publish(name, rootfs, say, origin="build", recipe=recipe)
        say(f"[{name}] built in {time.monotonic() - started:.1f} s ({info.size_bytes >> 20} MiB)")
        return info

    async def _debootstrap(self, recipe: Recipe, rootfs: Path, say: Progress) -> None:
        mirror = self._mirror if self._mirror else await asyncio.to_thread(debian_mirror)
        cache = self._cache_dir / "debootstrap"
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        say(f"[{recipe.name}] debootstrap {SUITE} from {mirror}")
        # In a private mount namespace, the /proc, /sys, /dev mounts debootstrap makes inside
        # the tree die with it, even when it is killed half-way. The packages come afterwards
        # from apt: debootstrap's own resolver knows no virtual packages.
        await _stream(
            [
                "unshare", "-m", "--propagation", "private",
                "debootstrap", "--variant=minbase", f"--cache-dir={cache}",
                SUITE, str(rootfs), mirror,
            ],
            say,
        )  # fmt: skip

    async def _add_default_user(self, recipe: Recipe, rootfs: Path, say: Progress) -> None:
        say(f"[{recipe.name}] adding user {DEFAULT_USER} (uid {DEFAULT_UID})")
        uid = str(DEFAULT_UID)
        await _stream(["chroot", str(rootfs), "groupadd", "-g", uid, DEFAULT_USER], say)
        await _stream(
            [
                "chroot", str(rootfs), "useradd", "-m", "-u", uid, "-g", uid,
                "-G", "sudo", "-s", "/bin/bash", DEFAULT_USER,
            ],
            say,
        )  # fmt: skip
        # As E2B: no password (rather than a locked one) for root and the user.
        for account in ("root", DEFAULT_USER):
            await _stream(["chroot", str(rootfs), "passwd", "-d", account], say)
        await asyncio.to_thread(_configure_base, rootfs)

    async def _apt_install(self, recipe: Recipe, rootfs: Path, say: Progress) -> None:
        archives = self._cache_dir / "apt-archives"
        await asyncio.to_thread((archives / "partial").mkdir, parents=True, exist_ok=True)
        say(f"[{recipe.name}] apt-get install {' '.join(recipe.packages)}")
        await _stream(
            [
                "unshare", "-m", "--propagation", "private",
                "sh", "-euc", _APT_INSTALL_SCRIPT, "sh", str(rootfs), str(archives),
                *recipe.packages,
            ],
            say,
        )  # fmt: skip

    async def _install_npm(
        self, name: str, release: NpmRelease, rootfs: Path, say: Progress
    ) -> None:
        """npm (and npx) in /usr/local, as a global `npm install -g npm` would put them."""
        cache = self._cache_dir / "npm"
        url = release.url(self._npm_registry)
        say(f"[{name}] npm {release.version} from {url}")
        tarball = await asyncio.to_thread(_fetch_npm, release, url, cache, say)
        await asyncio.to_thread(check_tar_members, tarball)
        target = rootfs / "usr" / "local" / "lib" / "node_modules" / "npm"
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        await _stream(
            [
                "tar", "-x", "-z", "--no-same-owner", "--strip-components=1",
                "-f", str(tarball), "-C", str(target), "package/",
            ],
            say,
        )  # fmt: skip
        await asyncio.to_thread(_link_npm, rootfs)

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


# Command-line entry points (the CLI parses arguments and calls these) ------------------------
async def template_build_command(store: TemplateStore, name: str, echo: Progress) -> None:
    """`coppice template build NAME`: build with progress lines on `echo`."""
    info = await store.build(name, echo)
    echo(f"template {info.name} ready ({info.size_bytes >> 20} MiB, {info.backend})")


async def template_import_command(
    store: TemplateStore, name: str, tar_path: Path, echo: Progress
) -> None:
    """`coppice template import NAME ROOTFS.tar`."""
    info = await store.import_tar(name, tar_path, echo)
    echo(f"template {info.name} imported ({info.size_bytes >> 20} MiB, user {info.user})")


async def template_list_command(store: TemplateStore, echo: Progress) -> None:
    """`coppice template list`: name, size, created, backend (and aliases)."""
    echo(format_template_table(await store.list()))


def format_template_table(infos: Sequence[TemplateInfo]) -> str:
    aliases: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    rows = [("NAME", "SIZE", "CREATED", "BACKEND", "ALIASES")]
    for i in infos:
        size = f"{i.size_bytes / 2**20:.0f} MiB"
        rows.append((i.name, size, i.created, i.backend, ",".join(aliases.get(i.name, []))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# Helpers (blocking ones run in threads) -----------------------------------------------------
def _quiet(line: str) -> None:
    pass


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def _stream(argv: Sequence[str], say: Progress) -> None:
    """Run a command, passing each output line to `say`; kill its process group if cancelled."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_BUILD_ENV,
        start_new_session=True,
        limit=1 << 20,
    )
    tail: deque[str] = deque(maxlen=15)
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                say(line)
        returncode = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    if returncode != 0:
        raise TemplateError(
            f"`{' '.join(argv[:3])} …` failed (exit {returncode}):\n" + "\n".join(tail)
        )


# Runs as `sh -euc SCRIPT sh ROOTFS ARCHIVES PACKAGE...` inside `unshare -m --propagation
# private`, so its mounts vanish with it; policy-rc.d stops packages from starting services.
_APT_INSTALL_SCRIPT = r"""
root=$1; archives=$2; shift 2
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind "$archives" "$root/var/cache/apt/archives"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
trap 'rm -f "$root/usr/sbin/policy-rc.d"' EXIT
chroot "$root" apt-get update
chroot "$root" apt-get install -y --no-install-recommends "$@"
"""


def _fetch_npm(release: NpmRelease, url: str, cache: Path, say: Progress) -> Path:
    """The release's tarball, from the cache or downloaded into it; checked either way."""
    path = cache / release.tarball
    with contextlib.suppress(FileNotFoundError):
        if release.matches(path.read_bytes()):
            say(f"{release.tarball}: cached, sha512 verified")
            return path
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise TemplateError(f"cannot download {url}: {e}") from e
    if not release.matches(data):
        raise TemplateError(f"{url} does not match the pinned {release.integrity[:20]}…")
    tmp = path.with_name(f".{release.tarball}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    say(f"{release.tarball}: downloaded {len(data)} bytes, sha512 verified")
    return path


def _link_npm(rootfs: Path) -> None:
    """`npm`/`npx` on PATH, and global installs in /usr/local (with Node in /usr, npm would
    put them in /usr): what npm's own builtin config file is for."""
    npm = rootfs / "usr" / "local" / "lib" / "node_modules" / "npm"
    (npm / "npmrc").write_text("prefix=/usr/local\n")
    for command in ("npm", "npx"):
        link = rootfs / "usr" / "local" / "bin" / command
        link.unlink(missing_ok=True)
        link.symlink_to(f"../lib/node_modules/npm/bin/{command}-cli.js")


def _configure_base(rootfs: Path) -> None:
    """Passwordless sudo for the default user; hostname and hosts fit for a jail; a login
    profile that does not fork; as in E2B's templates, `pip install` and `npm install -g`
    work for anyone, in /usr/local, and there is a /code for everyone."""
    sudoers = rootfs / "etc" / "sudoers.d" / DEFAULT_USER
    sudoers.write_text(f"{DEFAULT_USER} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    # Debian's pip refuses to install outside a venv (PEP 668); E2B's python (not Debian's)
    # installs where asked. Outside a venv, pip installs into /usr/local, which apt never uses.
    (rootfs / "etc" / "pip.conf").write_text("[global]\nbreak-system-packages = true\n")
    _make_writable_by_all(rootfs / "usr" / "local")
    code = rootfs / "code"
    code.mkdir(exist_ok=True)
    code.chmod(0o777)
    (rootfs / "etc" / "hostname").write_text("coppice\n")
    (rootfs / "etc" / "hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # Debian's /etc/profile runs `id -u` in every login shell, and every `commands.run` is one
    # (`bash -l -c`): that fork+exec was half of a `commands.run("true")`. bash knows its EUID;
    # other shells still ask `id`.
    profile = rootfs / "etc" / "profile"
    if profile.is_file() and not profile.is_symlink():
        profile.write_text(profile.read_text().replace('"$(id -u)"', '"${EUID:-$(id -u)}"'))


def _make_writable_by_all(top: Path) -> None:
    """Every directory and file below `top` writable by everyone (symlinks left alone)."""
    for directory, _, files in os.walk(top):
        os.chmod(directory, 0o777)
        for name in files:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, stat.S_IMODE(mode) | 0o666)


def _tidy_apt(rootfs: Path) -> None:
    """Drop downloaded packages and indexes: they belong in the cache, not in every template."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for path in rootfs.glob(pattern):
            if path.is_file() and not path.is_symlink() and path.name != "lock":
                path.unlink()


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


def _member_path(name: str) -> str:
    """A tar member's path relative to the target, or TemplateError if it could escape."""
    if name.startswith("/") or ".." in name.split("/"):
        raise TemplateError(f"unsafe tar member {name!r}: absolute or contains '..'")
    normal = posixpath.normpath(name)
    return "" if normal == "." else normal


def check_tar_members(tar_path: Path) -> int:
    """Refuse a tarball any of whose entries could land outside the target; return the count.

    Symlinks may point anywhere (they are resolved inside the jail later), but no entry may be
    written through one, and hard links must stay inside.
    """
    symlinks: set[str] = set()
    paths: list[str] = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                path = _member_path(member.name)
                paths.append(path)
                if member.issym():
                    symlinks.add(path)
                elif member.islnk():
                    paths.append(_member_path(member.linkname))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TemplateError(f"cannot read {tar_path} as a tarball: {e}") from e
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in symlinks:
                raise TemplateError(
                    f"unsafe tar member {path!r}: it goes through the symlink "
                    f"{'/'.join(parts[:i])!r}"
                )
    if not paths:
        raise TemplateError(f"{tar_path} is an empty tarball")
    return len(paths)


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
    if _libc.umount2(os.fsencode(target), _MNT_DETACH) != 0 and ctypes.get_errno() not in (
        errno.EINVAL,
        errno.ENOENT,
    ):
        raise TemplateError(f"umount {target}: {os.strerror(ctypes.get_errno())}")
