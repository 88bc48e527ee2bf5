"""Users come from the sandbox's own /etc/passwd and /etc/group, never from the host's."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User
from coppice_jails.users import UnknownUser, lookup_user

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
# a comment
user:x:1000:1000::/home/user:/bin/bash
broken line
svc:x:999:998:service:/var/lib/svc:/usr/sbin/nologin
"""
GROUP = """\
root:x:0:
sudo:x:27:user
tty:x:5:
user:x:1000:
docker:x:998:svc,user
"""


def make_root(tmp_path: Path, passwd: str = PASSWD, group: str = GROUP) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(passwd)
    (root / "etc" / "group").write_text(group)
    return root


def lookup(root: Path, name: str) -> User:
    with ConfinedRoot(root) as confined:
        return lookup_user(confined, name)


def test_user_by_name_with_supplementary_groups(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    assert lookup(root, "user") == User("user", 1000, 1000, "/home/user", (1000, 27, 998))
    assert lookup(root, "root") == User("root", 0, 0, "/root", (0,))


def test_user_by_numeric_uid(tmp_path: Path) -> None:
    assert lookup(make_root(tmp_path), "999") == User("svc", 999, 998, "/var/lib/svc", (998,))


@pytest.mark.parametrize("name", ["nobody", "12345", "", "broken line"])
def test_unknown_user(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnknownUser):
        lookup(make_root(tmp_path), name)


def test_missing_passwd_means_no_users(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(UnknownUser):
        lookup(tmp_path / "root", "root")


def test_symlinked_passwd_cannot_reach_the_host(tmp_path: Path) -> None:
    """A sandbox's /etc/passwd pointing at the host's resolves inside the sandbox root."""
    host_passwd = tmp_path / "host-passwd"
    host_passwd.write_text("hostonly:x:4242:4242::/host:/bin/sh\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(host_passwd)  # absolute: host path
    (root / "etc" / "group").symlink_to("../../host-passwd")  # relative: climbs out
    with pytest.raises(UnknownUser):
        lookup(root, "hostonly")
    # The same name inside the root's own tree at that path is what is read instead.
    inner = root / str(host_passwd).lstrip("/")
    inner.parent.mkdir(parents=True)
    inner.write_text("inner:x:7:7::/inner:/bin/sh\n")
    assert lookup(root, "inner") == User("inner", 7, 7, "/inner", (7,))
