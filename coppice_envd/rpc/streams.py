"""Server streams that keep a quiet connection alive and end at their deadline.

envd sends a keepalive message on every stream after each `Keepalive-Ping-Interval` seconds
without one (90 by default), so that proxies and clients see an idle stream as alive, and ends
a stream whose RPC deadline (`Connect-Timeout-Ms`) passed with `deadline_exceeded`.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Literal, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError

_T = TypeVar("_T")

DEFAULT_KEEPALIVE_SECONDS = 90.0


class Keepalive(enum.Enum):
    DUE = "due"  # what `paced` yields when a keepalive is due


def keepalive_interval(headers: Mapping[str, str]) -> float:
    """`Keepalive-Ping-Interval` in seconds; missing, bad, infinite or non-positive values
    mean DEFAULT_KEEPALIVE_SECONDS."""
    try:
        seconds = float(headers.get("keepalive-ping-interval", ""))
    except ValueError:
        return DEFAULT_KEEPALIVE_SECONDS
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_KEEPALIVE_SECONDS


def rpc_deadline(timeout_ms: float | None) -> float | None:
    """The event-loop time an RPC with this timeout must end by (None: no deadline)."""
    if timeout_ms is None:
        return None
    return asyncio.get_running_loop().time() + max(timeout_ms, 0) / 1000


async def paced(
    source: Callable[[], Awaitable[_T]], interval: float, deadline: float | None = None
) -> AsyncGenerator[_T | Literal[Keepalive.DUE], None]:
    """What `source()` gives, one call after another, and Keepalive.DUE after each `interval`
    seconds with nothing; at `deadline` (loop time) the Connect `deadline_exceeded` error.

    A call of `source` that a keepalive interrupts is not cancelled: it goes on, so nothing
    it takes is lost; closing the iterator cancels it.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[_T] | None = None
    try:
        while True:
            wait = interval if deadline is None else min(interval, deadline - loop.time())
            if wait <= 0:
                raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            if pending is None:
                pending = asyncio.ensure_future(source())
            done, _ = await asyncio.wait({pending}, timeout=wait)
            if pending in done:
                item, pending = pending.result(), None
                yield item
            elif deadline is None or loop.time() < deadline:
                yield Keepalive.DUE
    finally:
        if pending is not None:
            pending.cancel()
