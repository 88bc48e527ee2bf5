"""Upstream connections of the proxy: where one goes (`Target`), one TCP connection with its
HTTP/1.1 state (h11), and the keep-alive pool they return to between requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import h11

# How long a connect may take before the target counts as not listening (a jail's address that
# drops packets, rather than refusing, would hold a request forever otherwise).
CONNECT_TIMEOUT_SECONDS = 5.0
# Idle keep-alive connections kept per target, and for how long.
MAX_IDLE_PER_TARGET = 32
IDLE_SECONDS = 30.0
_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class Target:
    """An upstream server. `group` names whose it is (a sandbox id, or the API): its pooled
    connections are never handed to another group and are closed together (`forget`)."""

    host: str
    port: int
    group: str


class UpstreamUnreachable(Exception):
    """Nothing answers at the target (refused, timed out, or the connection failed before a
    response began): nothing has been sent to the client yet, the caller answers."""


class Connection:
    """One TCP connection to a target and its HTTP/1.1 client state."""

    __slots__ = ("_reader", "_writer", "http", "idle_since", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.http = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False

    @property
    def open(self) -> bool:
        """Still usable for a new request: not closed by either side, nothing unasked read."""
        return not (self._writer.is_closing() or self._reader.at_eof())

    def write(self, data: bytes | None) -> None:
        if data:
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def read(self) -> bytes:
        """The next bytes from the server; b"" at its end of stream (or after `abort`)."""
        try:
            return await self._reader.read(_READ_SIZE)
        except OSError:
            return b""

    def abort(self) -> None:
        """Drop the connection now (a client that left, a failed exchange)."""
        self._writer.transport.abort()

    def close(self) -> None:
        self._writer.close()


class ConnectionPool:
    """Keep-alive connections per target: a request takes an idle one (or connects), and gives
    it back once both its request and response have ended cleanly."""

    def __init__(
        self,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        max_idle: int = MAX_IDLE_PER_TARGET,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._idle: dict[Target, list[Connection]] = {}

    async def connect(self, target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new TCP connection to the target; UpstreamUnreachable if none can be made."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await asyncio.open_connection(target.host, target.port, limit=_READ_SIZE)
        except (OSError, TimeoutError) as e:
            raise UpstreamUnreachable(f"{target.host}:{target.port}: {e or 'timed out'}") from e

    async def acquire(self, target: Target) -> Connection:
        """An idle connection to the target that is still open, else a new one."""
        idle = self._idle.get(target)
        if idle:
            deadline = time.monotonic() - self._idle_seconds
            while idle:
                conn = idle.pop()
                if conn.open and conn.idle_since >= deadline:
                    conn.reused = True
                    return conn
                conn.close()
        return Connection(*await self.connect(target))

    def release(self, target: Target, conn: Connection) -> None:
        """Keep the connection for the next request if its exchange ended cleanly and both sides
        keep it alive; close it otherwise."""
        http = conn.http
        if http.our_state is h11.DONE and http.their_state is h11.DONE and conn.open:
            idle = self._idle.setdefault(target, [])
            if len(idle) < self._max_idle:
                http.start_next_cycle()
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    def forget(self, group: str) -> None:
        """Close the idle connections of a group (its sandbox has stopped)."""
        for target in [t for t in self._idle if t.group == group]:
            _close_all(self._idle.pop(target))

    def close(self) -> None:
        """Close every idle connection (at gateway shutdown)."""
        for idle in self._idle.values():
            _close_all(idle)
        self._idle.clear()


def _close_all(connections: Iterable[Connection]) -> None:
    for conn in connections:
        conn.close()
