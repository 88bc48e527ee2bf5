"""What a storage backend offers: copy-on-write sandbox roots cloned from templates."""

from __future__ import annotations

import abc
import asyncio
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Template names and sandbox ids: one path component / dataset name component, DNS-label-ish.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class StorageError(Exception):
    pass


class CommandFailed(StorageError):
    """An external command (zfs, cp, ...) exited non-zero; the message carries its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"`{' '.join(argv)}` failed (exit {returncode}): {stderr.strip()}")


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a valid template name or sandbox id, else raise StorageError."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise StorageError(
            f"invalid {kind} name {name!r}: "
            "use 1-63 of [a-z0-9._-], starting with [a-z0-9], no '..'"
        )
    return name


async def run_command(*argv: str) -> str:
    """Run a command without blocking the event loop; return stdout or raise CommandFailed.

    In a thread with `subprocess`, which spawns with vfork: the servers' uvloop forks, which
    costs 3-12 ms per command in a large process (a zfs clone is ~20 ms in all)."""
    try:
        done = await asyncio.to_thread(
            subprocess.run, argv, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
    except FileNotFoundError as e:
        raise StorageError(f"`{argv[0]}` is not installed: {e}") from e
    if done.returncode != 0:
        raise CommandFailed(argv, done.returncode or -1, done.stderr.decode(errors="replace"))
    return done.stdout.decode(errors="replace")


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists (used to tell leftovers of dead builders)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_owner_is_dead(entry_name: str) -> bool:
    """Work entries are named `<pid>-<name>`; true when that pid no longer runs."""
    pid, _, _ = entry_name.partition("-")
    return not pid.isdigit() or not pid_is_alive(int(pid))


class Storage(abc.ABC):
    """Template names and sandbox ids must pass `check_name` (backends raise StorageError).

    Every backend keeps in-progress work out of sight: a template becomes visible (has_template,
    list_templates) only once complete, and leftovers of interrupted work (by a process that
    has died) are removed the next time the storage is used.
    """

    name: str

    # Templates -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def template_root(self, template: str) -> Path:
        """Where a template's files live (read-only for everyone but the builder)."""

    @abc.abstractmethod
    async def add_template(self, template: str, source: Path) -> None:
        """Make a template from a finished root filesystem tree.

        The tree is moved in when the backend can (same filesystem) and copied otherwise, so
        the caller must treat `source` as consumed and remove it if it still exists.
        """

    @abc.abstractmethod
    async def has_template(self, template: str) -> bool: ...

    @abc.abstractmethod
    async def list_templates(self) -> list[str]: ...

    @abc.abstractmethod
    async def template_size(self, template: str) -> int:
        """Bytes of storage the template's files take."""

    @abc.abstractmethod
    async def delete_template(self, template: str) -> None:
        """Remove a template; refused (StorageError) while a sandbox or template depends on it."""

    # Sandboxes -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def clone(self, template: str, sandbox_id: str) -> Path:
        """A writable root for a sandbox; writes never reach the template or other clones."""

    @abc.abstractmethod
    async def snapshot(self, sandbox_id: str, template: str) -> None:
        """Turn the sandbox's current files into a new template (the sandbox stays usable,
        and may be destroyed afterwards while the new template lives on)."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox root; succeeds if it is already gone."""

    @abc.abstractmethod
    async def list_sandboxes(self) -> list[str]: ...

    @abc.abstractmethod
    async def disk_used(self, sandbox_id: str) -> int:
        """Bytes the sandbox's files take as `df` inside it would count them: its template's
        and what it wrote since."""
