"""Path resolution that cannot leave a sandbox root.

Every path a client names is resolved by the kernel with openat2(RESOLVE_IN_ROOT): absolute
symlinks, `..` and symlinks swapped in during the call all stay inside the root, as if the caller
were chrooted there. Operations on a final path component (unlink, mkdir, rename, lstat) go through
`parent()`, which resolves only the directory part and never follows the last component.

All methods block: call them from a thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import struct
from pathlib import Path

from coppice_jails._libc import libc

_SYS_OPENAT2 = 437  # same number on x86_64 and aarch64
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


def _openat2(dirfd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    # The kernel rejects a mode unless the call may create a file.
    creating = bool(flags & os.O_CREAT) or flags & os.O_TMPFILE == os.O_TMPFILE
    how = struct.pack("QQQ", flags | os.O_CLOEXEC, mode if creating else 0, resolve)
    fd = libc.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.c_char_p(how),
        ctypes.c_size_t(len(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


class ConfinedRoot:
    """A directory that paths are resolved inside of, never outside.

    `root` is the path opened; `key` names the tree for caches and stays the same for every
    view of one sandbox (a jail's `/proc/<pid>/root` and its clone's host path alike).
    """

    def __init__(self, root: Path, *, key: str | None = None) -> None:
        self.root = root
        self.key = str(root) if key is None else key
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._host_prefix: str | None = None  # what path_of strips; most users never need it

    def close(self) -> None:
        os.close(self._root_fd)

    def copy(self) -> ConfinedRoot:
        """Another handle on the very same tree (the directory already open), closed apart."""
        twin = ConfinedRoot.__new__(ConfinedRoot)
        twin.root, twin.key, twin._host_prefix = self.root, self.key, self._host_prefix
        twin._root_fd = os.dup(self._root_fd)
        return twin

    def __enter__(self) -> ConfinedRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """An fd for `path` (absolute inside the root), all symlinks resolved inside the root."""
        relative = path.lstrip("/") or "."
        return _openat2(
            self._root_fd, relative, flags, mode, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
        )

    def parent(self, path: str) -> tuple[int, str]:
        """(fd of the resolved parent directory, final name) — the caller closes the fd.

        The final component is returned as is, so `os.lstat(name, dir_fd=fd)` and friends act on
        the entry itself, never on what a symlink there points to.
        """
        normal = posixpath.normpath("/" + path)
        if normal == "/":
            raise OSError(errno.EINVAL, "the sandbox root itself has no parent", path)
        head, name = posixpath.split(normal)
        return self.open(head, os.O_PATH | os.O_DIRECTORY), name

    def resolve(self, path: str) -> str:
        """The path inside the root that `path` leads to, symlinks followed (like realpath)."""
        fd = self.open(path, os.O_PATH)
        try:
            return self.path_of(fd)
        finally:
            os.close(fd)

    def path_of(self, fd: int) -> str:
        """The in-root path of an fd opened through this root."""
        host = os.readlink(f"/proc/self/fd/{fd}")
        if self._host_prefix is None:
            self._host_prefix = os.readlink(f"/proc/self/fd/{self._root_fd}")
        if host == self._host_prefix:
            return "/"
        prefix = self._host_prefix.rstrip("/") + "/"
        if not host.startswith(prefix):
            raise OSError(errno.EXDEV, "path resolved outside the sandbox root", host)
        return "/" + host[len(prefix) :]

    def read_bytes(self, path: str, limit: int = 16 * 1024 * 1024) -> bytes:
        fd = self.open(path)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read(limit)
        finally:
            os.close(fd)
