"""A SandboxManager over the fake backends, the real SQLite registry and the real template store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from coppice_jails.manager import SandboxManager
from coppice_jails.registry import Registry
from coppice_jails.templates import TemplateInfo, TemplateStore
from coppice_jails.testing.fakes import FakeRuntime, FakeStorage

TEMPLATES = ("base", "code-interpreter-v1")


class Backends:
    """Fake storage and runtime, the real template store on them (templates `base` and
    `code-interpreter-v1`), and managers over the real registry in `base`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.storage = FakeStorage(base, list(TEMPLATES))
        self.runtime = FakeRuntime()
        self.data_dir = base / "data"
        # The real template store, on the fake storage, with the metadata of two templates.
        (self.data_dir / "templates").mkdir(parents=True)
        for name in TEMPLATES:
            info = TemplateInfo(
                name=name,
                backend="fake",
                created="2026-01-02T03:04:05+00:00",
                size_bytes=1024,
                user="user",
                workdir="/home/user",
                env={"LANG": "C.UTF-8"},
            )
            (self.data_dir / "templates" / f"{name}.json").write_text(info.to_json())
        self.templates = TemplateStore(self.data_dir, self.storage)

    @asynccontextmanager
    async def manager(self, **options: object) -> AsyncIterator[SandboxManager]:
        """A started manager on a registry in `base`, closed (sandboxes left alive) after."""
        registry = await Registry.open(self.data_dir)
        manager = SandboxManager(
            registry,
            self.storage,
            self.runtime,
            self.templates,
            **options,  # type: ignore[arg-type]
        )
        await manager.start()
        try:
            yield manager
        finally:
            await manager.close()
            await registry.close()
