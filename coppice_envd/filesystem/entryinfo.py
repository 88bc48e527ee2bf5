"""`filesystem.EntryInfo` for paths inside a sandbox root, exactly as envd computes it (§2.2).

Everything is resolved through the sandbox's `ConfinedRoot`: symlink targets, owner names (the
sandbox's passwd/group) and xattrs are the sandbox's, never the host's. Blocking: use threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import stat
from collections.abc import Iterator

from filesystem import filesystem_pb2 as fs
from google.protobuf.timestamp_pb2 import Timestamp

from coppice_envd.permissions.accounts import Accounts
from coppice_jails.confined import ConfinedRoot

METADATA_XATTR_PREFIX = "user.e2b."

# Go's os.FileMode type letters, in the order FileMode.String() prints them.
_GO_MODE_LETTERS = "dalTLDpSugct?"
_PERMISSION_LETTERS = "rwxrwxrwx"


def _go_type_bits(mode: int) -> set[str]:
    """The Go FileMode type letters a Linux st_mode carries (os.fillFileStatFromSys)."""
    letters = set()
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        letters.add("d")
    elif kind == stat.S_IFLNK:
        letters.add("L")
    elif kind == stat.S_IFBLK:
        letters.add("D")
    elif kind == stat.S_IFCHR:
        letters.update("Dc")
    elif kind == stat.S_IFIFO:
        letters.add("p")
    elif kind == stat.S_IFSOCK:
        letters.add("S")
    if mode & stat.S_ISUID:
        letters.add("u")
    if mode & stat.S_ISGID:
        letters.add("g")
    if mode & stat.S_ISVTX:
        letters.add("t")
    return letters


@functools.lru_cache(maxsize=4096)  # a few dozen distinct modes in any tree; every entry needs one
def go_mode_string(mode: int) -> str:
    """Go's `FileMode.String()` of an st_mode, e.g. `-rw-r--r--`, `dtrwxrwxrwx`, `Lrwxrwxrwx`."""
    letters = _go_type_bits(mode)
    prefix = "".join(c for c in _GO_MODE_LETTERS if c in letters) or "-"
    perms = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate(_PERMISSION_LETTERS))
    return prefix + perms


def _file_type(mode: int) -> fs.FileType:
    if stat.S_ISREG(mode):
        return fs.FILE_TYPE_FILE
    if stat.S_ISDIR(mode):
        return fs.FILE_TYPE_DIRECTORY
    return fs.FILE_TYPE_UNSPECIFIED


def read_metadata(fd: int) -> dict[str, str]:
    """The `user.e2b.*` xattrs of the file an fd (O_PATH is fine) refers to, prefix stripped."""
    # The /proc magic link lets xattr calls act on an O_PATH fd; it names the fd's own file.
    proc = f"/proc/self/fd/{fd}"
    metadata: dict[str, str] = {}
    try:
        names = os.listxattr(proc)
    except OSError:
        return metadata
    for name in names:
        if not name.startswith(METADATA_XATTR_PREFIX):
            continue
        try:
            value = os.getxattr(proc, name).decode("utf-8")
            key = name[len(METADATA_XATTR_PREFIX) :]
            key.encode("utf-8")  # surrogate-escaped names are not valid UTF-8
        except (OSError, UnicodeError):
            continue
        metadata[key] = value
    return metadata


def _fill(
    entry: fs.EntryInfo,
    root: ConfinedRoot,
    path: str,
    fd: int,
    lstat: os.stat_result,
    accounts: Accounts,
) -> None:
    entry.name = posixpath.basename(path.rstrip("/")) or "/"
    entry.path = path
    entry.size = lstat.st_size
    entry.permissions = go_mode_string(lstat.st_mode)
    entry.owner = accounts.user_name(lstat.st_uid)
    entry.group = accounts.group_name(lstat.st_gid)
    if lstat.st_mtime_ns:
        entry.modified_time.CopyFrom(
            Timestamp(seconds=lstat.st_mtime_ns // 10**9, nanos=lstat.st_mtime_ns % 10**9)
        )
    if not stat.S_ISLNK(lstat.st_mode):
        entry.type = _file_type(lstat.st_mode)
        entry.mode = stat.S_IMODE(lstat.st_mode) & 0o777
        metadata = read_metadata(fd)
    else:
        # envd reports a symlink as what it points to, target fully resolved (in the root).
        entry.is_symlink = True
        try:
            target_fd = root.open(path, os.O_PATH)
        except OSError:
            entry.symlink_target = path
            entry.type = fs.FILE_TYPE_UNSPECIFIED
            return
        try:
            entry.symlink_target = root.path_of(target_fd)
            target = os.fstat(target_fd)
            entry.type = _file_type(target.st_mode)
            entry.mode = stat.S_IMODE(target.st_mode) & 0o777
            metadata = read_metadata(target_fd)
        finally:
            os.close(target_fd)
    entry.metadata.update(metadata)


def entry_info(root: ConfinedRoot, path: str, accounts: Accounts) -> fs.EntryInfo:
    """EntryInfo of `path` (absolute, in the root). Raises OSError (ENOENT: not found)."""
    fd = root.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        entry = fs.EntryInfo()
        _fill(entry, root, path, fd, os.fstat(fd), accounts)
        return entry
    finally:
        os.close(fd)


def _sorted_names(dir_fd: int) -> list[str]:
    # Go's WalkDir lists in byte order of the names.
    with os.scandir(dir_fd) as it:
        return sorted((e.name for e in it), key=os.fsencode)


def walk_entries(
    root: ConfinedRoot, dir_fd: int, path: str, depth: int, accounts: Accounts
) -> Iterator[fs.EntryInfo]:
    """Entries under an open directory, lexical depth-first pre-order, `depth` levels deep.

    `path` is the directory as the client named it; entry paths are built under it. Symlinked
    directories are not descended into; entries that vanish meanwhile are skipped.
    """
    for name in _sorted_names(dir_fd):
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        try:
            lstat = os.fstat(fd)
            entry = fs.EntryInfo()
            child = posixpath.join(path, name)
            _fill(entry, root, child, fd, lstat, accounts)
            yield entry
            if depth > 1 and stat.S_ISDIR(lstat.st_mode):
                try:
                    sub_fd = os.open(
                        name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd
                    )
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        continue
                    raise
                try:
                    yield from walk_entries(root, sub_fd, child, depth - 1, accounts)
                finally:
                    os.close(sub_fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
