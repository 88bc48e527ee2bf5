"""The `coppice` console script that the venv installs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import REPO

from coppice.cli import build_parser
from coppice.settings import DEFAULT_DATA_DIR

COPPICE = Path(sys.executable).parent / "coppice"


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run([COPPICE, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for subcommand in ("serve", "template", "sandbox", "env"):
        assert f"    {subcommand} " in result.stdout, f"{subcommand!r} missing:\n{result.stdout}"


def test_scripts_serve_sets_up_then_runs_coppice_serve() -> None:
    """`scripts/serve ARGS` is setup (idempotent, here already done) + `coppice serve ARGS`."""
    repo = REPO
    result = subprocess.run(
        [repo / "scripts" / "serve", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: coppice serve")
    for option in ("--storage", "--zfs-dataset", "--api-port", "--gateway-ports", "--domain"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["--data-dir", "{dir}", "env"],
        ["env", "--data-dir", "{dir}"],
        ["--data-dir", "{other}", "env", "--data-dir", "{dir}"],
    ],
    ids=["before-the-subcommand", "after-the-subcommand", "after-wins"],
)
def test_data_dir_goes_before_or_after_the_subcommand(argv: list[str], tmp_path: Path) -> None:
    """`coppice --data-dir DIR env` and `coppice env --data-dir DIR` read the same keys file."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "api-keys").write_text("e2b_from_the_data_dir\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "api-keys").write_text("e2b_from_another_dir\n")
    args = [a.format(dir=tmp_path / "dir", other=tmp_path / "other") for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "COPPICE_API_KEYS"}
    result = subprocess.run([COPPICE, *args], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "export E2B_API_KEY=e2b_from_the_data_dir\n" in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--data-dir", "/srv/c"], Path("/srv/c")),
        (["--data-dir", "/srv/c", "serve"], Path("/srv/c")),
        (["serve"], DEFAULT_DATA_DIR),
        (["template", "build", "base", "--data-dir", "/srv/c"], Path("/srv/c")),
        (["template", "--data-dir", "/srv/c", "list"], Path("/srv/c")),
        (["sandbox", "kill", "abc", "--data-dir", "/srv/c"], Path("/srv/c")),
    ],
)
def test_every_subcommand_takes_data_dir(argv: list[str], expected: Path) -> None:
    """As README says, `scripts/serve --data-dir DIR` (= `coppice serve --data-dir DIR`) works;
    tests/stack_fixtures.py starts every end-to-end service that way."""
    assert build_parser().parse_args(argv).data_dir == expected


def test_serve_help_shows_data_dir() -> None:
    result = subprocess.run(
        [COPPICE, "serve", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--data-dir DATA_DIR" in result.stdout
    assert f"(default: {DEFAULT_DATA_DIR}" in " ".join(result.stdout.split())
