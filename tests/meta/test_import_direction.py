"""The architecture's "never" rules (ARCHITECTURE.md), as failures: every import of every module
of the service packages is read from its source and checked against them."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures import REPO

PACKAGES = ("coppice", "coppice_api", "coppice_envd", "coppice_jails")
HTTP_LIBRARIES = ("aiohttp", "hypercorn", "connectrpc", "httpx", "grpc", "zmq", "jupyter_client")
CONCRETE_BACKENDS = (
    "coppice_jails.runtime.linux",
    "coppice_jails.runtime.freebsd",
    "coppice_jails.runtime.cgroups",
    "coppice_jails.storage.zfs",
    "coppice_jails.storage.overlay",
)
# The folders of envd concepts: none reaches into another's insides (envd_api's file routes use
# the filesystem concept's operations, as envd's own api package does).
ENVD_CONCEPTS = ("process", "filesystem", "interpreter", "envd_api", "permissions")
ALLOWED_CONCEPT_IMPORTS = {("envd_api", "filesystem")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (for `from x import y`: x, and x.y when that is a module)
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> Iterator[Import]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield Import(module, alias.name, node.lineno)
                elif isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{module}:{node.lineno}: relative import"
                    assert node.module is not None
                    yield Import(module, node.module, node.lineno)
                    for alias in node.names:
                        yield Import(module, f"{node.module}.{alias.name}", node.lineno)


IMPORTS = list(_imports())


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(importer: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{i.module}:{i.line} imports {i.target}"
        for i in IMPORTS
        if _within(i.module, *importer) and _within(i.target, *forbidden)
    )


def test_the_jail_layer_imports_neither_plane_nor_the_root_nor_http() -> None:
    assert _violations(("coppice_jails",), ("coppice", "coppice_api", "coppice_envd")) == []
    assert _violations(("coppice_jails",), HTTP_LIBRARIES) == []


def test_the_planes_import_each_other_never_and_the_root_never() -> None:
    assert _violations(("coppice_api",), ("coppice_envd", "coppice")) == []
    assert _violations(("coppice_envd",), ("coppice_api", "coppice")) == []


def test_services_never_import_a_concrete_backend() -> None:
    # Backends are picked once, in the composition root (coppice/serve.py).
    assert _violations(("coppice_api", "coppice_envd"), CONCRETE_BACKENDS) == []


def test_only_tests_and_bench_use_the_test_doubles() -> None:
    production = tuple(p for p in PACKAGES)
    found = [
        v
        for v in _violations(production, ("coppice_jails.testing", "coppice_envd.testing"))
        if not _within(v.split(":")[0], "coppice_jails.testing", "coppice_envd.testing")
    ]
    assert found == []


def test_the_in_jail_payload_imports_nothing_of_coppice() -> None:
    # It runs on the sandbox's own Python, where no coppice package is installed.
    assert _violations(("coppice_envd.interpreter.payload",), PACKAGES) == []


@pytest.mark.parametrize("concept", ENVD_CONCEPTS)
def test_envd_concepts_keep_to_themselves(concept: str) -> None:
    others = tuple(
        f"coppice_envd.{other}"
        for other in ENVD_CONCEPTS
        if other != concept
        and (concept, other) not in ALLOWED_CONCEPT_IMPORTS
        and other != "permissions"  # every concept checks permissions
    )
    assert _violations((f"coppice_envd.{concept}",), others) == []


def test_the_concepts_never_import_the_request_walk() -> None:
    # app.py (the walk) and server.py compose the concepts; a concept importing them is a cycle.
    walk = ("coppice_envd.app", "coppice_envd.server")
    concepts = tuple(f"coppice_envd.{c}" for c in ENVD_CONCEPTS)
    assert _violations(concepts, walk) == []


def test_every_package_is_installed() -> None:
    # A package missing from pyproject's list imports from a checkout but not from a wheel.
    declared = (REPO / "pyproject.toml").read_text()
    packages = sorted(
        _module_name(init) for p in PACKAGES for init in (REPO / p).rglob("__init__.py")
    )
    assert [p for p in packages if f'"{p}"' not in declared] == []
