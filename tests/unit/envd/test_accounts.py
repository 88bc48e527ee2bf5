"""A sandbox's accounts, cached: `current` (no file access) is never stale, whatever changes."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from asyncinotify import Inotify

from coppice_envd.permissions.accounts import Accounts
from coppice_jails.confined import ConfinedRoot

PASSWD = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n"
GROUP = "root:x:0:\nuser:x:1000:\n"
BOB = "bob:x:1001:1001::/home/bob:/bin/sh\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return tmp_path


def read(root: Path) -> Accounts:
    with ConfinedRoot(root) as confined:
        return Accounts.read(confined)


def _append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def _replace(path: Path, text: str) -> None:
    """As useradd and friends do: a new file renamed over the old one."""
    (path.parent / (path.name + "+")).write_text(text)
    os.rename(path.parent / (path.name + "+"), path)


def test_current_only_after_a_read(root: Path) -> None:
    assert Accounts.current(root) is None
    accounts = read(root)
    assert Accounts.current(root) is accounts
    user = accounts.user("user")
    assert user is not None
    assert (user.uid, user.home) == (1000, "/home/user")


def _swap_etc(root: Path) -> None:
    os.rename(root / "etc", root / "etc.old")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD + BOB)


def _remove_etc(root: Path) -> None:
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "group").unlink()
    (root / "etc").rmdir()


CHANGES: dict[str, Callable[[Path], None]] = {
    "append to passwd": lambda root: _append(root / "etc" / "passwd", BOB),
    "replace passwd": lambda root: _replace(root / "etc" / "passwd", PASSWD + BOB),
    "replace group": lambda root: _replace(root / "etc" / "group", GROUP + "bob:x:1001:\n"),
    "delete group": lambda root: (root / "etc" / "group").unlink(),
    "chmod passwd": lambda root: (root / "etc" / "passwd").chmod(0o600),
    "swap /etc": lambda root: _swap_etc(root),
    "remove /etc": lambda root: _remove_etc(root),
}


@pytest.mark.parametrize("change", CHANGES)
def test_any_change_ends_currency_until_read_again(root: Path, change: str) -> None:
    before = read(root)
    CHANGES[change](root)
    assert Accounts.current(root) is None
    after = read(root)
    assert after is not before
    if (root / "etc").is_dir():
        assert Accounts.current(root) is after  # watched again


def test_other_files_in_etc_do_not_matter(root: Path) -> None:
    accounts = read(root)
    (root / "etc" / "hostname").write_text("box\n")
    _replace(root / "etc" / "hosts", "127.0.0.1 localhost\n")
    assert Accounts.current(root) is accounts


def test_a_new_user_is_seen_at_once(root: Path) -> None:
    assert read(root).user("bob") is None
    _replace(root / "etc" / "passwd", PASSWD + BOB)
    current = Accounts.current(root) or read(root)
    bob = current.user("bob")
    assert bob is not None
    assert bob.uid == 1001


def test_without_inotify_watches_every_request_reads(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_watches(*_: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(Inotify, "add_watch", out_of_watches)
    accounts = read(root)
    assert accounts.user("user") is not None
    assert Accounts.current(root) is None


@pytest.fixture
def elsewhere(root: Path) -> Path:
    """A second etc directory inside the root, for symlinks to point at."""
    other = root / "data"
    other.mkdir()
    (other / "passwd").write_text(PASSWD + BOB)
    (other / "group").write_text(GROUP)
    return other


@pytest.mark.parametrize("linked", ["/etc", "/etc/passwd", "/etc/group"])
def test_symlinked_databases_are_never_current(root: Path, elsewhere: Path, linked: str) -> None:
    """Changes behind a symlink would not show in /etc: such roots always read their files."""
    target = root / linked.lstrip("/")
    if linked == "/etc":
        for name in ("passwd", "group"):
            (target / name).unlink()
        target.rmdir()
        target.symlink_to("/data")
    else:
        target.unlink()
        target.symlink_to(f"/data/{target.name}")
    accounts = read(root)
    assert accounts.user("user") is not None
    assert Accounts.current(root) is None
    _append(elsewhere / "passwd", "carol:x:1002:1002::/home/carol:/bin/sh\n")
    if linked != "/etc/group":
        assert read(root).user("carol") is not None
