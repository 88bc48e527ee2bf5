"""What a storage backend offers: copy-on-write sandbox roots cloned from templates."""

from __future__ import annotations

import abc
from pathlib import Path


class StorageError(Exception):
    pass


class Storage(abc.ABC):
    name: str

    # Templates -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def template_root(self, template: str) -> Path:
        """Where a template's files live (read-only for everyone but the builder)."""

    @abc.abstractmethod
    async def add_template(self, template: str, source: Path) -> None:
        """Make a template from a finished root filesystem tree (moved or copied in)."""

    @abc.abstractmethod
    async def has_template(self, template: str) -> bool: ...

    @abc.abstractmethod
    async def list_templates(self) -> list[str]: ...

    @abc.abstractmethod
    async def template_size(self, template: str) -> int: ...

    @abc.abstractmethod
    async def delete_template(self, template: str) -> None: ...

    # Sandboxes -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def clone(self, template: str, sandbox_id: str) -> Path:
        """A writable root for a sandbox; writes never reach the template or other clones."""

    @abc.abstractmethod
    async def snapshot(self, sandbox_id: str, template: str) -> None:
        """Turn the sandbox's current files into a new template (the sandbox stays usable)."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox root; succeeds if it is already gone."""

    @abc.abstractmethod
    async def list_sandboxes(self) -> list[str]: ...
