"""Reading and writing a jail process's pipe and pty fds on the event loop, without blocking it.

The fds are registered with `add_reader`/`add_writer` and read or written with plain syscalls;
their owner closes them. (Not `connect_read_pipe`: uvloop closes the fd of a pipe transport
twice, once in libuv and once through the file object, and the second close can hit a file
another thread has opened meanwhile.)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


class WriterClosed(Exception):
    """The writer was shut down before (or while) the data was written."""


class FdReader:
    """Reads a non-blocking fd on the event loop until EOF (or EIO, a pty's EOF)."""

    def __init__(
        self,
        fd: int,
        chunk: int,
        on_data: Callable[[bytes], None],
        on_eof: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._chunk = chunk
        self._on_data = on_data
        self._on_eof = on_eof
        self.done = False
        self._reading = False
        os.set_blocking(fd, False)
        self.resume()

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume(self) -> None:
        if not self._reading and not self.done:
            self._loop.add_reader(self._fd, self._ready)
            self._reading = True

    def _ready(self) -> None:
        try:
            data = os.read(self._fd, self._chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                logger.warning("reading process output failed: %s", exc)
            data = b""
        if data:
            self._on_data(data)
            return
        self.pause()
        self.done = True
        self._on_eof()


class FdWriter:
    """Writes to a non-blocking fd without blocking the loop; writes are serialised."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = fd
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> None:
        async with self._lock:
            view = memoryview(data)
            while view:
                fd = self._fd
                if fd is None:
                    raise WriterClosed
                try:
                    written = os.write(fd, view)
                except (BlockingIOError, InterruptedError):
                    await self._writable(fd)
                    continue
                view = view[written:]

    async def _writable(self, fd: int) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter

        def ready() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_writer(fd, ready)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._fd is not None:
                self._loop.remove_writer(fd)

    def shutdown(self) -> None:
        """Fail pending and future writes; the fd itself is closed by its owner."""
        if self._fd is None:
            return
        self._loop.remove_writer(self._fd)
        self._fd = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(WriterClosed())
