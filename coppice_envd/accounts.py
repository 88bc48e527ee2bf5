"""Owner and group names as a sandbox's own /etc/passwd and /etc/group give them (EntryInfo's
`owner`/`group`). Users by name are `coppice_api.jails.users`. Blocking: call from a thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from coppice_api.jails.confined import ConfinedRoot

_DATABASE_LIMIT = 4 * 1024 * 1024


def _names_by_id(root: ConfinedRoot, path: str) -> dict[int, str]:
    try:
        text = root.read_bytes(path, _DATABASE_LIMIT).decode("utf-8", "replace")
    except OSError:
        return {}
    names: dict[int, str] = {}
    for line in text.splitlines():
        row = line.split(":")
        if not line.startswith("#") and len(row) >= 3 and row[2].isdigit():
            names.setdefault(int(row[2]), row[0])
    return names


@dataclass(frozen=True)
class Accounts:
    """uid and gid → name, from one read of the sandbox's databases."""

    user_names: dict[int, str]
    group_names: dict[int, str]

    @classmethod
    def read(cls, root: ConfinedRoot) -> Accounts:
        return cls(
            user_names=_names_by_id(root, "/etc/passwd"),
            group_names=_names_by_id(root, "/etc/group"),
        )

    def user_name(self, uid: int) -> str:
        """The name of `uid`, or the decimal id when the sandbox has no such user (as envd)."""
        return self.user_names.get(uid, str(uid))

    def group_name(self, gid: int) -> str:
        return self.group_names.get(gid, str(gid))
