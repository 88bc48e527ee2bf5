"""TemplateStore: tar import (and its safety), listing, aliases, errors, interrupted builds,
and real debootstrap builds (cached across runs, see template_fixtures)."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from template_fixtures import (  # noqa: F401
    base_template_root,
    code_interpreter_template_root,
)
from zfs_fixtures import zfs_dataset  # noqa: F401

from coppice_api.jails import templates
from coppice_api.jails.storage.overlay import OverlayStorage
from coppice_api.jails.storage.zfs import ZfsStorage
from coppice_api.jails.templates import (
    RECIPES,
    TemplateError,
    TemplateStore,
    UnknownTemplate,
    format_template_table,
)

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
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
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
    real_stream = templates._stream

    async def dying_debootstrap(argv: Sequence[str], say: templates.Progress) -> None:
        if "debootstrap" not in argv:
            await real_stream(argv, say)
            return
        target = Path(argv[-2])
        await asyncio.to_thread((target / "etc").mkdir, parents=True)
        await asyncio.to_thread((target / "etc" / "half-written").write_text, "x")
        raise TemplateError("debootstrap was killed")

    monkeypatch.setattr(templates, "_stream", dying_debootstrap)
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
    changed = templates.Recipe(base.name, base.parent, (*base.packages, "vim"))
    assert changed.digest() != base.digest()
    assert {"bash", "python3", "sudo", "curl", "git", "procps"} <= set(base.packages)
    assert RECIPES["code-interpreter-v1"].parent == "base"


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

    templates._configure_base(tmp_path)

    login = _login_path((tmp_path / "etc" / "profile").read_text(), uid)
    assert (login.stdout.strip(), login.stderr) == (path, "")


def _passwd_entry(root: Path, user: str) -> list[str]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields
    raise AssertionError(f"no {user} in {root}/etc/passwd")


@pytest.mark.slow
def test_built_base_has_user_home_python_sudo(base_template_root: Path) -> None:  # noqa: F811
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
    assert "localhost" in (root / "etc" / "hosts").read_text()
    assert "myhostname" in (root / "etc" / "nsswitch.conf").read_text()
    assert not list((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    assert '"${EUID:-$(id -u)}"' in (root / "etc" / "profile").read_text()


@pytest.mark.slow
async def test_built_base_runs_python_as_user(base_template_root: Path) -> None:  # noqa: F811
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
    code_interpreter_template_root: Path,  # noqa: F811
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
