"""The `coppice` console script that the venv installs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

COPPICE = Path(sys.executable).parent / "coppice"


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run([COPPICE, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for subcommand in ("serve", "template", "sandbox", "env"):
        assert f"    {subcommand} " in result.stdout, f"{subcommand!r} missing:\n{result.stdout}"


def test_scripts_serve_sets_up_then_runs_coppice_serve() -> None:
    """`scripts/serve ARGS` is setup (idempotent, here already done) + `coppice serve ARGS`."""
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [repo / "scripts" / "serve", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: coppice serve")
    for option in ("--storage", "--zfs-dataset", "--api-port", "--gateway-ports", "--domain"):
        assert option in result.stdout
