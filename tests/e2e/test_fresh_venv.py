"""A new user's `scripts/serve`: a fresh venv from requirements/service.lock alone (no dev extras),
the project on top with --no-deps, then a real service from it, driven by the official SDKs that
this (test) venv holds. It fails the day `scripts/serve` would fail for a user: a lock that lacks
a dependency or pins a broken one, an import that needs a dev-only package, a refused argument.

The locks themselves are checked against pyproject.toml first (fast, no network): a dependency
added to pyproject.toml without `scripts/update-lock` is reported as such.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox
from fixtures import REPO
from fixtures.stack import Stack, running_stack
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SERVE = REPO / "scripts" / "serve"
LOCKS = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def _pins(lock: Path) -> dict[str, str]:
    return {canonicalize_name(name): version for name, version in PIN.findall(lock.read_text())}


def _project() -> dict[str, object]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


def _unlocked(requirements: list[str], pins: dict[str, str]) -> list[str]:
    """The requirements that no pin of the lock satisfies."""
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        version = pins.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(f"{text} (locked: {version})")
    return missing


def test_the_service_lock_satisfies_pyproject() -> None:
    dependencies = _project()["dependencies"]
    assert isinstance(dependencies, list)
    missing = _unlocked(dependencies, _pins(LOCKS / "service.lock"))
    assert not missing, f"run scripts/update-lock; service.lock lacks {missing}"


def test_the_dev_lock_satisfies_pyproject_and_its_dev_extra() -> None:
    project = _project()
    dependencies, extras = project["dependencies"], project["optional-dependencies"]
    assert isinstance(dependencies, list)
    assert isinstance(extras, dict)
    missing = _unlocked([*dependencies, *extras["dev"]], _pins(LOCKS / "dev.lock"))
    assert not missing, f"run scripts/update-lock; dev.lock lacks {missing}"


def test_the_dev_lock_holds_the_service_lock() -> None:
    """A venv set up by scripts/test serves too (setup skips the service install then)."""
    service, dev = _pins(LOCKS / "service.lock"), _pins(LOCKS / "dev.lock")
    differ = {name: (v, dev.get(name)) for name, v in service.items() if dev.get(name) != v}
    assert not differ, f"run scripts/update-lock; service vs dev: {differ}"


def _user_environ(venv: Path) -> dict[str, str]:
    """A user's shell: none of this test venv, the fresh venv as scripts/serve's COPPICE_VENV."""
    test_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != test_bin)
    dropped = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "COPPICE_API_KEYS"}
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**environ, "PATH": path, "COPPICE_VENV": str(venv)}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`scripts/serve --help` into a new venv: its whole set-up, then `coppice serve --help`."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    result = subprocess.run(
        [SERVE, "--help"],
        env=_user_environ(venv),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    try:
        assert result.returncode == 0, result.stderr[-6000:]
        assert result.stdout.startswith("usage: coppice serve"), result.stdout
        yield venv
    finally:
        shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_stack(fresh_venv: Path) -> Iterator[Stack]:
    """`scripts/serve --data-dir DIR …` from the fresh venv (its set-up is a no-op by now)."""
    with running_stack([str(SERVE)], _user_environ(fresh_venv)) as stack:
        yield stack


@pytest.mark.slow
def test_the_fresh_venv_holds_the_service_lock_and_the_project_alone(fresh_venv: Path) -> None:
    frozen = subprocess.run(
        [fresh_venv / "bin" / "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {canonicalize_name(n): v for n, v in PIN.findall(frozen)}
    installed.pop(canonicalize_name("pip"))
    assert installed == _pins(LOCKS / "service.lock")
    check = subprocess.run(
        [fresh_venv / "bin" / "pip", "check"], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    editable = subprocess.run(
        [fresh_venv / "bin" / "pip", "list", "--editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^coppice\s+0\.1\.0\s+" + re.escape(str(REPO)), editable, re.MULTILINE)


@pytest.mark.slow
def test_a_sandbox_of_the_fresh_service_runs_a_command(
    fresh_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, body = fresh_stack.api("POST", "/sandboxes", {"templateID": "base", "timeout": 60})
    assert status == 201, body
    assert isinstance(body, dict)
    for key, value in fresh_stack.sdk_env().items():
        monkeypatch.setenv(key, value)
    sandbox = Sandbox.connect(body["sandboxID"])
    try:
        result = sandbox.commands.run("echo hello from $(hostname) as $(whoami)")
        assert result.stdout == f"hello from {sandbox.sandbox_id} as user\n"
    finally:
        sandbox.kill()


@pytest.mark.slow
def test_the_fresh_service_runs_code_in_a_kernel(
    fresh_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in fresh_stack.sdk_env().items():
        monkeypatch.setenv(key, value)
    with CodeSandbox.create(timeout=60) as sandbox:
        execution = sandbox.run_code("6 * 7")
        assert execution.error is None, execution.error
        assert execution.text == "42"
