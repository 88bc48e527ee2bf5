"""End to end: the oldest supported `e2b` 2.x (requirements/sdk-oldest.lock, hash-pinned) against
`coppice serve --tls` with nothing but what `coppice env --tls` prints — no URL override, no
debug mode — the names resolved through our `coppice dns` (tests/fixtures/dns.py). Such an SDK
has no E2B_SANDBOX_URL: the SDK's own https://api.<domain> and https://<port>-<id>.<domain> are
the only way it reaches a server.

Its venv lives outside the repository, under /var/cache/coppice-test, one per lock content."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import REPO
from fixtures.dns import WildcardDns
from fixtures.stack import COPPICE, Stack, running_stack

pytestmark = pytest.mark.slow

LOCK = REPO / "requirements" / "sdk-oldest.lock"
CACHE = Path(os.environ.get("COPPICE_TEST_CACHE", "/var/cache/coppice-test"))

CLIENT = """
import json
from importlib.metadata import version
from e2b import Sandbox

sandbox = Sandbox.create(template="base", timeout=60)
steps = {"version": version("e2b"), "id": sandbox.sandbox_id}
steps["run"] = sandbox.commands.run("echo from $(hostname)").stdout
sandbox.files.write("/home/user/old.txt", "written by an old sdk")
steps["read"] = sandbox.files.read("/home/user/old.txt")
steps["killed"] = sandbox.kill()
print(json.dumps(steps))
"""


def _locked_version(name: str) -> str:
    found = re.search(rf"^{name}==(\S+)", LOCK.read_text(), re.MULTILINE)
    assert found, f"{LOCK} pins no {name}"
    return found.group(1)


@pytest.fixture(scope="module")
def oldest_sdk_python() -> Path:
    """A venv with exactly the lock (hashes required, no resolution), made once per lock."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    venv = CACHE / "sdk-oldest" / digest
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        base = shutil.which("python3.11") or shutil.which("python3") or "python3"
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(LOCK)], check=True)
        (venv / ".installed").write_text(digest + "\n")
    return python


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[Stack]:
    with running_stack(tls=True) as stack:
        yield stack


def _coppice_env(stack: Stack) -> dict[str, str]:
    """`coppice env --tls --json` for the ports this stack was started with."""
    assert stack.tls_port is not None
    argv: list[str | Path] = [COPPICE, "env", "--data-dir", str(stack.data_dir), "--json"]
    argv += ["--tls", "--tls-port", str(stack.tls_port), "--api-port", str(stack.api_port)]
    argv += ["--gateway-port", str(stack.envd_port)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    env: dict[str, str] = json.loads(out)
    return env


def test_the_oldest_2x_sdk_creates_runs_writes_reads_and_kills(
    oldest_sdk_python: Path, tls_stack: Stack, wildcard_dns: WildcardDns
) -> None:
    env = _coppice_env(tls_stack)
    assert not {"E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DEBUG"} & env.keys()
    # A user's shell: none of this test venv's variables, nothing E2B but coppice env's.
    strip = ("E2B_", "SSL_CERT", "VIRTUAL_ENV", "PYTHON")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
    result = wildcard_dns.run(
        [str(oldest_sdk_python), "-c", CLIENT], env={**environ, **env}, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    assert steps["version"] == _locked_version("e2b")
    assert steps["run"] == f"from {steps['id']}\n"
    assert steps["read"] == "written by an old sdk"
    assert steps["killed"] is True
    status, _ = tls_stack.api("GET", f"/sandboxes/{steps['id']}")
    assert status == 404
