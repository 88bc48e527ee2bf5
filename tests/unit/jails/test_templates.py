"""TemplateStore: tar import (and its safety), listing, aliases, errors, interrupted builds,
and real debootstrap builds (cached across runs, see template_fixtures)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import secrets
import stat
import subprocess
import tarfile
import threading
from collections.abc import Iterator, Sequence
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from coppice.commands.template import format_template_table
from coppice_jails import templates
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.storage.zfs import ZfsStorage
from coppice_jails.templates import (
    RECIPES,
    NpmRelease,
    TemplateError,
    TemplateStore,
    UnknownTemplate,
    builder,
)
from coppice_jails.templates.builder import TemplateBuilder
from coppice_jails.templates.run import run_logged

PASSWD = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"


def _add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    uid: int = 0,
    mode: int = 0o644,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.uid = info.gid = uid
    info.mode = mode
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_rootfs_tar(
    path: Path, with_user: bool = True, extra: Sequence[tuple[str, str]] = ()
) -> Path:
    """A tiny root filesystem tarball (gzip if the name says so); extra = (name, symlink target)."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for d in ("./", "./etc", "./root", "./bin", "./home"):
            _add(tar, d, tarfile.DIRTYPE, mode=0o755)
        passwd = PASSWD if with_user else PASSWD.splitlines(keepends=True)[0]
        _add(tar, "./etc/passwd", data=passwd.encode())
        _add(tar, "./bin/sudo-like", data=b"#!/bin/sh\n", mode=0o4755)
        _add(tar, "./bin/link-to-etc", tarfile.SYMTYPE, link="/etc")
        if with_user:
            _add(tar, "./home/user", tarfile.DIRTYPE, uid=1000, mode=0o755)
            _add(tar, "./home/user/.profile", data=b"# hi\n", uid=1000)
        for name, target in extra:
            if target:
                _add(tar, name, tarfile.SYMTYPE, link=target)
            else:
                _add(tar, name, data=b"evil\n")
    return path


async def rootfs_tar(
    path: Path, with_user: bool = True, extra: Sequence[tuple[str, str]] = ()
) -> Path:
    return await asyncio.to_thread(make_rootfs_tar, path, with_user, extra)


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    data = tmp_path / "data"
    return TemplateStore(data, OverlayStorage(data / "overlay"))


@pytest.fixture(params=["overlay", "zfs"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> TemplateStore:
    """A store on either real backend (sync: making the zfs pool blocks)."""
    if request.param == "overlay":
        return TemplateStore(tmp_path / "data", OverlayStorage(tmp_path / "data" / "overlay"))
    dataset = f"{request.getfixturevalue('zfs_dataset')}/{secrets.token_hex(4)}"
    subprocess.run(["zfs", "create", dataset], check=True)
    return TemplateStore(tmp_path / "data", ZfsStorage(dataset))


async def leftovers(store: TemplateStore) -> list[str]:
    """Everything a failed attempt could have left: work dirs, metadata, storage templates."""

    def scan() -> list[str]:
        found = []
        build = store.data_dir / "build"
        if build.is_dir():
            found += [f"build/{p.name}" for p in build.iterdir() if not p.name.endswith(".lock")]
        meta = store.data_dir / "templates"
        if meta.is_dir():
            found += [f"templates/{p.name}" for p in meta.iterdir()]
        incoming = store.data_dir / "overlay" / "incoming"
        if incoming.is_dir():
            found += [f"incoming/{p.name}" for p in incoming.iterdir()]
        return found

    return await asyncio.to_thread(scan) + await store.storage.list_templates()


async def test_import_tar_keeps_owners_and_modes(any_store: TemplateStore, tmp_path: Path) -> None:
    store = any_store
    for compressed in (False, True):
        name = "imported-gz" if compressed else "imported"
        tar = await rootfs_tar(tmp_path / f"{name}.tar{'.gz' if compressed else ''}")
        lines: list[str] = []
        info = await store.import_tar(name, tar, lines.append)
        assert lines, "import reports progress"
        assert (info.name, info.user, info.workdir, info.backend) == (
            name, "user", "/home/user", store.storage.name,
        )  # fmt: skip
        assert info.origin == "import"
        assert info.env["PATH"].startswith("/usr/local/sbin")
        root = await store.root(name)
        home = await asyncio.to_thread(os.lstat, root / "home" / "user")
        assert (home.st_uid, home.st_gid) == (1000, 1000)
        sudo = await asyncio.to_thread(os.lstat, root / "bin" / "sudo-like")
        assert sudo.st_mode & stat.S_ISUID
        assert await asyncio.to_thread(os.readlink, root / "bin" / "link-to-etc") == "/etc"


async def test_import_without_user_defaults_to_root(store: TemplateStore, tmp_path: Path) -> None:
    info = await store.import_tar("plain", await rootfs_tar(tmp_path / "p.tar", with_user=False))
    assert (info.user, info.workdir) == ("root", "/root")


@pytest.mark.parametrize(
    "extra",
    [
        [("../escaped", "")],
        [("./etc/../../escaped", "")],
        [("/escaped-absolute", "")],
        [("./etc2", "/tmp"), ("./etc2/escaped", "")],  # written through a symlink
        [("./etc3", "../.."), ("./etc3/x/escaped", "")],
    ],
)
async def test_malicious_tar_is_rejected_and_leaves_nothing(
    store: TemplateStore, tmp_path: Path, extra: list[tuple[str, str]]
) -> None:
    tar = await rootfs_tar(tmp_path / "evil.tar", extra=extra)
    with pytest.raises(TemplateError, match="unsafe tar member"):
        await store.import_tar("evil", tar)
    assert await leftovers(store) == []
    assert not await asyncio.to_thread((tmp_path / "escaped").exists)
    assert not await asyncio.to_thread(Path("/tmp/escaped").exists)
    assert not await asyncio.to_thread(Path("/escaped-absolute").exists)


async def test_not_a_tarball_is_rejected(store: TemplateStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    await asyncio.to_thread(junk.write_bytes, b"not a tar" * 100)
    with pytest.raises(TemplateError, match="cannot read"):
        await store.import_tar("junk", junk)
    assert await leftovers(store) == []


async def test_list_shows_name_size_created_backend(
    any_store: TemplateStore, tmp_path: Path
) -> None:
    store = any_store
    await store.import_tar("one", await rootfs_tar(tmp_path / "1.tar"))
    await store.import_tar("two", await rootfs_tar(tmp_path / "2.tar"))
    infos = await store.list()
    assert [i.name for i in infos] == ["one", "two"]
    for info in infos:
        assert info.size_bytes > 0
        assert info.created.endswith("+00:00")
        assert info.backend == store.storage.name
    table = format_template_table(infos)
    assert table.splitlines()[0].split() == ["NAME", "SIZE", "CREATED", "BACKEND", "ALIASES"]
    assert table.splitlines()[1].startswith("one ")
    # Metadata is backend-neutral JSON next to the data, one file per template.
    assert await asyncio.to_thread((store.data_dir / "templates" / "one.json").is_file)


async def test_default_is_an_alias_of_base(store: TemplateStore, tmp_path: Path) -> None:
    await store.import_tar("base", await rootfs_tar(tmp_path / "b.tar"))
    assert (await store.get("default")).name == "base"
    assert await store.root("default") == await store.root("base")
    # ensure() finds an existing template without building anything.
    assert (await store.ensure("default")).origin == "import"
    assert "default" in format_template_table(await store.list())
    with pytest.raises(TemplateError, match="alias"):
        await store.import_tar("default", await rootfs_tar(tmp_path / "d.tar"))
    with pytest.raises(TemplateError, match="alias"):
        await store.delete("default")


async def test_unknown_template_names_the_available_ones(
    store: TemplateStore, tmp_path: Path
) -> None:
    await store.import_tar("mine", await rootfs_tar(tmp_path / "m.tar"))
    with pytest.raises(UnknownTemplate, match="unknown template 'nope'") as caught:
        await store.get("nope")
    message = str(caught.value)
    assert "mine" in message
    assert "code-interpreter-v1" in message  # buildable ones are named too
    with pytest.raises(UnknownTemplate, match="mine"):
        await store.ensure("nope")
    with pytest.raises(TemplateError, match="buildable"):
        await store.build("nope")


async def test_bad_and_duplicate_names(store: TemplateStore, tmp_path: Path) -> None:
    tar = await rootfs_tar(tmp_path / "t.tar")
    for bad in ("../x", "Upper", "a/b", ""):
        with pytest.raises(TemplateError, match="invalid"):
            await store.import_tar(bad, tar)
    await store.import_tar("dup", tar)
    with pytest.raises(TemplateError, match="already exists"):
        await store.import_tar("dup", tar)
    assert [i.name for i in await store.list()] == ["dup"]


async def test_delete_refuses_while_in_use(any_store: TemplateStore, tmp_path: Path) -> None:
    store = any_store
    await store.import_tar("used", await rootfs_tar(tmp_path / "u.tar"))
    await store.storage.clone("used", "sandboxa")
    with pytest.raises(Exception, match="in use"):
        await store.delete("used")
    assert [i.name for i in await store.list()] == ["used"]
    await store.storage.destroy("sandboxa")
    await store.delete("used")
    assert await store.list() == []
    assert await leftovers(store) == []


async def test_snapshot_of_a_sandbox_inherits_defaults(
    any_store: TemplateStore, tmp_path: Path
) -> None:
    store = any_store
    await store.import_tar("parent", await rootfs_tar(tmp_path / "p.tar"))
    root = await store.storage.clone("parent", "sandboxa")
    await asyncio.to_thread((root / "home" / "user" / "state").write_text, "kept\n")
    info = await store.snapshot_sandbox("sandboxa", "child", "parent")
    assert (info.origin, info.parent, info.user) == ("snapshot", "parent", "user")
    await store.storage.destroy("sandboxa")
    child_root = await store.root("child")
    assert await asyncio.to_thread((child_root / "home" / "user" / "state").read_text) == "kept\n"


async def test_interrupted_build_leaves_nothing(
    store: TemplateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """debootstrap dies half-way through writing the tree: no template, no work dir."""
    real_stream = run_logged

    async def dying_debootstrap(argv: Sequence[str], say: templates.Progress) -> None:
        if "debootstrap" not in argv:
            await real_stream(argv, say)
            return
        target = Path(argv[-2])
        await asyncio.to_thread((target / "etc").mkdir, parents=True)
        await asyncio.to_thread((target / "etc" / "half-written").write_text, "x")
        raise TemplateError("debootstrap was killed")

    monkeypatch.setattr(builder, "run_logged", dying_debootstrap)
    with pytest.raises(TemplateError, match="killed"):
        await store.build("base")
    assert await leftovers(store) == []
    with pytest.raises(UnknownTemplate):
        await store.get("base")


async def test_leftovers_of_a_killed_process_are_removed(
    store: TemplateStore, tmp_path: Path
) -> None:
    """A builder killed with -9 leaves its work dir and perhaps files without metadata."""
    await store.import_tar("keep", await rootfs_tar(tmp_path / "k.tar"))
    dead = 2**22 + 1  # above pid_max: no such process
    work = store.data_dir / "build" / f"{dead}-half"
    await asyncio.to_thread((work / "rootfs" / "etc").mkdir, parents=True)
    for name in ("orphan", "managers-snapshot"):
        tree = tmp_path / f"{name}-tree"
        await asyncio.to_thread((tree / "etc").mkdir, parents=True)
        await store.storage.add_template(name, tree)
    # The store had claimed "orphan" (its files came, its metadata never did); the other
    # storage template was made by someone else (the manager's snapshots) and must stay.
    await asyncio.to_thread((store.data_dir / "build" / "orphan.lock").touch)

    fresh = TemplateStore(store.data_dir, OverlayStorage(store.data_dir / "overlay"))
    assert [i.name for i in await fresh.list()] == ["keep"]
    assert await fresh.storage.list_templates() == ["keep", "managers-snapshot"]
    assert not await asyncio.to_thread(work.exists)
    with pytest.raises(TemplateError, match="already used"):
        await fresh.import_tar("managers-snapshot", await rootfs_tar(tmp_path / "k2.tar"))
    assert await fresh.storage.list_templates() == ["keep", "managers-snapshot"]


async def test_cancelled_import_leaves_nothing(store: TemplateStore, tmp_path: Path) -> None:
    big = tmp_path / "big.tar"

    def make_big() -> None:
        with tarfile.open(big, "w") as tar:
            _add(tar, "./", tarfile.DIRTYPE, mode=0o755)
            chunk = os.urandom(1 << 20)
            for i in range(300):
                _add(tar, f"./blob{i}", data=chunk)

    await asyncio.to_thread(make_big)
    started = asyncio.Event()

    def progress(line: str) -> None:
        if line.startswith("unpacking"):
            started.set()

    task = asyncio.create_task(store.import_tar("big", big, progress))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await leftovers(store) == []


def test_recipes_digest_tracks_packages() -> None:
    base = RECIPES["base"]
    changed = templates.Recipe(base.name, base.parent, (*base.packages, "vim"), base.npm)
    assert changed.digest() != base.digest()
    other_npm = NpmRelease("10.9.8", base.npm.integrity if base.npm else "")
    assert templates.Recipe(base.name, None, base.packages, other_npm).digest() != base.digest()
    assert {"bash", "python3", "python-is-python3", "python3-pip", "nodejs"} <= set(base.packages)
    assert {"sudo", "curl", "git", "procps"} <= set(base.packages)
    assert base.npm == templates.NPM
    assert RECIPES["code-interpreter-v1"].parent == "base"


def test_code_interpreter_installs_a_hash_pinned_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = RECIPES["code-interpreter-v1"]
    assert recipe.pip_lock is not None
    lock = templates.builder.pip_lock_text(recipe.pip_lock)
    pins = {
        line.split("==")[0]: line.split("==")[1].split()[0]
        for line in lock.splitlines()
        if "==" in line and not line.startswith(" ")
    }
    # e2b-charts needs numpy>=2.2 and matplotlib>=3.10: newer than Debian's, so from PyPI.
    assert {"e2b-charts", "numpy", "pandas", "matplotlib", "pillow", "pydantic"} <= set(pins)
    assert lock.count("--hash=sha256:") >= len(pins)
    # The lock is part of the digest (a new lock rebuilds), and only of that recipe's.
    before, base = recipe.digest(), RECIPES["base"].digest()
    monkeypatch.setattr(templates.builder, "pip_lock_text", lambda name: lock + "# changed\n")
    assert recipe.digest() != before
    assert RECIPES["base"].digest() == base


def _fake_npm_tarball(path: Path) -> NpmRelease:
    """A tarball laid out as npm's own (package/...), and the release that pins it."""
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/package.json", data=b'{"name": "npm", "version": "0.0.1-test"}\n')
        for cli in ("npm-cli.js", "npx-cli.js"):
            _add(tar, f"package/bin/{cli}", data=b"#!/usr/bin/env node\n", mode=0o755)
    digest = base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    return NpmRelease("0.0.1-test", f"sha512-{digest}")


@contextlib.contextmanager
def _serving(directory: Path) -> Iterator[str]:
    """A real HTTP server for `directory` on a free loopback port (a stand-in registry)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_npm_is_downloaded_pinned_then_installed_from_the_cache(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    release = _fake_npm_tarball(registry / "npm" / "-" / "npm-0.0.1-test.tgz")
    cache = tmp_path / "cache"
    lines: list[str] = []

    async def install(url: str, pin: NpmRelease, rootfs: Path) -> None:
        await asyncio.to_thread((rootfs / "usr" / "local" / "bin").mkdir, parents=True)
        await TemplateBuilder(cache, npm_registry=url).install_npm("t", pin, rootfs, lines.append)

    with _serving(registry) as url:
        wrong = NpmRelease(release.version, "sha512-" + base64.b64encode(b"x" * 64).decode())
        with pytest.raises(TemplateError, match="does not match the pinned"):
            await install(url, wrong, tmp_path / "refused")
        assert not (cache / "npm" / release.tarball).exists()
        await install(url, release, tmp_path / "first")
    assert any("downloaded" in line for line in lines)
    # The registry is gone: the cached tarball does, once it is checked again.
    await install(url, release, tmp_path / "second")
    assert any("cached, sha512 verified" in line for line in lines)
    for rootfs in (tmp_path / "first", tmp_path / "second"):
        npm = rootfs / "usr" / "local" / "lib" / "node_modules" / "npm"
        assert (npm / "package.json").is_file()
        assert (npm / "npmrc").read_text() == "prefix=/usr/local\n"
        for command in ("npm", "npx"):
            link = rootfs / "usr" / "local" / "bin" / command
            assert os.readlink(link) == f"../lib/node_modules/npm/bin/{command}-cli.js"
            assert os.access(link, os.X_OK)
    # A damaged cached tarball is not trusted (and cannot be fetched again now).
    (cache / "npm" / release.tarball).write_bytes(b"damaged")
    with pytest.raises(TemplateError, match="cannot download"):
        await install(url, release, tmp_path / "third")


def test_mirror_comes_from_debian_sources(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\n# c\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert templates.debian_mirror(sources) == "http://mirror.example/debian"
    assert templates.debian_mirror(tmp_path / "missing") == "http://deb.debian.org/debian"


# Real builds ----------------------------------------------------------------------------------
# The head of Debian 12's stock /etc/profile, which forks `id -u` in every login shell.
DEBIAN_PROFILE_HEAD = """if [ "$(id -u)" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH
"""
ROOT_LOGIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"


def _login_path(profile: str, uid: int) -> subprocess.CompletedProcess[str]:
    """bash as `uid` sourcing `profile` with no `id` anywhere on its PATH."""
    return subprocess.run(
        ["/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         "/bin/bash", "-s"],
        input=profile + 'echo "$PATH"\n', env={"PATH": "/nonexistent"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(("uid", "path"), [(0, ROOT_LOGIN_PATH), (1000, USER_LOGIN_PATH)])
def test_base_login_profile_needs_no_id(tmp_path: Path, uid: int, path: str) -> None:
    (tmp_path / "etc" / "sudoers.d").mkdir(parents=True)
    (tmp_path / "etc" / "profile").write_text(DEBIAN_PROFILE_HEAD)
    assert "id: command not found" in _login_path(DEBIAN_PROFILE_HEAD, uid).stderr

    builder._configure_base(tmp_path)

    login = _login_path((tmp_path / "etc" / "profile").read_text(), uid)
    assert (login.stdout.strip(), login.stderr) == (path, "")


def _passwd_entry(root: Path, user: str) -> list[str]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields
    raise AssertionError(f"no {user} in {root}/etc/passwd")


@pytest.mark.slow
def test_built_base_has_user_home_python_sudo(base_template_root: Path) -> None:
    root = base_template_root
    assert _passwd_entry(root, "user")[2:4] == ["1000", "1000"]
    assert _passwd_entry(root, "user")[5:7] == ["/home/user", "/bin/bash"]
    home = os.lstat(root / "home" / "user")
    assert stat.S_ISDIR(home.st_mode)
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    for program in ("python3", "bash", "sudo", "curl", "git", "ps"):
        assert (root / "usr" / "bin" / program).exists(), program
    sudoers = root / "etc" / "sudoers.d" / "user"
    assert "NOPASSWD" in sudoers.read_text()
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    shadow = {f[0]: f[1] for f in (x.split(":") for x in (root / "etc/shadow").read_text().split())}
    assert (shadow["root"], shadow["user"]) == ("", ""), "no passwords, as in E2B"
    for shared in ("code", "usr/local", "usr/local/bin", "usr/local/lib/python3.11/dist-packages"):
        assert stat.S_IMODE((root / shared).stat().st_mode) == 0o777, shared
    assert "break-system-packages = true" in (root / "etc" / "pip.conf").read_text()
    assert "localhost" in (root / "etc" / "hosts").read_text()
    assert "myhostname" in (root / "etc" / "nsswitch.conf").read_text()
    assert not list((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    assert '"${EUID:-$(id -u)}"' in (root / "etc" / "profile").read_text()


def _as_user_on_a_clone(root: Path, tmp_path: Path, script: str) -> str:
    """`bash -l -c script` as `user` in a throwaway overlay over a built template (the
    template itself stays untouched); its stdout."""
    layers = [tmp_path / name for name in ("upper", "work", "merged")]
    for layer in layers:
        layer.mkdir()
    result = subprocess.run(
        [
            "unshare", "-m", "--propagation", "private", "sh", "-euc",
            'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4"\n'
            'exec chroot --userspec=1000:1000 "$4" /usr/bin/env -i HOME=/home/user USER=user '
            'PATH=/usr/bin:/bin /bin/bash -l -c "cd && $5"',
            "sh", str(root), *map(str, layers), script,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# What a user of E2B's base template counts on finding on PATH.
E2B_BASE_COMMANDS = (
    "python", "python3", "pip", "pip3", "node", "npm", "npx", "git", "curl", "wget", "sudo",
    "ssh", "make", "unzip", "xz", "bzip2", "file", "patch", "ps",
)  # fmt: skip


# Installs without sudo, without a venv and without the network, as in E2B's base.
INSTALL_AS_USER = r"""
mkdir -p pyx/pyx && echo X=1 > pyx/pyx/__init__.py
printf '[project]\nname = "pyx"\nversion = "1"\n' > pyx/pyproject.toml
pip install -q --no-index --no-build-isolation ./pyx
echo "pyx $(python -c 'import pyx; print(pyx.__file__)')"
mkdir nx && cd nx
echo '{"name": "nx", "version": "1.0.0", "bin": {"nx-hi": "hi.js"}}' > package.json
printf '#!/usr/bin/env node\nconsole.log("hi from nx")\n' > hi.js
npm pack -q > /dev/null && npm install -g -q --offline ./nx-1.0.0.tgz > /dev/null
echo "nx $(command -v nx-hi) $(nx-hi)"
python -m venv ~/venv && echo "venv $(~/venv/bin/pip --version | cut -d' ' -f1)"
"""


@pytest.mark.slow
def test_built_base_has_e2b_base_tools_for_user(
    base_template_root: Path,
    tmp_path: Path,
) -> None:
    script = "\n".join(
        [
            *(f'echo "path.{c} $(command -v {c})"' for c in E2B_BASE_COMMANDS),
            'echo "version.python $(python --version)"',
            'echo "version.pip $(pip --version)"',
            'echo "version.node $(node --version)"',
            'echo "version.npm $(npm --version)"',
            'echo "npm.prefix $(npm config get prefix)"',
            'echo "groups $(id -nG)"',
            'echo "sudo $(sudo -n whoami)"',
            INSTALL_AS_USER,
        ]
    )
    output = _as_user_on_a_clone(base_template_root, tmp_path, script)
    out = dict(line.split(" ", 1) for line in output.splitlines())
    missing = [c for c in E2B_BASE_COMMANDS if not out.get(f"path.{c}", "").startswith("/usr/")]
    assert missing == []
    assert out["version.python"].startswith("Python 3.11.")
    assert out["version.pip"].startswith("pip ")
    assert out["version.node"].startswith("v18.")
    assert out["version.npm"] == templates.NPM.version
    assert out["npm.prefix"] == "/usr/local"
    assert "sudo" in out["groups"].split()
    assert out["sudo"] == "root"
    assert out["pyx"] == "/usr/local/lib/python3.11/dist-packages/pyx/__init__.py"
    assert out["nx"] == "/usr/local/bin/nx-hi hi from nx"
    assert out["venv"] == "pip"


@pytest.mark.slow
async def test_built_base_runs_python_as_user(base_template_root: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "chroot", "--userspec=1000:1000", str(base_template_root),
        "/usr/bin/python3", "-c", "import os, sys; print(os.getuid(), sys.version_info[:2])",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().strip() == "1000 (3, 11)"


@pytest.mark.slow
async def test_built_code_interpreter_imports_its_packages(
    code_interpreter_template_root: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "/usr/sbin/chroot", "--userspec=1000:1000", str(code_interpreter_template_root),
        "/usr/bin/python3", "-c", "import ipykernel, numpy, pandas, matplotlib; print('ok')",
        stdout=asyncio.subprocess.PIPE,
        env={"HOME": "/home/user", "PATH": "/usr/bin:/bin", "MPLCONFIGDIR": "/tmp"},
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().strip() == "ok"


async def test_metadata_without_files_on_this_backend(store: TemplateStore, tmp_path: Path) -> None:
    """Same data dir, another storage (e.g. switched from overlay to zfs): not usable."""
    await store.import_tar("mine", await rootfs_tar(tmp_path / "m.tar"))
    other = TemplateStore(store.data_dir, OverlayStorage(tmp_path / "other-overlay"))
    assert await other.list() == []
    with pytest.raises(TemplateError, match="no files in overlay storage"):
        await other.ensure("mine")
