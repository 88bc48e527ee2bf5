"""A real `coppice serve` (API + gateway, overlay storage, Linux jails) for end-to-end tests.

The service runs as a subprocess on free loopback ports with its own data dir. Its templates are
seeded from the cached built templates (tests/template_fixtures.py) by hard-linking their trees,
so no test run rebuilds them; overlay only ever reads a template tree, so the links are safe.

Import explicitly: `from stack_fixtures import Stack, coppice_stack`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from template_fixtures import built_template_root, cached_template_store

REPO = Path(__file__).resolve().parent.parent
COPPICE = Path(sys.executable).parent / "coppice"
STACK_TEMPLATES = ("base", "code-interpreter-v1")


@dataclass(frozen=True)
class Stack:
    data_dir: Path
    api_port: int
    envd_port: int
    interpreter_port: int
    log_path: Path

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.envd_port}"

    @property
    def api_key(self) -> str:
        """The key `coppice serve` created and stored on its first start."""
        return (self.data_dir / "api-keys").read_text().split()[0]

    def sdk_env(self) -> dict[str, str]:
        """The environment `coppice env` prints: what an unmodified SDK needs."""
        return {
            "E2B_API_KEY": self.api_key,
            "E2B_API_URL": self.api_url,
            "E2B_SANDBOX_URL": self.sandbox_url,
            "E2B_DOMAIN": "coppice.lan",
        }

    def api(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as error:
            raw = error.read()
            return error.code, json.loads(raw) if raw else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_templates(data_dir: Path) -> None:
    """Hard-link the cached built templates (trees and metadata) into a fresh data dir."""
    for name in STACK_TEMPLATES:
        built_template_root(name)
    cache = cached_template_store().data_dir
    (data_dir / "templates").mkdir(parents=True)
    (data_dir / "overlay" / "templates").mkdir(parents=True)
    for name in STACK_TEMPLATES:
        shutil.copy2(cache / "templates" / f"{name}.json", data_dir / "templates")
        subprocess.run(
            ["cp", "-alx", cache / "overlay" / "templates" / name, data_dir / "overlay/templates"],
            check=True,
        )


def _wait_ready(stack: Stack, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"coppice serve exited:\n{stack.log_path.read_text()}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{stack.api_url}/health", timeout=2).close()
            # With no sandbox yet the gateway answers 502: it is up all the same.
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(f"{stack.sandbox_url}/health", timeout=2).close()
            return
        time.sleep(0.1)
    raise RuntimeError(f"coppice serve not ready:\n{stack.log_path.read_text()}")


@contextlib.contextmanager
def running_stack(
    serve: Sequence[str] = (str(COPPICE), "serve"), environ: Mapping[str, str] | None = None
) -> Iterator[Stack]:
    """`SERVE --data-dir DIR --host 127.0.0.1 --api-port … --gateway-ports …`, ready. SERVE is
    this venv's `coppice serve` unless given (e.g. `scripts/serve`), run in `environ` (default:
    this process's environment) less COPPICE_API_KEYS."""
    data_dir = Path(tempfile.mkdtemp(prefix="cst-", dir="/var/tmp"))
    seed_templates(data_dir)
    stack = Stack(data_dir, _free_port(), _free_port(), _free_port(), data_dir / "serve.log")
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k != "COPPICE_API_KEYS"}
    with stack.log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *serve, "--data-dir", str(data_dir), "--host", "127.0.0.1",
                "--api-port", str(stack.api_port),
                "--gateway-ports", f"{stack.envd_port},{stack.interpreter_port}",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
    try:
        _wait_ready(stack, process)
        yield stack
    finally:
        try:
            _kill_all_sandboxes(stack)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _cleanup_data_dir(data_dir)


def _kill_all_sandboxes(stack: Stack) -> None:
    with contextlib.suppress(OSError):
        status, listed = stack.api("GET", "/v2/sandboxes?limit=100")
        if status == 200 and isinstance(listed, list):
            for sandbox in listed:
                stack.api("DELETE", f"/sandboxes/{sandbox['sandboxID']}")


def _cleanup_data_dir(data_dir: Path) -> None:
    # Whatever the service could not destroy (it should have) must not stay mounted.
    sandboxes = data_dir / "overlay" / "sandboxes"
    for merged in sandboxes.glob("*/merged"):
        subprocess.run(["umount", "-l", str(merged)], check=False, capture_output=True)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def coppice_stack() -> Iterator[Stack]:
    with running_stack() as stack:
        yield stack
