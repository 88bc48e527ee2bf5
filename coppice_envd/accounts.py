"""Users, owner names and group names as a sandbox's own /etc/passwd and /etc/group give them.

Looked up through the sandbox's `ConfinedRoot`, never the host's databases. Every request needs
them (the effective user, EntryInfo's owner/group), so the parsed databases are cached per
sandbox root and re-read only when either file changes (inode, size, mtime or ctime).
Blocking: call from a thread.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from coppice_api.jails.confined import ConfinedRoot
from coppice_api.jails.runtime.base import User
from coppice_api.jails.users import UnknownUser, lookup_user

_DATABASE_LIMIT = 4 * 1024 * 1024
_DATABASES = ("/etc/passwd", "/etc/group")
_CACHED_ROOTS = 1024

Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _read(root: ConfinedRoot, path: str) -> str:
    try:
        fd = root.open(path)
    except OSError:
        return ""
    try:
        chunks = []
        size = 0
        while size < _DATABASE_LIMIT and (chunk := os.read(fd, 256 * 1024)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _names_by_id(text: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for line in text.splitlines():
        row = line.split(":")
        if not line.startswith("#") and len(row) >= 3 and row[2].isdigit():
            names.setdefault(int(row[2]), row[0])
    return names


@dataclass
class Accounts:
    """One version of a sandbox's passwd and group: users by name, and names by id."""

    user_names: dict[int, str]
    group_names: dict[int, str]
    _users: dict[str, User | None] = field(default_factory=dict)

    @classmethod
    def read(cls, root: ConfinedRoot) -> Accounts:
        """The sandbox's accounts (cached until its passwd or group changes)."""
        return _cache.get(root)

    def user_name(self, uid: int) -> str:
        """The name of `uid`, or the decimal id when the sandbox has no such user (as envd)."""
        return self.user_names.get(uid, str(uid))

    def group_name(self, gid: int) -> str:
        return self.group_names.get(gid, str(gid))

    def user(self, root: ConfinedRoot, name: str) -> User | None:
        """The user `name` (coppice_api.jails.users semantics), or None if there is none."""
        if name not in self._users:
            try:
                self._users[name] = lookup_user(root, name)
            except UnknownUser:
                self._users[name] = None
        return self._users[name]


class _AccountsCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Stamp, Accounts]] = OrderedDict()

    @staticmethod
    def _stamp(root: ConfinedRoot) -> Stamp:
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in _DATABASES:
            try:
                fd = root.open(path, os.O_PATH)
            except OSError:
                stamps.append(None)
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def get(self, root: ConfinedRoot) -> Accounts:
        key = str(root.root)
        stamp = self._stamp(root)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached[0] == stamp:
                self._entries.move_to_end(key)
                return cached[1]
        accounts = Accounts(
            user_names=_names_by_id(_read(root, "/etc/passwd")),
            group_names=_names_by_id(_read(root, "/etc/group")),
        )
        with self._lock:
            self._entries[key] = (stamp, accounts)
            self._entries.move_to_end(key)
            while len(self._entries) > _CACHED_ROOTS:
                self._entries.popitem(last=False)
        return accounts


_cache = _AccountsCache()
