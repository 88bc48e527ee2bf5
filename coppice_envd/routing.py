"""Which sandbox, and which of its servers, a gateway request is for.

In order: the Host header `<port>-<id>.<domain>[:port]`; else the `E2b-Sandbox-Id` and
`E2b-Sandbox-Port` headers (E2B_SANDBOX_URL and debug clients); else, when nothing names a
sandbox (debug mode's `localhost:49983`), the most recently started one. The port label picks the
handler set; without one, the listener's own port does.

During a request, service code reads the routed sandbox and the effective user from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coppice_envd.permissions.accounts import Accounts
from coppice_envd.permissions.auth import UnknownUser, effective_user
from coppice_envd.sandboxes import SandboxLookup, SandboxView
from coppice_jails.confined import ConfinedRoot
from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT
from coppice_jails.runtime.base import User

# The sandbox id of SDKs in debug mode: it names no sandbox, so the most recent one serves.
DEBUG_SANDBOX_ID = "debug_sandbox_id"


def sandbox_from_host(host: str) -> tuple[str, str] | None:
    """(port label, sandbox id) from `<port>-<id>.<domain>[:port]`; None if it names none."""
    hostname = host.partition(":")[0]
    label, dash, rest = hostname.partition("-")
    sandbox_id, dot, _domain = rest.partition(".")
    if not dash or not dot or not label.isdigit() or not sandbox_id:
        return None
    return label, sandbox_id


class RoutingError(Exception):
    """The request names no live sandbox (or a port it does not serve): the edge's 502, worded
    as E2B's proxy words it — the SDKs read "was not found" as a sandbox that is gone."""

    def __init__(self, message: str, sandbox_id: str | None = None, port: int | None = None):
        super().__init__(message)
        self.sandbox_id = sandbox_id
        self.port = port

    def body(self) -> dict[str, object]:
        """The 502's JSON body, as E2B's proxy sends it."""
        body: dict[str, object] = {"message": str(self), "code": 502}
        if self.sandbox_id is not None:
            body["sandboxId"] = self.sandbox_id
        if self.port is not None:
            body["port"] = self.port
        return body


SANDBOX_NOT_FOUND = "The sandbox was not found"
PORT_NOT_OPEN = "The sandbox is running but port is not open"


@dataclass(frozen=True)
class Route:
    sandbox: SandboxView
    port: int  # ENVD_PORT or INTERPRETER_PORT


def route_request(
    headers: Mapping[str, str], listener_port: int | None, lookup: SandboxLookup
) -> Route:
    """The sandbox and port a request is for; `headers` has lower-case names."""
    named = sandbox_from_host(headers.get("host", ""))
    if named is not None:
        label, sandbox_id = named
    else:
        sandbox_id = headers.get("e2b-sandbox-id", "")
        label = headers.get("e2b-sandbox-port", "")
    if sandbox_id and sandbox_id != DEBUG_SANDBOX_ID:
        sandbox = lookup.get(sandbox_id)
        if sandbox is None:
            raise RoutingError(SANDBOX_NOT_FOUND, sandbox_id)
    else:
        sandbox = lookup.most_recent()
        if sandbox is None:
            raise RoutingError(f"{SANDBOX_NOT_FOUND}: no sandbox is running")
    if label:
        port = int(label) if label.isdigit() else -1
    else:
        port = INTERPRETER_PORT if listener_port == INTERPRETER_PORT else ENVD_PORT
    if port not in (ENVD_PORT, INTERPRETER_PORT):
        raise RoutingError(PORT_NOT_OPEN, sandbox.sandbox_id, port if port >= 0 else None)
    return Route(sandbox=sandbox, port=port)


@dataclass
class RequestScope:
    """What one gateway request acts on: its sandbox and its (lazily resolved) user."""

    sandbox: SandboxView
    basic_user: str | None  # from `Authorization: Basic`, None without it
    _accounts: Accounts | None = field(default=None, repr=False)
    _user: User | None = field(default=None, repr=False)

    def accounts_sync(self, root: ConfinedRoot) -> Accounts:
        """The sandbox's users and groups as of this request (blocking)."""
        if self._accounts is None:
            self._accounts = Accounts.read(root)
        return self._accounts

    def user_sync(self, root: ConfinedRoot | None = None) -> User:
        """The effective user (blocking; raises auth.UnknownUser)."""
        if self._user is None:
            if root is None:
                with self.sandbox.jail.open_root() as own_root:
                    return self.user_sync(own_root)
            accounts = self.accounts_sync(root)
            self._user = effective_user(accounts, self.basic_user, self.sandbox.default_user)
        return self._user

    def user_now(self) -> User | None:
        """The effective user if the sandbox's accounts are known to be current without reading
        them, else None; never blocks (raises auth.UnknownUser)."""
        if self._user is None:
            accounts = self._accounts or Accounts.current(self.sandbox.jail.root)
            if accounts is None:
                return None
            self._accounts = accounts
            self._user = effective_user(accounts, self.basic_user, self.sandbox.default_user)
        return self._user

    async def user(self) -> User:
        """The effective user (raises auth.UnknownUser), read in a thread only when needed."""
        user = self.user_now()
        return user if user is not None else await asyncio.to_thread(self.user_sync)


_current: ContextVar[RequestScope] = ContextVar("coppice_gateway_request")


def enter_request(scope: RequestScope) -> None:
    """Bind `scope` to the running request (the gateway app calls this once per request)."""
    _current.set(scope)


def current_request() -> RequestScope:
    """The request being served; LookupError outside a gateway request."""
    return _current.get()


def current_sandbox() -> SandboxView:
    return _current.get().sandbox


async def current_user() -> User:
    """The effective user of the request being served. An unknown user raises the Connect
    `unauthenticated` error envd answers with (`invalid username: '<name>'`)."""
    try:
        return await _current.get().user()
    except UnknownUser as e:
        raise ConnectError(Code.UNAUTHENTICATED, str(e)) from e
