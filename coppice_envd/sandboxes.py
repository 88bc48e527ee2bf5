"""What the gateway needs to know about a live sandbox, independent of how it is stored or run."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

from coppice_jails.envd_facts import DEFAULT_PATH
from coppice_jails.runtime.base import Jail, User


@dataclass(frozen=True)
class SandboxView:
    """A live sandbox as the gateway serves it."""

    sandbox_id: str
    jail: Jail  # exec, and `jail.root` for confined file operations
    access_token: str | None  # None: the sandbox is not secured
    default_user: str = "user"
    default_workdir: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)

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
