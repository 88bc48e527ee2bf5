"""Users as a sandbox knows them: from its own /etc/passwd and /etc/group, never the host's.

The files are read through a ConfinedRoot, so a sandbox whose /etc/passwd is a symlink to a host
file only ever reads files of its own tree. Blocking: call from a thread.
"""

from __future__ import annotations

from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User

_MAX_FILE_BYTES = 4 * 1024 * 1024


class UnknownUser(Exception):
    """No such user in the sandbox's /etc/passwd."""


def lookup_user(root: ConfinedRoot, name: str) -> User:
    """The user called `name` (or, if `name` is a number and no user has that name, by uid)."""
    return find_user(read_database(root, "/etc/passwd"), read_database(root, "/etc/group"), name)


def find_user(passwd: str, group: str, name: str) -> User:
    """`lookup_user` on the texts of /etc/passwd and /etc/group."""
    entries = _entries(passwd, 7)
    entry = next((e for e in entries if e[0] == name), None)
    if entry is None and name.isdigit():
        entry = next((e for e in entries if e[2] == name), None)
    if entry is None:
        raise UnknownUser(f"no user {name!r} in the sandbox's /etc/passwd")
    user_name, _, uid, gid, _, home, _ = entry
    if not (uid.isdigit() and gid.isdigit()):
        raise UnknownUser(f"bad /etc/passwd entry for {name!r}")
    primary = int(gid)
    supplementary = [
        int(group_id)
        for _, _, group_id, members in _entries(group, 4)
        if user_name in members.split(",") and group_id.isdigit()
    ]
    groups = (primary, *sorted(set(supplementary) - {primary}))
    return User(name=user_name, uid=int(uid), gid=primary, home=home, groups=groups)


def read_database(root: ConfinedRoot, path: str) -> str:
    """The text of /etc/passwd or /etc/group (at most 4 MiB); a missing file is empty."""
    try:
        return root.read_bytes(path, _MAX_FILE_BYTES).decode(errors="replace")
    except FileNotFoundError:
        return ""


def _entries(text: str, fields: int) -> list[list[str]]:
    """The well-formed lines of a colon-separated file."""
    rows = (line.split(":") for line in text.splitlines() if not line.startswith("#"))
    return [row for row in rows if len(row) == fields]
