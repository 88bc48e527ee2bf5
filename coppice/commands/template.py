"""`coppice template build|import|list`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from coppice.commands.console import progress
from coppice.serve import pick_storage
from coppice.settings import Settings
from coppice_jails.templates import ALIASES, TemplateInfo, TemplateStore


def build_template(settings: Settings, name: str) -> int:
    info = asyncio.run(_store(settings).build(name, progress))
    progress(f"template {info.name} ready ({info.size_bytes >> 20} MiB, {info.backend})")
    return 0


def import_template(settings: Settings, name: str, tarball: Path) -> int:
    info = asyncio.run(_store(settings).import_tar(name, tarball, progress))
    progress(f"template {info.name} imported ({info.size_bytes >> 20} MiB, user {info.user})")
    return 0


def list_templates(settings: Settings) -> int:
    print(format_template_table(asyncio.run(_store(settings).list())))
    return 0


def _store(settings: Settings) -> TemplateStore:
    return TemplateStore(settings.data_dir, pick_storage(settings))


def format_template_table(infos: Sequence[TemplateInfo]) -> str:
    """Name, size, created, backend and aliases, one template a line."""
    aliases: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    rows = [("NAME", "SIZE", "CREATED", "BACKEND", "ALIASES")]
    for i in infos:
        size = f"{i.size_bytes / 2**20:.0f} MiB"
        rows.append((i.name, size, i.created, i.backend, ",".join(aliases.get(i.name, []))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
