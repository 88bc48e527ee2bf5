"""What the gateway needs to know about a live sandbox, independent of how it is stored or run,
and the one owner of what its services keep per sandbox."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from coppice_jails.envd_facts import DEFAULT_PATH
from coppice_jails.runtime.base import Jail, User

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SandboxView:
    """A live sandbox as the gateway serves it."""

    sandbox_id: str
    jail: Jail  # exec, and `jail.root` for confined file operations
    access_token: str | None  # None: the sandbox is not secured
    default_user: str = "user"
    default_workdir: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)
    # Created without public traffic: every port but envd's needs it (e2b-traffic-access-token).
    traffic_access_token: str | None = None

    def global_env(self) -> dict[str, str]:
        """envd's global variables: the internal ones, then the sandbox's own (contract §1.4)."""
        return {"E2B_SANDBOX": "true", "E2B_SANDBOX_ID": self.sandbox_id, **self.env_vars}

    def process_env(self, user: User) -> dict[str, str]:
        """The environment a process of `user` starts with, before per-call variables."""
        return {
            "PATH": DEFAULT_PATH,
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
            **self.global_env(),
        }


class SandboxLookup(abc.ABC):
    """Finds live sandboxes for request routing (the registry implements this for `serve`)."""

    @abc.abstractmethod
    def get(self, sandbox_id: str) -> SandboxView | None:
        """The running sandbox with this id, or None (unknown, killed or paused)."""

    @abc.abstractmethod
    def most_recent(self) -> SandboxView | None:
        """The most recently started running sandbox, for requests whose Host names none."""


class SandboxState(Protocol):
    """Something a gateway service keeps for one sandbox (a process table, code contexts)."""

    async def close(self) -> None: ...


_S = TypeVar("_S", bound=SandboxState)


@dataclass(frozen=True, eq=False)
class StateKind(Generic[_S]):
    """One kind of per-sandbox state, made from the sandbox on first use."""

    name: str
    make: Callable[[SandboxView], _S]


@dataclass
class _Slot:
    jail: Jail
    states: dict[StateKind[Any], SandboxState] = field(default_factory=dict)


class SandboxStates:
    """The one owner of the gateway's per-sandbox state.

    A sandbox's state of every kind belongs to the jail it was made for, and all of it closes
    together: when the sandbox stops, when its id turns up with a new jail (a resume that had
    to start one), and when the gateway shuts down. Everything runs on the gateway's loop.
    """

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._closing: dict[str, set[asyncio.Task[None]]] = {}

    def get(self, sandbox: SandboxView, kind: StateKind[_S]) -> _S:
        """The sandbox's state of this kind, made now if it has none."""
        slot = self._slots.get(sandbox.sandbox_id)
        if slot is None or slot.jail is not sandbox.jail:
            self.sandbox_stopped(sandbox.sandbox_id)
            slot = self._slots[sandbox.sandbox_id] = _Slot(sandbox.jail)
        state = slot.states.get(kind)
        if state is None:
            state = slot.states[kind] = kind.make(sandbox)
        return state  # type: ignore[return-value]  # made by `kind`, so an _S

    def discard(self, sandbox_id: str, kind: StateKind[_S], state: _S) -> None:
        """Forget `state` if it still is the sandbox's (its owner closes it)."""
        slot = self._slots.get(sandbox_id)
        if slot is not None and slot.states.get(kind) is state:
            del slot.states[kind]

    def sandbox_stopped(self, sandbox_id: str) -> None:
        """Forget the sandbox's state now (new requests start afresh) and close it in the
        background; `closed` waits for that."""
        slot = self._slots.pop(sandbox_id, None)
        if slot is None or not slot.states:
            return
        task = asyncio.get_running_loop().create_task(_close_all(sandbox_id, slot))
        closing = self._closing.setdefault(sandbox_id, set())
        closing.add(task)

        def done(task: asyncio.Task[None]) -> None:
            closing.discard(task)
            if not closing and self._closing.get(sandbox_id) is closing:
                del self._closing[sandbox_id]

        task.add_done_callback(done)

    async def closed(self, sandbox_id: str) -> None:
        """Stop the sandbox (if not yet) and wait until all its state is closed."""
        self.sandbox_stopped(sandbox_id)
        await asyncio.gather(*self._closing.get(sandbox_id, ()))

    async def aclose(self) -> None:
        """Close every sandbox's state (at gateway shutdown; twice is fine)."""
        for sandbox_id in list(self._slots):
            self.sandbox_stopped(sandbox_id)
        await asyncio.gather(*(t for tasks in list(self._closing.values()) for t in tasks))


@runtime_checkable
class UsesSandboxStates(Protocol):
    """A service keeping per-sandbox state: `build_gateway` hands it the gateway's owner."""

    sandboxes: SandboxStates


async def _close_all(sandbox_id: str, slot: _Slot) -> None:
    results = await asyncio.gather(
        *(state.close() for state in slot.states.values()), return_exceptions=True
    )
    for kind, result in zip(slot.states, results, strict=True):
        if isinstance(result, BaseException):
            log.error("closing the %s of %s failed", kind.name, sandbox_id, exc_info=result)
