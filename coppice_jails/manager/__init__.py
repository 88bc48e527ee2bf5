"""The sandbox manager: create, kill, pause, resume, snapshot and fork sandboxes.

It drives three backends (template catalog, copy-on-write storage, jail runtime) and keeps the
registry the single source of truth. Every multi-step operation undoes what it made, in reverse,
when a later step fails (rollback.py). A reaper task ends each sandbox at its end time.

Parts: base (state, lookups, locks, observers, event log), lifecycle (create, kill, pause,
resume, end times), snapshots (templates, snapshots, forks), sampling and metrics (usage),
reaper, reconcile; service composes them into SandboxManager.
"""

from coppice_jails.manager.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    OperationFailed,
    SandboxError,
    TemplateNotFound,
)
from coppice_jails.manager.metrics import Metrics
from coppice_jails.manager.model import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_TIMEOUT_SECONDS,
    ConnectResult,
    CreateSpec,
    LiveSandbox,
    SandboxObserver,
    TemplateCatalog,
    template_aliases,
)
from coppice_jails.manager.service import SandboxManager

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_TIMEOUT_SECONDS",
    "Conflict",
    "ConnectResult",
    "CreateSpec",
    "InvalidArgument",
    "LiveSandbox",
    "Metrics",
    "NotFound",
    "OperationFailed",
    "SandboxError",
    "SandboxManager",
    "SandboxObserver",
    "TemplateCatalog",
    "TemplateNotFound",
    "template_aliases",
]
