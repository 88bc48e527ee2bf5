"""Real built templates for tests, cached across runs (and shared by every test module).

`built_template_root("base")` (or "code-interpreter-v1") builds the template with the real
TemplateStore on overlay storage in the cache dir the first time (1-2 minutes per template,
network needed), and returns its root right away afterwards. The cache is keyed by the
builder recipes' digest, so changing a package list rebuilds. The cache dir is
$COPPICE_TEST_CACHE or /var/cache/coppice-test/templates; downloaded packages are kept in it.

Treat the returned tree as read-only: clone it (OverlayStorage) or copy it.
Import explicitly: `from template_fixtures import built_template_root, base_template_root`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.templates import RECIPES, TemplateStore


def template_cache_dir() -> Path:
    return Path(os.environ.get("COPPICE_TEST_CACHE", "/var/cache/coppice-test/templates"))


def _recipes_digest() -> str:
    digests = sorted(recipe.digest() for recipe in RECIPES.values())
    return hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]


def cached_template_store() -> TemplateStore:
    """The store behind the cache (one per recipe digest, sharing the package cache)."""
    cache = template_cache_dir()
    data_dir = cache / _recipes_digest()
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


@pytest.fixture(scope="session")
def base_template_root() -> Path:
    return built_template_root("base")


@pytest.fixture(scope="session")
def code_interpreter_template_root() -> Path:
    return built_template_root("code-interpreter-v1")
