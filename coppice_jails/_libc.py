"""The C library, loaded once for every module that makes a system call Python lacks (mount,
umount2, openat2 through syscall, connect to AF_UNSPEC). Errors are read with ctypes.get_errno."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
# syscall(2) returns a long (openat2's fd, or -1); ctypes would assume an int.
libc.syscall.restype = ctypes.c_long

MNT_DETACH = 2  # umount2 flag: detach now, finish when the last user lets go
