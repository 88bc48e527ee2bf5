"""File operations on a sandbox root that cannot leave it: mkdir -p, rm -rf, rename, and
uploads that are never visible half-written.

Every path goes through the sandbox's `ConfinedRoot` (openat2 RESOLVE_IN_ROOT); operations on a
final component use its parent's fd. Blocking: call from a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coppice_envd.filesystem.entryinfo import METADATA_XATTR_PREFIX
from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User

NEW_DIR_MODE = 0o755
NEW_FILE_MODE = 0o644  # 0666 minus envd's usual umask 022
_IOV_MAX = 1024
_UPLOAD_SUFFIX = ".coppice-upload-"
# The letter after the suffix says whether the upload makes a new file (n) or replaces one (r).
_UPLOAD_TEMP = re.compile(r"^\..*" + re.escape(_UPLOAD_SUFFIX) + r"([nr])[0-9a-f]{12}$", re.DOTALL)


def is_upload_temp_name(name: str) -> bool:
    """Whether a file name is an upload still being written (see `begin_upload`)."""
    return _UPLOAD_TEMP.match(name) is not None


def upload_replaces(temp_name: str) -> bool:
    """Whether the upload with this temporary name replaces a file that was there before."""
    match = _UPLOAD_TEMP.match(temp_name)
    return match is not None and match.group(1) == "r"


class NotADirectoryComponent(OSError):
    """mkdir -p met a path component that is not a directory."""


def make_dirs(root: ConfinedRoot, path: str, user: User) -> None:
    """mkdir -p inside the root; each directory it creates is owned by `user`."""
    current = "/"
    for component in posixpath.normpath("/" + path).split("/"):
        if not component:
            continue
        current = posixpath.join(current, component)
        try:
            os.close(root.open(current, os.O_PATH | os.O_DIRECTORY))
            continue
        except FileNotFoundError:
            pass
        except NotADirectoryError as e:
            raise NotADirectoryComponent(errno.ENOTDIR, f"path is a file: {current}") from e
        parent_fd, name = root.parent(current)
        try:
            os.mkdir(name, NEW_DIR_MODE, dir_fd=parent_fd)
            os.chown(name, user.uid, user.gid, dir_fd=parent_fd, follow_symlinks=False)
        except FileExistsError:
            pass  # made meanwhile; the next component's open checks what it is
        finally:
            os.close(parent_fd)


def remove_tree(root: ConfinedRoot, path: str) -> None:
    """rm -rf inside the root: recursive, and a missing path is fine."""
    try:
        parent_fd, name = root.parent(path)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            # fd-based and symlink-safe on Linux: it never follows a link out of the tree.
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def rename(root: ConfinedRoot, source: str, destination: str) -> None:
    """rename(2) inside the root; replaces a destination file or empty directory."""
    source_fd, source_name = root.parent(source)
    try:
        dest_fd, dest_name = root.parent(destination)
        try:
            os.rename(source_name, dest_name, src_dir_fd=source_fd, dst_dir_fd=dest_fd)
        finally:
            os.close(dest_fd)
    finally:
        os.close(source_fd)


def set_metadata(fd: int, metadata: Mapping[str, str]) -> None:
    """Replace the `user.e2b.*` xattrs of an open file with `metadata`."""
    try:
        existing = os.listxattr(fd)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return  # no xattrs on this filesystem: envd ignores that too
        raise
    for name in existing:
        if name.startswith(METADATA_XATTR_PREFIX) and name[len(METADATA_XATTR_PREFIX) :] not in (
            metadata
        ):
            with contextlib.suppress(OSError):
                os.removexattr(fd, name)
    for key, value in metadata.items():
        try:
            os.setxattr(fd, METADATA_XATTR_PREFIX + key, value.encode())
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise


@dataclass
class PendingFile:
    """A file being uploaded: written under a temporary name, renamed into place when done."""

    dir_fd: int
    name: str
    temp_name: str
    fd: int
    # Calls may come from different threads; abort() must not close fds under a write.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def write(self, chunks: Sequence[bytes]) -> None:
        """Append `chunks` (one writev, no joining copy)."""
        with self._lock:
            pending = [memoryview(c) for c in chunks if c]
            while pending:
                written = os.writev(self.fd, pending[:_IOV_MAX])
                while pending and written >= len(pending[0]):
                    written -= len(pending.pop(0))
                if written:
                    pending[0] = pending[0][written:]

    def commit(self, metadata: Mapping[str, str]) -> None:
        with self._lock:
            set_metadata(self.fd, metadata)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.temp_name, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1

    def abort(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self.dir_fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(self.temp_name, dir_fd=self.dir_fd)
                os.close(self.dir_fd)
                self.dir_fd = -1


class TargetIsDirectory(OSError):
    pass


def begin_upload(root: ConfinedRoot, path: str, user: User) -> PendingFile:
    """Prepare to write `path` (absolute, in the root) as `user`: parent directories are made
    (owned by the user) and a temporary file in the target's directory is opened.

    An existing file keeps its mode; a symlink to a file is written through, as envd does.
    """
    make_dirs(root, posixpath.dirname(posixpath.normpath("/" + path)), user)
    dir_fd, name = root.parent(path)
    try:
        mode = NEW_FILE_MODE
        try:
            existing = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISLNK(existing.st_mode):
            # Write where the link leads (resolved inside the root), like O_TRUNC through it.
            try:
                target_dir_fd, target_name = root.parent(root.resolve(path))
            except OSError:
                pass  # a dangling link: replace the link itself
            else:
                os.close(dir_fd)
                dir_fd, name = target_dir_fd, target_name
                existing = os.lstat(name, dir_fd=dir_fd)
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise TargetIsDirectory(errno.EISDIR, f"path is a directory: {path}")
        if existing is not None and stat.S_ISREG(existing.st_mode):
            mode = stat.S_IMODE(existing.st_mode)
        kind = "n" if existing is None else "r"
        temp_name = f".{name[:200]}{_UPLOAD_SUFFIX}{kind}{secrets.token_hex(6)}"
        fd = os.open(
            temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            os.fchown(fd, user.uid, user.gid)
            os.fchmod(fd, mode)
        except OSError:
            os.close(fd)
            os.unlink(temp_name, dir_fd=dir_fd)
            raise
    except BaseException:
        os.close(dir_fd)
        raise
    return PendingFile(dir_fd=dir_fd, name=name, temp_name=temp_name, fd=fd)
