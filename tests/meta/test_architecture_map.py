"""ARCHITECTURE.md's map stays true: every package and every top-level module of the service
packages is in it, and everything it names exists."""

from __future__ import annotations

import re

from fixtures import REPO

PACKAGES = ("coppice", "coppice_api", "coppice_envd", "coppice_jails")
ARCHITECTURE = (REPO / "ARCHITECTURE.md").read_text()
MAP = ARCHITECTURE.split("## Map", 1)[1].split("## Never", 1)[0]


def _mapped_under(package: str) -> set[str]:
    """The names the map lists under `package/` (modules as `x.py`, folders as `x/`)."""
    block = MAP.split(f"\n{package}/", 1)[1]
    block = re.split(r"\n(?=\S)", block, maxsplit=1)[0]  # up to the next top-level entry
    names = re.findall(r"^  ([a-z_]+(?:\.py|/))", block, flags=re.M)
    return set(names)


def test_every_package_is_in_the_map() -> None:
    for package in PACKAGES:
        assert f"\n{package}/" in MAP, package


def test_the_map_names_what_is_there_and_everything_there() -> None:
    for package in PACKAGES:
        root = REPO / package
        present = {p.name for p in root.glob("*.py") if p.name != "__init__.py"} | {
            p.name + "/" for p in root.iterdir() if (p / "__init__.py").exists()
        }
        mapped = _mapped_under(package)
        assert present - mapped == set(), f"{package}: not in ARCHITECTURE.md's map"
        assert mapped - present == set(), f"{package}: in the map, not in the tree"


def test_envd_top_level_stays_small() -> None:
    modules = [p for p in (REPO / "coppice_envd").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 8, sorted(p.name for p in modules)
