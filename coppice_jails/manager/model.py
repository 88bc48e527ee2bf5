"""What the manager takes and returns, the template catalog it needs, and its constants."""

from __future__ import annotations

import builtins
import re
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from coppice_jails.registry import SandboxRecord
from coppice_jails.runtime.base import Jail
from coppice_jails.templates import ALIASES, TemplateInfo

CLIENT_ID = "6532622b"  # E2B's constant, deprecated client id
DEFAULT_TIMEOUT_SECONDS = 300
MAX_TIMEOUT_SECONDS = 24 * 3600
ID_LENGTH = 20
_ID_ALPHABET = string.ascii_lowercase + string.digits
SNAPSHOT_PREFIX = "snap-"
FORK_PREFIX = "fork-"
# Snapshot names are client-chosen labels (E2B allows `team/name:tag`).
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MIB = 1024 * 1024

Clock = Callable[[], float]


def new_id(prefix: str = "") -> str:
    """A fresh id: lowercase alphanumerics, safe as one DNS label."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


class TemplateCatalog(Protocol):
    """What the manager uses of the template store (`templates.TemplateStore`)."""

    def resolve(self, name: str) -> str: ...

    async def get(self, name: str) -> TemplateInfo:
        """Aliases resolved; UnknownTemplate (naming the available ones) if there is none."""
        ...

    async def list(self) -> builtins.list[TemplateInfo]: ...

    async def delete(self, name: str) -> None: ...

    async def snapshot_sandbox(self, sandbox_id: str, name: str, parent: str) -> TemplateInfo: ...


def template_aliases(name: str) -> builtins.list[str]:
    return sorted(alias for alias, target in ALIASES.items() if target == name)


@dataclass(frozen=True)
class LiveSandbox:
    """A sandbox with its jail, for the gateway (adapted to its SandboxLookup by the CLI)."""

    record: SandboxRecord
    jail: Jail
    template: TemplateInfo


class SandboxObserver(Protocol):
    """Told when a sandbox gets a jail, when it is about to be killed (its jail still running)
    and when its jail has ended, e.g. to warm, cut off or drop per-sandbox state in the
    gateway. Calls must return quickly; their errors are logged and ignored."""

    async def sandbox_started(self, live: LiveSandbox) -> None: ...

    async def sandbox_ending(self, sandbox_id: str) -> None: ...

    async def sandbox_stopped(self, sandbox_id: str) -> None: ...


@dataclass(frozen=True)
class CreateSpec:
    template: str
    timeout: int = DEFAULT_TIMEOUT_SECONDS
    metadata: Mapping[str, str] = field(default_factory=dict)
    env_vars: Mapping[str, str] = field(default_factory=dict)
    secure: bool = False
    auto_pause: bool = False
    allow_internet_access: bool | None = None
    # network.allowPublicTraffic: False gives the sandbox a traffic access token (E2B's rule).
    allow_public_traffic: bool | None = None


@dataclass(frozen=True)
class ConnectResult:
    record: SandboxRecord
    resumed: bool  # False: it was running and only its end time moved
