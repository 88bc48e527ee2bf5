"""Users, owner names and group names as a sandbox's own /etc/passwd and /etc/group give them.

Looked up through the sandbox's `ConfinedRoot`, never the host's databases. Every request needs
them (the effective user, EntryInfo's owner/group), so the parsed databases are cached per
sandbox root. `Accounts.read` (blocking: call from a thread) re-reads them when either file
changed (inode, size, mtime or ctime). `Accounts.current` answers on the event loop, without
touching the sandbox's files: an inotify watch on the sandbox's /etc says whether the databases
changed since they were read, so the requests that need nothing else from the sandbox's files
(a process start) need no thread at all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User
from coppice_jails.users import UnknownUser, find_user, read_database

_DATABASE_NAMES = ("passwd", "group")
_CACHED_ROOTS = 1024
# What can change a database in /etc, or /etc itself; IGNORED and UNMOUNT always come.
_ETC_EVENTS = (
    Mask.MODIFY | Mask.ATTRIB | Mask.CLOSE_WRITE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.CREATE
    | Mask.DELETE | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR
)  # fmt: skip
_ETC_GONE = Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED | Mask.UNMOUNT

Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _read(root: ConfinedRoot, path: str) -> str:
    try:
        return read_database(root, path)
    except OSError:
        return ""  # unreadable (a directory, ...): no accounts, rather than failed requests


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

    passwd: str
    group: str
    user_names: dict[int, str] = field(init=False)
    group_names: dict[int, str] = field(init=False)
    _users: dict[str, User | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.user_names = _names_by_id(self.passwd)
        self.group_names = _names_by_id(self.group)

    @classmethod
    def read(cls, root: ConfinedRoot) -> Accounts:
        """The sandbox's accounts (cached until its passwd or group changes). Blocking."""
        return _cache.get(root)

    @classmethod
    def current(cls, sandbox_root: Path) -> Accounts | None:
        """The cached accounts of a sandbox root if they are known to be current without reading
        any of its files, else None (then `read` them in a thread). Never blocks."""
        return _cache.current(str(sandbox_root))

    def user_name(self, uid: int) -> str:
        """The name of `uid`, or the decimal id when the sandbox has no such user (as envd)."""
        return self.user_names.get(uid, str(uid))

    def group_name(self, gid: int) -> str:
        return self.group_names.get(gid, str(gid))

    def user(self, name: str) -> User | None:
        """The user `name` (coppice_jails.users semantics), or None if there is none."""
        if name not in self._users:
            try:
                self._users[name] = find_user(self.passwd, self.group, name)
            except UnknownUser:
                self._users[name] = None
        return self._users[name]


class _EtcWatches:
    """One inotify instance watching the /etc of every cached sandbox root.

    Each watched root has a generation, renewed (from one counter, never reused) whenever its
    passwd, group or /etc itself may have changed; accounts read after the watch was armed carry
    the generation of that moment, and are current while it stays the same.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inotify: Inotify | None = None
        self._counter = itertools.count(1)
        self._armed: dict[str, tuple[int, int]] = {}  # root key -> (watch descriptor, generation)
        self._roots: dict[int, str] = {}  # watch descriptor -> root key

    def arm(self, root: ConfinedRoot, key: str) -> int | None:
        """Watch the root's /etc (blocking); the generation to stamp what is read next with, or
        None when /etc cannot be trusted to tell (not a plain directory, or symlinked
        databases: changes elsewhere would not show)."""
        with self._lock:
            if key in self._armed:  # watched since before: any change since is a queued event
                return self._armed[key][1]
        try:
            etc = root.open("/etc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            self._disarm(key)
            return None
        try:
            for name in _DATABASE_NAMES:
                try:
                    if stat.S_ISLNK(os.lstat(name, dir_fd=etc).st_mode):
                        self._disarm(key)
                        return None
                except FileNotFoundError:
                    pass  # creating it later is an event like any change
            with self._lock:
                if key not in self._armed:
                    try:
                        if self._inotify is None:
                            self._inotify = Inotify(sync_timeout=0)
                        watch = self._inotify.add_watch(f"/proc/self/fd/{etc}", _ETC_EVENTS)
                    except OSError:
                        return None  # e.g. out of inotify watches: every request reads then
                    if self._roots.setdefault(watch.wd, key) != key:
                        return None  # another root's very directory (a bind mount): not ours
                    self._armed[key] = (watch.wd, next(self._counter))
                return self._armed[key][1]
        finally:
            os.close(etc)

    def generation(self, key: str) -> int | None:
        """The root's generation once every queued event is applied; None when unwatched."""
        with self._lock:
            if self._inotify is not None:
                while (event := self._inotify.sync_get()) is not None:
                    self._apply(event.mask, event.watch, event.name)
            armed = self._armed.get(key)
            return None if armed is None else armed[1]

    def _apply(self, mask: Mask, watch: Watch | None, name: Path | None) -> None:
        if Mask.Q_OVERFLOW in mask:
            for key, (wd, _) in self._armed.items():
                self._armed[key] = (wd, next(self._counter))
            return
        if watch is None:
            return
        root_key = self._roots.get(watch.wd)
        if Mask.IGNORED in mask:
            self._roots.pop(watch.wd, None)
        if root_key is None or self._armed.get(root_key, (None,))[0] != watch.wd:
            return
        if mask & _ETC_GONE:
            del self._armed[root_key]  # read again, and watch again, whatever /etc is now
            if Mask.IGNORED not in mask and self._inotify is not None:
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(watch)
        elif name is None or name.name in _DATABASE_NAMES:
            self._armed[root_key] = (watch.wd, next(self._counter))

    def _disarm(self, key: str) -> None:
        with self._lock:
            self._armed.pop(key, None)


@dataclass
class _Entry:
    stamp: Stamp
    accounts: Accounts
    generation: int | None


class _AccountsCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._watches = _EtcWatches()

    @staticmethod
    def _stamp(root: ConfinedRoot) -> Stamp:
        stamps: list[tuple[int, int, int, int] | None] = []
        for name in _DATABASE_NAMES:
            try:
                fd = root.open(f"/etc/{name}", os.O_PATH)
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
        key = root.key
        generation = self._watches.arm(root, key)  # before reading: later changes are events
        stamp = self._stamp(root)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached.stamp == stamp:
                cached.generation = generation
                self._entries.move_to_end(key)
                return cached.accounts
        accounts = Accounts(passwd=_read(root, "/etc/passwd"), group=_read(root, "/etc/group"))
        with self._lock:
            self._entries[key] = _Entry(stamp, accounts, generation)
            self._entries.move_to_end(key)
            while len(self._entries) > _CACHED_ROOTS:
                self._entries.popitem(last=False)
        return accounts

    def current(self, key: str) -> Accounts | None:
        generation = self._watches.generation(key)
        with self._lock:
            cached = self._entries.get(key)
        if generation is None or cached is None or cached.generation != generation:
            return None
        return cached.accounts


_cache = _AccountsCache()
