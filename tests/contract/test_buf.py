"""buf.yaml and buf.gen.yaml work with no network: lint, build, and generating gen/ again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Protocol

import pytest
from fixtures import REPO
from google.protobuf import descriptor_pb2

BUF = REPO / "tests" / "node" / "node_modules" / ".bin" / "buf"  # npm @bufbuild/buf (scripts/test)
PLAIN_STANDARD = json.dumps(
    {"version": "v2", "modules": [{"path": "proto"}], "lint": {"use": ["STANDARD"]}}
)
# Written by scripts/gen itself, not by buf.gen.yaml's plugins.
PACKAGE_MARKERS = {"process/__init__.py", "filesystem/__init__.py"}


class OfflineBuf(Protocol):
    def __call__(self, *args: str, returncode: int = 0) -> str: ...


@pytest.fixture
def buf(tmp_path: Path) -> OfflineBuf:
    """Runs buf from the repository root in a new network namespace (no network at all), with a
    cache of its own and the venv's Python tools first on PATH."""
    env = {
        **os.environ,
        "BUF_CACHE_DIR": str(tmp_path / "buf-cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def run(*args: str, returncode: int = 0) -> str:
        result = subprocess.run(
            ["unshare", "--net", BUF, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == returncode, (
            f"buf {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
        return result.stdout

    return run


def test_lint_passes(buf: OfflineBuf) -> None:
    buf("lint")


def test_lint_disables_exactly_the_rules_the_wire_breaks(buf: OfflineBuf) -> None:
    def rules(*config: str) -> set[str]:
        listing = buf("config", "ls-lint-rules", "--configured-only", "--format", "json", *config)
        return {json.loads(line)["id"] for line in listing.splitlines()}

    disabled = rules("--config", PLAIN_STANDARD) - rules()
    # buf exits 100 when it finds lint violations.
    violations = buf("lint", "--config", PLAIN_STANDARD, "--error-format", "json", returncode=100)
    violated = {json.loads(line)["type"] for line in violations.splitlines()}
    assert disabled == violated == {"PACKAGE_VERSION_SUFFIX", "SERVICE_SUFFIX"}


def test_build_passes(buf: OfflineBuf, tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    buf("build", "--exclude-imports", "--output", str(image))
    # A buf image is wire-compatible with a FileDescriptorSet.
    built = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes())
    assert {file.name for file in built.file} == {
        "process/process.proto",
        "filesystem/filesystem.proto",
    }


def test_generate_makes_the_committed_gen(buf: OfflineBuf, tmp_path: Path) -> None:
    buf("generate", "--output", str(tmp_path))
    generated_root, committed_root = tmp_path / "gen", REPO / "gen"
    generated = {
        path.relative_to(generated_root).as_posix()
        for path in generated_root.rglob("*")
        if path.is_file()
    }
    committed = {
        path.relative_to(committed_root).as_posix()
        for path in committed_root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert generated == committed - PACKAGE_MARKERS
    differing = [
        name
        for name in sorted(generated)
        if (generated_root / name).read_bytes() != (committed_root / name).read_bytes()
    ]
    assert not differing, f"buf generate differs from gen/ in {differing}"
