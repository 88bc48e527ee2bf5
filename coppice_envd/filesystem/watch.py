"""Directory watches for WatchDir and the polling watchers (envd-contract §2.8, §2.9), on inotify
through `asyncinotify`.

Directories are opened through the sandbox's `ConfinedRoot` and watched via their fd, so a watch
never lands outside the sandbox. Event names are relative to the watched directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import stat
from collections.abc import Callable
from pathlib import Path

from asyncinotify import Event, Inotify, Mask, Watch
from filesystem import filesystem_pb2 as fs

from coppice_envd.filesystem.entryinfo import entry_info
from coppice_envd.filesystem.ops import is_upload_temp_name, upload_replaces
from coppice_envd.permissions.accounts import Accounts
from coppice_jails.confined import ConfinedRoot

_WATCH_MASK = (
    Mask.CREATE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.MOVE_SELF
    | Mask.ATTRIB
    | Mask.MODIFY
    | Mask.DELETE
    | Mask.DELETE_SELF
)
# inotify bits → proto event types, in the order envd emits them for one inotify event.
_EVENT_TYPES: tuple[tuple[Mask, fs.EventType], ...] = (
    (Mask.CREATE | Mask.MOVED_TO, fs.EVENT_TYPE_CREATE),
    (Mask.MOVED_FROM | Mask.MOVE_SELF, fs.EVENT_TYPE_RENAME),
    (Mask.ATTRIB, fs.EVENT_TYPE_CHMOD),
    (Mask.MODIFY, fs.EVENT_TYPE_WRITE),
    (Mask.DELETE | Mask.DELETE_SELF, fs.EVENT_TYPE_REMOVE),
)
_WITH_ENTRY = (fs.EVENT_TYPE_CREATE, fs.EVENT_TYPE_WRITE, fs.EVENT_TYPE_CHMOD)

EventSink = Callable[[fs.FilesystemEvent], None]


class WatchError(Exception):
    """The inotify watch failed while running (e.g. queue overflow): envd's `watcher error`."""


class DirectoryWatch:
    """An inotify watch on one sandbox directory (and, if recursive, everything below it)."""

    def __init__(
        self, root: ConfinedRoot, directory: str, *, recursive: bool, include_entry: bool
    ) -> None:
        self._root = root  # the watch's own handle on the sandbox, closed with it
        self._directory = directory  # resolved, in the root
        self._recursive = recursive
        self._include_entry = include_entry
        self._inotify = Inotify()
        self._root_watch: Watch | None = None
        self._moved_dirs: dict[int, str] = {}  # cookie → relative path of a dir moved away
        # cookie of an upload renamed into place → whether it replaces a file
        self._committed_uploads: dict[int, bool] = {}
        self._accounts: Accounts | None = None

    @classmethod
    def open_sync(
        cls, root: ConfinedRoot, directory: str, *, recursive: bool, include_entry: bool
    ) -> DirectoryWatch:
        """Watch `directory` (blocking). Raises OSError for the directory itself."""
        dir_fd = root.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        own_root = root.copy()
        try:
            watch = cls(
                own_root, root.path_of(dir_fd), recursive=recursive, include_entry=include_entry
            )
        except BaseException:
            own_root.close()
            os.close(dir_fd)
            raise
        try:
            watch._accounts = Accounts.read(root) if include_entry else None
            watch._root_watch = watch._add(dir_fd, ".")
            if recursive:
                watch._add_subtree(dir_fd, ".", created=None)
        except BaseException:
            watch.close()
            raise
        finally:
            os.close(dir_fd)
        return watch

    def close(self) -> None:
        self._inotify.close()
        self._root.close()

    def _add(self, dir_fd: int, relative: str) -> Watch:
        # Via the fd's /proc link: the kernel watches exactly the directory we opened.
        watch = self._inotify.add_watch(f"/proc/self/fd/{dir_fd}", _WATCH_MASK)
        watch.path = Path(relative)
        return watch

    def _add_subtree(
        self, dir_fd: int, relative: str, created: list[fs.FilesystemEvent] | None
    ) -> None:
        """Watch every directory below an open one; with `created`, also report what is there."""
        with os.scandir(dir_fd) as it:
            names = sorted((e.name for e in it), key=os.fsencode)
        for name in names:
            child = posixpath.normpath(posixpath.join(relative, name))
            try:
                st = os.lstat(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            if created is not None:
                created.append(fs.FilesystemEvent(name=child, type=fs.EVENT_TYPE_CREATE))
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                sub_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:
                continue  # unreadable subdirectories are skipped, as envd does
            try:
                self._add(sub_fd, child)
                self._add_subtree(sub_fd, child, created)
            finally:
                os.close(sub_fd)

    def _watch_new_directory(self, relative: str) -> list[fs.FilesystemEvent]:
        created: list[fs.FilesystemEvent] = []
        try:
            dir_fd = self._root.open(
                posixpath.join(self._directory, relative), os.O_RDONLY | os.O_DIRECTORY
            )
        except OSError:
            return created  # gone again already
        try:
            self._add(dir_fd, relative)
            self._add_subtree(dir_fd, relative, created)
        finally:
            os.close(dir_fd)
        return created

    def _forget_directory(self, relative: str) -> None:
        prefix = relative + "/"
        for watch in self._inotify.watches:
            path = str(watch.path)
            if watch is not self._root_watch and (path == relative or path.startswith(prefix)):
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(watch)

    def _rename_directory(self, old: str, new: str) -> None:
        prefix = old + "/"
        for watch in self._inotify.watches:
            path = str(watch.path)
            if path == old or path.startswith(prefix):
                watch.path = Path(new + path[len(old) :])

    def _entry(self, name: str) -> fs.EntryInfo | None:
        assert self._accounts is not None
        try:
            path = posixpath.normpath(posixpath.join(self._directory, name))
            return entry_info(self._root, path, self._accounts)
        except OSError:
            return None

    async def run(self, sink: EventSink) -> None:
        """Deliver events to `sink` until cancelled; raises WatchError if the watch breaks."""
        while True:
            event = await self._inotify.get()
            for proto_event in await self._translate(event):
                if self._include_entry and proto_event.type in _WITH_ENTRY:
                    entry = await asyncio.to_thread(self._entry, proto_event.name)
                    if entry is not None:
                        proto_event.entry.CopyFrom(entry)
                sink(proto_event)

    async def _translate(self, event: Event) -> list[fs.FilesystemEvent]:
        mask = event.mask
        if mask & Mask.Q_OVERFLOW:
            raise WatchError("watcher error: inotify event queue overflowed")
        watch = event.watch
        if watch is None or mask & Mask.IGNORED:
            return []
        if event.name is None:
            # About a watched directory itself: the parent's watch already reports subdirectories.
            if watch is not self._root_watch:
                return []
            name = "."
        else:
            name = posixpath.normpath(posixpath.join(str(watch.path), str(event.name)))
        if event.name is not None and is_upload_temp_name(str(event.name)):
            # An upload in progress: invisible, like its temporary file should be.
            if mask & Mask.MOVED_FROM:
                self._committed_uploads[event.cookie] = upload_replaces(str(event.name))
            return []
        if mask & Mask.MOVED_TO and event.cookie in self._committed_uploads:
            # An upload renamed into place: report what envd's in-place write shows. envd chowns
            # a file that is there, truncates and writes it; a new one it creates, writes, chowns.
            replaces = self._committed_uploads.pop(event.cookie)
            kinds = (
                (fs.EVENT_TYPE_CHMOD, fs.EVENT_TYPE_WRITE)
                if replaces
                else (fs.EVENT_TYPE_CREATE, fs.EVENT_TYPE_WRITE, fs.EVENT_TYPE_CHMOD)
            )
            return [fs.FilesystemEvent(name=name, type=kind) for kind in kinds]
        pending_moves, self._moved_dirs = self._moved_dirs, {}
        synthesized: list[fs.FilesystemEvent] = []
        if self._recursive and mask & Mask.ISDIR and event.name is not None:
            if mask & Mask.MOVED_FROM:
                self._moved_dirs[event.cookie] = name
            elif mask & Mask.MOVED_TO and event.cookie in pending_moves:
                self._rename_directory(pending_moves.pop(event.cookie), name)
            elif mask & (Mask.CREATE | Mask.MOVED_TO):
                synthesized = await asyncio.to_thread(self._watch_new_directory, name)
        for moved_away in pending_moves.values():
            self._forget_directory(moved_away)  # moved out of the tree
        events = [
            fs.FilesystemEvent(name=name, type=event_type)
            for bits, event_type in _EVENT_TYPES
            if mask & bits
        ]
        return events + synthesized
