"""The gateway request being served: its sandbox and the user it acts as.

The gateway binds one `RequestScope` per request (`enter_request`); service code reads it with
`current_request()`. The effective user (contract §1.2: the `Authorization: Basic` name, else
the sandbox's default user, looked up in the sandbox's own passwd) is resolved once per request,
the first time anything asks, and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coppice_envd.permissions.accounts import Accounts
from coppice_envd.sandboxes import SandboxView
from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User
from coppice_jails.users import UnknownUser


@dataclass
class RequestScope:
    """What one gateway request acts on: its sandbox and its (lazily resolved) user."""

    sandbox: SandboxView
    basic_user: str | None  # from `Authorization: Basic`, None without it
    _accounts: Accounts | None = field(default=None, repr=False)
    _user: User | None = field(default=None, repr=False)

    def accounts_sync(self, root: ConfinedRoot) -> Accounts:
        """The sandbox's users and groups as of this request (blocking: call from a thread)."""
        if self._accounts is None:
            self._accounts = Accounts.current(self.sandbox.jail.root) or Accounts.read(root)
        return self._accounts

    def user_sync(self, root: ConfinedRoot) -> User:
        """The effective user, from a thread that has the sandbox's root open; raises
        UnknownUser with envd's message."""
        return self._user or self._resolve(self.accounts_sync(root))

    async def user(self) -> User:
        """The effective user; raises UnknownUser with envd's message. The sandbox's accounts
        are read in a thread, and only when they may have changed since they were last read."""
        if self._user is not None:
            return self._user
        accounts = self._accounts or Accounts.current(self.sandbox.jail.root)
        if accounts is not None:
            return self._resolve(accounts)
        return await asyncio.to_thread(self._user_in_own_root)

    def _user_in_own_root(self) -> User:
        with self.sandbox.jail.open_root() as root:
            return self.user_sync(root)

    def _resolve(self, accounts: Accounts) -> User:
        self._accounts = accounts
        name = self.basic_user if self.basic_user is not None else self.sandbox.default_user
        user = accounts.user(name)
        if user is None:
            kind = "username" if self.basic_user is not None else "default user"
            raise UnknownUser(f"invalid {kind}: '{name}'")
        self._user = user
        return user


@contextlib.contextmanager
def unknown_user_unauthenticated() -> Iterator[None]:
    """An unknown effective user inside becomes the Connect error envd answers RPCs with."""
    try:
        yield
    except UnknownUser as e:
        raise ConnectError(Code.UNAUTHENTICATED, str(e)) from None


_current: ContextVar[RequestScope] = ContextVar("coppice_gateway_request")


def enter_request(scope: RequestScope) -> None:
    """Bind `scope` to the running request (the gateway app calls this once per request)."""
    _current.set(scope)


def current_request() -> RequestScope:
    """The request being served; LookupError outside a gateway request."""
    return _current.get()


def current_sandbox() -> SandboxView:
    return _current.get().sandbox
