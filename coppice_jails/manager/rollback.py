"""All or nothing: the steps of a multi-step operation are taken back, in reverse, when a later
step fails, so that a failed create, pause, resume or snapshot leaves nothing half-made."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from coppice_jails.manager.errors import OperationFailed, SandboxError

log = logging.getLogger(__name__)


class Undo:
    """Steps to take back, run in reverse when an operation fails half-way."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []

    def push(self, what: str, step: Callable[[], Awaitable[object]]) -> None:
        self._steps.append((what, step))

    async def run(self) -> None:
        for what, step in reversed(self._steps):
            try:
                await step()
            except Exception:
                log.exception("rollback step failed: %s", what)
        self._steps.clear()


@contextlib.asynccontextmanager
async def all_or_nothing(failure: str) -> AsyncIterator[Undo]:
    """Steps pushed on the yielded Undo are taken back (shielded) when the block fails; an
    error that is not already a SandboxError becomes OperationFailed("<failure>: <error>")."""
    undo = Undo()
    try:
        yield undo
    except BaseException as e:
        await asyncio.shield(undo.run())
        if isinstance(e, Exception) and not isinstance(e, SandboxError):
            raise OperationFailed(f"{failure}: {e}") from e
        raise
