"""Both real storage backends: zfs (on a zfs-fuse pool made for the run) and overlayfs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from fixtures.zfs import unique

from coppice_jails.storage.base import Storage, StorageError, run_command
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.storage.zfs import ZfsStorage


def make_small_tree(root: Path) -> Path:
    """A tiny stand-in for a root filesystem: dirs, files, a symlink, an owned home."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("template\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "home" / "user").mkdir(parents=True)
    os.chown(root / "home" / "user", 1000, 1000)
    (root / "usr").mkdir()
    (root / "usr" / "bin").symlink_to("../bin")
    return root


@pytest.fixture
async def template(storage: Storage, tmp_path: Path) -> str:
    name = unique("tpl")
    tree = await asyncio.to_thread(make_small_tree, tmp_path / "tree")
    await storage.add_template(name, tree)
    return name


def read(path: Path) -> str:
    return path.read_text()


async def exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def test_template_is_listed_with_its_files(storage: Storage, template: str) -> None:
    assert await storage.has_template(template)
    assert template in await storage.list_templates()
    root = await storage.template_root(template)
    assert await asyncio.to_thread(read, root / "etc" / "hostname") == "template\n"
    st = await asyncio.to_thread(os.stat, root / "home" / "user")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert await storage.template_size(template) > 0


async def test_clones_are_isolated(storage: Storage, template: str) -> None:
    a = await storage.clone(template, "sandboxa")
    b = await storage.clone(template, "sandboxb")
    assert a != b
    await asyncio.to_thread((a / "etc" / "only-in-a").write_text, "a\n")
    await asyncio.to_thread((a / "etc" / "hostname").write_text, "changed in a\n")
    assert await exists(a / "etc" / "only-in-a")
    assert not await exists(b / "etc" / "only-in-a")
    template_root = await storage.template_root(template)
    assert not await exists(template_root / "etc" / "only-in-a")
    assert await asyncio.to_thread(read, b / "etc" / "hostname") == "template\n"
    assert await asyncio.to_thread(read, template_root / "etc" / "hostname") == "template\n"
    assert await asyncio.to_thread(read, b / "usr" / "bin" / "tool") == "#!/bin/sh\necho tool\n"
    assert await storage.list_sandboxes() == ["sandboxa", "sandboxb"]


async def test_disk_used_counts_the_template_and_what_the_sandbox_writes(
    storage: Storage, template: str
) -> None:
    root = await storage.clone(template, "sandboxd")
    before = await storage.disk_used("sandboxd")
    assert before >= await storage.template_size(template) > 0
    await asyncio.to_thread((root / "home" / "user" / "big").write_bytes, os.urandom(1 << 20))
    if isinstance(storage, ZfsStorage):
        # ZFS counts what a transaction group committed (every 5 s on OpenZFS; zfs-fuse waits
        # far longer): setting a property commits one now.
        dataset = f"{storage.dataset}/sandboxes/sandboxd"
        await run_command("zfs", "set", "coppice:test-sync=1", dataset)
    assert await storage.disk_used("sandboxd") >= before + (1 << 20)
    with pytest.raises(StorageError):
        await storage.disk_used("nosuchsandbox")


async def test_snapshot_outlives_its_sandbox(storage: Storage, template: str) -> None:
    a = await storage.clone(template, "sandboxa")
    await asyncio.to_thread((a / "home" / "user" / "work.txt").write_text, "from a\n")
    await asyncio.to_thread((a / "etc" / "hostname").unlink)
    t2 = unique("snap")
    await storage.snapshot("sandboxa", t2)
    assert await storage.has_template(t2)

    # The sandbox stays usable after the snapshot, and later writes stay out of the template.
    await asyncio.to_thread((a / "after.txt").write_text, "later\n")
    assert await asyncio.to_thread(read, a / "home" / "user" / "work.txt") == "from a\n"

    await storage.destroy("sandboxa")
    assert await storage.list_sandboxes() == []
    c = await storage.clone(t2, "sandboxc")
    assert await asyncio.to_thread(read, c / "home" / "user" / "work.txt") == "from a\n"
    assert not await exists(c / "etc" / "hostname")
    assert not await exists(c / "after.txt")
    # The original template is untouched by the sandbox and its snapshot.
    root = await storage.template_root(template)
    assert not await exists(root / "home" / "user" / "work.txt")
    assert await exists(root / "etc" / "hostname")
    await storage.destroy("sandboxc")
    await storage.delete_template(t2)
    assert not await storage.has_template(t2)


async def test_destroy_is_idempotent(storage: Storage, template: str) -> None:
    root = await storage.clone(template, "sandboxa")
    await asyncio.to_thread((root / "x").write_text, "x")
    await storage.destroy("sandboxa")
    await storage.destroy("sandboxa")
    await storage.destroy("neverexisted")
    assert await storage.list_sandboxes() == []
    assert not await exists(root / "x")


async def test_template_in_use_cannot_be_deleted(storage: Storage, template: str) -> None:
    await storage.clone(template, "sandboxa")
    with pytest.raises(StorageError, match="in use"):
        await storage.delete_template(template)
    assert await storage.has_template(template)
    await storage.destroy("sandboxa")
    await storage.delete_template(template)
    assert not await storage.has_template(template)


async def test_duplicates_and_unknowns_are_refused(storage: Storage, template: str) -> None:
    await storage.clone(template, "sandboxa")
    with pytest.raises(StorageError, match="already exists"):
        await storage.clone(template, "sandboxa")
    with pytest.raises(StorageError, match="nosuchtemplate"):
        await storage.clone("nosuchtemplate", "sandboxb")
    with pytest.raises(StorageError, match="already exists"):
        await storage.snapshot("sandboxa", template)
    assert await storage.list_sandboxes() == ["sandboxa"]


@pytest.mark.parametrize(
    "bad", ["", "Upper", "-lead", ".hidden", "a/b", "..", "a..b", "x" * 64, "sp ace", "é"]
)
async def test_bad_names_are_rejected(storage: Storage, template: str, bad: str) -> None:
    with pytest.raises(StorageError, match="invalid"):
        await storage.clone(template, bad)
    with pytest.raises(StorageError, match="invalid"):
        await storage.clone(bad, "sandboxa")
    with pytest.raises(StorageError, match="invalid"):
        await storage.destroy(bad)
    with pytest.raises(StorageError, match="invalid"):
        await storage.add_template(bad, Path("/nonexistent"))
    assert await storage.list_sandboxes() == []


# A pid no process has: pid_max is at most 2**22.
DEAD_PID = 2**22 + 1


async def test_unfinished_template_work_is_dropped(storage: Storage, template: str) -> None:
    """Leftovers of a builder that died half-way never show up and are removed on next use."""
    fresh: Storage
    if isinstance(storage, OverlayStorage):
        leftover = storage.base_dir / "incoming" / f"{DEAD_PID}-half"
        await asyncio.to_thread((leftover / "rootfs").mkdir, parents=True)
        fresh = OverlayStorage(storage.base_dir)
        assert await fresh.list_templates() == [template]
        assert not await exists(leftover)
    else:
        assert isinstance(storage, ZfsStorage)
        half = f"{storage.dataset}/templates/half"
        proc = await asyncio.create_subprocess_exec(
            "zfs", "create", "-o", f"coppice:builder={DEAD_PID}", half
        )
        assert await proc.wait() == 0
        assert await storage.list_templates() == [template]
        fresh = ZfsStorage(storage.dataset)
        assert await fresh.list_templates() == [template]
        proc = await asyncio.create_subprocess_exec(
            "zfs", "list", half, stderr=asyncio.subprocess.DEVNULL
        )
        assert await proc.wait() != 0


async def test_destroy_while_another_mount_namespace_holds_a_copy(
    storage: Storage, template: str
) -> None:
    """A mount namespace made while a sandbox root is mounted (a jail started meanwhile that
    does not detach the host's mounts) keeps a copy of that mount. overlay: the host-side
    unmount is enough. zfs-fuse: the dataset stays busy while the copy lives, so destroy
    detaches the copy in that namespace."""
    root = await storage.clone(template, "sandboxa")
    holder = await asyncio.create_subprocess_exec(
        "unshare", "-m", "--propagation", "private", "sleep", "600"
    )
    try:
        # unshare execs sleep only after it made the namespace (and so copied the mounts).
        comm = Path(f"/proc/{holder.pid}/comm")
        while (await asyncio.to_thread(comm.read_text)).strip() != "sleep":  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        mountinfo = Path(f"/proc/{holder.pid}/mountinfo")
        assert f" {root} " in await asyncio.to_thread(mountinfo.read_text)
        await storage.destroy("sandboxa")
        assert await storage.list_sandboxes() == []
        if isinstance(storage, ZfsStorage):
            assert f" {root} " not in await asyncio.to_thread(mountinfo.read_text)
    finally:
        holder.kill()
        await holder.wait()


async def test_snapshot_template_deletable_while_its_source_lives(
    storage: Storage, template: str
) -> None:
    """The new template depends on nothing the source sandbox needs, and vice versa (zfs:
    the promotion is handed back), but sandboxes cloned from it keep it in use."""
    a = await storage.clone(template, "sandboxa")
    await asyncio.to_thread((a / "state").write_text, "a\n")
    await storage.snapshot("sandboxa", "fork")
    b = await storage.clone("fork", "sandboxb")
    with pytest.raises(StorageError, match="in use"):
        await storage.delete_template("fork")
    assert await asyncio.to_thread(read, b / "state") == "a\n"
    await storage.destroy("sandboxb")
    await storage.delete_template("fork")
    assert not await storage.has_template("fork")
    # The source sandbox is untouched and can still be snapshotted and destroyed.
    await asyncio.to_thread((a / "more").write_text, "more\n")
    assert await asyncio.to_thread(read, a / "state") == "a\n"
    await storage.snapshot("sandboxa", "fork2")
    await storage.destroy("sandboxa")
    c = await storage.clone("fork2", "sandboxc")
    assert await asyncio.to_thread(read, c / "more") == "more\n"
    await storage.destroy("sandboxc")
    await storage.delete_template("fork2")
    # The original template has no dependents left.
    await storage.delete_template(template)
    assert await storage.list_templates() == []
