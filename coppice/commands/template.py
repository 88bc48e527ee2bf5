"""`coppice template build|import|list`."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from coppice.commands.console import progress
from coppice.serve import pick_storage
from coppice_jails.templates import ALIASES, TemplateInfo, TemplateStore


def run_template(args: argparse.Namespace) -> int:
    asyncio.run(_template(args))
    return 0


async def _template(args: argparse.Namespace) -> None:
    data_dir = args.data_dir.absolute()
    store = TemplateStore(data_dir, pick_storage(args.storage, args.zfs_dataset, data_dir))
    if args.template_command == "build":
        info = await store.build(args.name, progress)
        progress(f"template {info.name} ready ({info.size_bytes >> 20} MiB, {info.backend})")
    elif args.template_command == "import":
        info = await store.import_tar(args.name, args.tarball, progress)
        progress(f"template {info.name} imported ({info.size_bytes >> 20} MiB, user {info.user})")
    else:
        print(format_template_table(await store.list()))


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
