"""The public surfaces: every package that declares `__all__` exports exactly its public names
(httpx's test_exported_members), and the surfaces the composition root and the test suites
build on are pinned here, so changing one is a visible decision."""

from __future__ import annotations

import importlib
import types

import pytest
from fixtures import REPO

PACKAGES = ("coppice", "coppice_api", "coppice_envd", "coppice_jails")

PINNED: dict[str, list[str]] = {
    # What the REST layer, the composition root and the tests use of the manager.
    "coppice_jails.manager": [
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
    ],
    "coppice_jails.templates": [
        "ALIASES",
        "NPM",
        "RECIPES",
        "NpmRelease",
        "Progress",
        "Recipe",
        "TemplateError",
        "TemplateInfo",
        "TemplateStore",
        "UnknownTemplate",
        "debian_mirror",
    ],
    "coppice_jails.testing": [
        "BackendFailure",
        "Backends",
        "FakeJail",
        "FakeRuntime",
        "FakeStorage",
        "FinishedProcess",
        "HostJail",
        "HostProcess",
        "built_template_root",
        "cached_template_store",
        "install_dev_rootfs_template",
        "recipes_digest",
        "template_cache_dir",
        "zfs_daemon_is_live",
        "zfs_test_pool",
    ],
}


def _packages_declaring_all() -> list[str]:
    found = []
    for package in PACKAGES:
        for init in sorted((REPO / package).rglob("__init__.py")):
            if "__all__" in init.read_text():
                found.append(".".join(init.relative_to(REPO).parent.parts))
    return found


def _public_names(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__
    }


@pytest.mark.parametrize("package", _packages_declaring_all())
def test_all_is_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    declared: list[str] = module.__all__  # ruff (RUF022) keeps it sorted
    assert len(set(declared)) == len(declared)
    assert set(declared) == _public_names(module)


@pytest.mark.parametrize("package", sorted(PINNED))
def test_pinned_surfaces(package: str) -> None:
    assert importlib.import_module(package).__all__ == PINNED[package]


def test_every_pinned_surface_declares_all() -> None:
    assert set(PINNED) <= set(_packages_declaring_all())
