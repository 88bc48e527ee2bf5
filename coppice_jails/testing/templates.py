"""Real built templates, cached across runs and shared by every test module and bench script.

`built_template_root("base")` (or "code-interpreter-v1") builds the template with the real
TemplateStore on overlay storage in the cache dir the first time (1-2 minutes per template,
network needed), and returns its root right away afterwards. The cache is keyed by the
builder recipes' digest, so changing a package list rebuilds. The cache dir is
$COPPICE_TEST_CACHE or /var/cache/coppice-test/templates; downloaded packages are kept in it.
Treat the returned tree as read-only: clone it (OverlayStorage) or copy it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coppice_jails.storage.base import Storage
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.templates import RECIPES, TemplateInfo, TemplateStore


def template_cache_dir() -> Path:
    return Path(os.environ.get("COPPICE_TEST_CACHE", "/var/cache/coppice-test/templates"))


def recipes_digest() -> str:
    digests = sorted(recipe.digest() for recipe in RECIPES.values())
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def cached_template_store() -> TemplateStore:
    """The store behind the cache (one per recipe digest, sharing the package cache)."""
    cache = template_cache_dir()
    data_dir = cache / recipes_digest()
    return TemplateStore(data_dir, OverlayStorage(data_dir / "overlay"), cache_dir=cache / "pkgs")


async def _ensure(name: str) -> Path:
    store = cached_template_store()
    await store.ensure(name, lambda line: print(f"[template {name}] {line}", file=sys.stderr))
    return await store.root(name)


def built_template_root(name: str) -> Path:
    """The root of a built template (built on first use). Blocking; callable from any thread,
    with or without a running event loop (it runs its own loop in a worker thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _ensure(name)).result()


async def install_dev_rootfs_template(data_dir: Path, storage: Storage) -> None:
    """Template `base` from the cached built one, hard-linked in (fast on one filesystem, and
    safe: overlay never writes to a lower dir), with its metadata for a TemplateStore on
    data_dir."""
    source = await asyncio.to_thread(built_template_root, "base")
    copy = data_dir / "base-rootfs"
    process = await asyncio.create_subprocess_exec("cp", "-alx", str(source), str(copy))
    if await process.wait() != 0:
        raise RuntimeError(f"could not copy {source}")
    info = TemplateInfo(
        name="base",
        backend=storage.name,
        created="2026-01-01T00:00:00+00:00",
        size_bytes=0,
        user="user",
        workdir="/home/user",
        env={},
    )
    metadata = data_dir / "templates" / "base.json"
    await asyncio.to_thread(metadata.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(metadata.write_text, info.to_json())
    await storage.add_template("base", copy)
