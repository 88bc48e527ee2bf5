"""Building a template's tree from a recipe: debootstrap minbase (or a copy of the parent),
Debian packages with apt, npm from the registry, locked PyPI packages with pip, the default
user. Blocking steps run in threads; commands run in private mount namespaces, so nothing they
mount outlives them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import stat
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from coppice_jails.templates.model import DEFAULT_USER, Progress, TemplateError
from coppice_jails.templates.run import run_logged
from coppice_jails.templates.tarball import check_tar_members

DEFAULT_UID = 1000
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
NPM_REGISTRY = "https://registry.npmjs.org"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# Bump when the build steps (not the package lists) change, to invalidate cached builds.
BUILDER_VERSION = 3
PIP_STEP_VERSION = 1  # the same, for the pip step alone (only recipes with a lock rebuild)


@dataclass(frozen=True)
class NpmRelease:
    """One release of a package from the npm registry, pinned by its `dist.integrity` (sha512)."""

    version: str
    integrity: str  # "sha512-<base64>", as `npm view PACKAGE@VERSION dist.integrity` prints it
    package: str = "npm"  # scoped names too ("@deno/linux-x64-glibc")

    @property
    def tarball(self) -> str:
        """The file name in the download cache (a scoped package's scope folded in)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    def url(self, registry: str) -> str:
        base = self.package.rpartition("/")[2]
        return f"{registry.rstrip('/')}/{self.package}/-/{base}-{self.version}.tgz"

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


# Deno's Jupyter kernel runs the javascript and typescript contexts (`deno jupyter --kernel`):
# one static binary (96 MiB) from the npm registry's per-platform package of `deno`, where the
# `deno` package itself fetches nothing else. E2B's IJavascript kernel needs a git checkout and
# native builds; Deno's TypeScript needs no separate compiler step.
DENO = NpmRelease(
    "2.9.6",
    "sha512-3md4TKLCuzsLDmfOoC5KN7NAZaxSVkMgm64vg6foD00JBADCpYS2/5QqXfzgnP5ZQz3iLP9vBQJtEgc116OAoQ==",
    package="@deno/linux-x64-glibc",
)


def pip_lock_text(name: str) -> str:
    """A PyPI lock shipped with the builder (package data, made by scripts/update-lock)."""
    return resources.files("coppice_jails.templates").joinpath(name).read_text()


@dataclass(frozen=True)
class Recipe:
    """How to build a template: debootstrap minbase (parent None) or a copy of a parent, then
    Debian packages (apt, no recommends) and, optionally, npm from the registry and the PyPI
    packages of a lock (`pip_lock`, a file next to this module: hashes and versions pinned)."""

    name: str
    parent: str | None
    packages: tuple[str, ...]
    npm: NpmRelease | None = None
    pip_lock: str | None = None
    deno: NpmRelease | None = None  # the binary of a `@deno/<platform>` package, in /usr/local/bin

    def digest(self) -> str:
        """Changes whenever what the builder would produce changes (parents included)."""
        parent = RECIPES[self.parent].digest() if self.parent else None
        npm = [self.npm.version, self.npm.integrity] if self.npm else None
        spec: list[object] = [BUILDER_VERSION, SUITE, self.name, parent, sorted(self.packages), npm]
        if self.pip_lock is not None:  # appended only here: recipes without one keep their digest
            lock = pip_lock_text(self.pip_lock).encode()
            spec.append(["pip", PIP_STEP_VERSION, hashlib.sha256(lock).hexdigest()])
        if self.deno is not None:  # the same: recipes without Deno keep their digest
            spec.append(["deno", self.deno.package, self.deno.version, self.deno.integrity])
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
    # The kernel from Debian; numpy, pandas, matplotlib, pillow and e2b-charts from PyPI at
    # E2B's versions (code-interpreter.in says why), into /usr/local.
    "code-interpreter-v1": Recipe(
        "code-interpreter-v1",
        "base",
        (
            "python3-ipykernel",
            # R with IRkernel (E2B: R 4.5 from CRAN; bookworm has 4.2).
            "r-base-core", "r-cran-irkernel",
            # Java for Coppice's jshell kernel (payload/java_kernel.py); E2B uses IJava.
            "openjdk-17-jdk-headless",
        ),
        pip_lock="code-interpreter.lock",
        deno=DENO,
    ),
}  # fmt: skip


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


class TemplateBuilder:
    """Makes template trees; downloads (debootstrap's, apt's, npm's) are cached in `cache_dir`."""

    def __init__(
        self, cache_dir: Path, mirror: str | None = None, npm_registry: str = NPM_REGISTRY
    ) -> None:
        self._cache_dir = cache_dir
        self._mirror = mirror
        self._npm_registry = npm_registry

    async def build_tree(
        self, recipe: Recipe, rootfs: Path, parent_root: Path | None, say: Progress
    ) -> None:
        """The recipe's tree at `rootfs`: from scratch, or from `parent_root` (its parent's)."""
        if parent_root is None:
            await self._debootstrap(recipe, rootfs, say)
        else:
            say(f"[{recipe.name}] copying {recipe.parent}")
            await run_logged(
                ["cp", "-a", "-x", "--reflink=auto", "--", str(parent_root), str(rootfs)], say
            )
        await self._apt_install(recipe, rootfs, say)
        if recipe.npm is not None:
            await self.install_npm(recipe.name, recipe.npm, rootfs, say)
        if recipe.deno is not None:
            await self._install_deno(recipe.name, recipe.deno, rootfs, say)
        if parent_root is None:
            await self._add_default_user(recipe, rootfs, say)
        if recipe.pip_lock is not None:
            await self._pip_install(recipe, recipe.pip_lock, rootfs, say)
        await asyncio.to_thread(_tidy_apt, rootfs)

    async def _debootstrap(self, recipe: Recipe, rootfs: Path, say: Progress) -> None:
        mirror = self._mirror if self._mirror else await asyncio.to_thread(debian_mirror)
        cache = self._cache_dir / "debootstrap"
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        say(f"[{recipe.name}] debootstrap {SUITE} from {mirror}")
        # In a private mount namespace, the /proc, /sys, /dev mounts debootstrap makes inside
        # the tree die with it, even when it is killed half-way. The packages come afterwards
        # from apt: debootstrap's own resolver knows no virtual packages.
        await run_logged(
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
        await run_logged(["chroot", str(rootfs), "groupadd", "-g", uid, DEFAULT_USER], say)
        await run_logged(
            [
                "chroot", str(rootfs), "useradd", "-m", "-u", uid, "-g", uid,
                "-G", "sudo", "-s", "/bin/bash", DEFAULT_USER,
            ],
            say,
        )  # fmt: skip
        # As E2B: no password (rather than a locked one) for root and the user.
        for account in ("root", DEFAULT_USER):
            await run_logged(["chroot", str(rootfs), "passwd", "-d", account], say)
        await asyncio.to_thread(_configure_base, rootfs)

    async def _apt_install(self, recipe: Recipe, rootfs: Path, say: Progress) -> None:
        archives = self._cache_dir / "apt-archives"
        await asyncio.to_thread((archives / "partial").mkdir, parents=True, exist_ok=True)
        say(f"[{recipe.name}] apt-get install {' '.join(recipe.packages)}")
        await run_logged(
            [
                "unshare", "-m", "--propagation", "private",
                "sh", "-euc", _APT_INSTALL_SCRIPT, "sh", str(rootfs), str(archives),
                *recipe.packages,
            ],
            say,
        )  # fmt: skip

    async def install_npm(
        self, name: str, release: NpmRelease, rootfs: Path, say: Progress
    ) -> None:
        """npm (and npx) in /usr/local, as a global `npm install -g npm` would put them."""
        target = rootfs / "usr" / "local" / "lib" / "node_modules" / "npm"
        await self._unpack_npm_package(name, "npm", release, target, "package/", say)
        await asyncio.to_thread(_link_npm, rootfs)

    async def _install_deno(
        self, name: str, release: NpmRelease, rootfs: Path, say: Progress
    ) -> None:
        """The `deno` binary of a platform package into /usr/local/bin."""
        target = rootfs / "usr" / "local" / "bin"
        await self._unpack_npm_package(name, "deno", release, target, "package/deno", say)

    async def _unpack_npm_package(
        self, name: str, what: str, release: NpmRelease, target: Path, member: str, say: Progress
    ) -> None:
        """`member` of a registry tarball (fetched once into the cache, checked against its
        pinned integrity and for members leaving the tree) into `target`, `package/` stripped."""
        url = release.url(self._npm_registry)
        say(f"[{name}] {what} {release.version} from {url}")
        tarball = await asyncio.to_thread(_fetch_npm, release, url, self._cache_dir / "npm", say)
        await asyncio.to_thread(check_tar_members, tarball)
        await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        await run_logged(
            [
                "tar", "-x", "-z", "--no-same-owner", "--strip-components=1",
                "-f", str(tarball), "-C", str(target), member,
            ],
            say,
        )  # fmt: skip

    async def _pip_install(self, recipe: Recipe, lock: str, rootfs: Path, say: Progress) -> None:
        """The lock's packages into the tree's /usr/local, with the tree's own pip; then
        matplotlib's font cache for the default user, so no first plot pays for it."""
        cache = self._cache_dir / "pip"
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        lock_in_tree = rootfs / "tmp" / f"coppice-{lock}"
        await asyncio.to_thread(lock_in_tree.write_text, pip_lock_text(lock))
        say(f"[{recipe.name}] pip install --require-hashes -r {lock}")
        try:
            await run_logged(
                [
                    "unshare", "-m", "--propagation", "private",
                    "sh", "-euc", _PIP_INSTALL_SCRIPT, "sh", str(rootfs), str(cache),
                    f"/tmp/{lock_in_tree.name}",
                ],
                say,
            )  # fmt: skip
        finally:  # the mounts died with the namespace; their mount point stays behind
            await asyncio.to_thread(lock_in_tree.unlink, missing_ok=True)
            with contextlib.suppress(OSError):
                await asyncio.to_thread((rootfs / "var" / "cache" / "coppice-pip").rmdir)
        # As the rest of /usr/local (base): writable by everyone, so `pip install -U` needs no sudo.
        await asyncio.to_thread(_make_writable_by_all, rootfs / "usr" / "local")
        say(f"[{recipe.name}] building matplotlib's font cache for {DEFAULT_USER}")
        await run_logged(
            [
                "chroot", f"--userspec={DEFAULT_UID}:{DEFAULT_UID}", str(rootfs),
                "env", f"HOME=/home/{DEFAULT_USER}",
                "python3", "-c", "import matplotlib.font_manager",
            ],
            say,
        )  # fmt: skip


# Runs as `sh -euc SCRIPT sh ROOTFS CACHE LOCK` inside `unshare -m --propagation private`. The
# lock is the whole closure: --no-deps and --ignore-installed install exactly it, whatever Debian
# already has (Debian's copies stay, shadowed by /usr/local). Wheels only: no compiler in a tree.
# pip in the tree trusts the host's CA bundle for the build, as the host's own downloads do (a
# TLS-inspecting proxy's CA is in the host's bundle, not in the tree's fresh ca-certificates).
_PIP_INSTALL_SCRIPT = r"""
root=$1; cache=$2; lock=$3
mkdir -p "$root/var/cache/coppice-pip"
mount --bind "$cache" "$root/var/cache/coppice-pip"
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -f "$bundle" ] && [ -f "$root$bundle" ]; then mount --bind "$bundle" "$root$bundle"; fi
chroot "$root" python3 -m pip install --require-hashes --no-deps --ignore-installed \
    --only-binary :all: --break-system-packages --root-user-action=ignore \
    --disable-pip-version-check --no-warn-script-location --progress-bar off \
    --cache-dir /var/cache/coppice-pip -r "$lock"
"""


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
            data = _read_with_progress(response, release.tarball, say)
    except OSError as e:
        raise TemplateError(f"cannot download {url}: {e}") from e
    if not release.matches(data):
        raise TemplateError(f"{url} does not match the pinned {release.integrity[:20]}…")
    tmp = path.with_name(f".{release.tarball}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    say(f"{release.tarball}: downloaded {len(data)} bytes, sha512 verified")
    return path


_PROGRESS_STEP = 16 << 20  # a line every 16 MiB: Deno's 40 MiB is otherwise a silent wait


def _read_with_progress(response: BinaryIO, name: str, say: Progress) -> bytes:
    chunks: list[bytes] = []
    done = reported = 0
    while chunk := response.read(1 << 20):
        chunks.append(chunk)
        done += len(chunk)
        if done - reported >= _PROGRESS_STEP:
            reported = done
            say(f"{name}: {done >> 20} MiB…")
    return b"".join(chunks)


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
