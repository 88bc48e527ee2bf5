"""Every module imports on its own, first, in a fresh interpreter with warnings as errors: an
import cycle shows as an ImportError of a half-made module whatever order the suite imports in."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fixtures import REPO

PACKAGES = ("coppice", "coppice_api", "coppice_envd", "coppice_jails")
# Runs inside a sandbox's own Python, where ipykernel is (and coppice is not) installed.
IN_JAIL = ("coppice_envd.interpreter.payload.",)


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not name.startswith(IN_JAIL):
                names.append(name)
    return names


def _import_alone(module: str) -> str | None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path("/"),  # the installed packages, not whatever the cwd holds
        timeout=120,
    )
    return None if done.returncode == 0 else f"{module}:\n{done.stderr.strip()[-1500:]}"


def test_each_module_imports_alone() -> None:
    modules = _modules()
    assert len(modules) > 50
    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(_import_alone, modules) if f is not None]
    assert failures == []
