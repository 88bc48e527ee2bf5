"""End to end: the official SDKs against a real `coppice serve` (API + gateway + jails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from e2b import Sandbox
from fixtures import REPO
from fixtures.stack import COPPICE, Stack

NODE_DIR = REPO / "tests" / "node"


def _run_client(stack: Stack, argv: list[str], cwd: os.PathLike[str] = REPO) -> str:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **stack.sdk_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_seed_curl_creates_a_default_sandbox(coppice_stack: Stack) -> None:
    status, body = coppice_stack.api("POST", "/sandboxes", {"templateID": "default"})
    assert status == 201, body
    assert isinstance(body, dict)
    sandbox_id = body["sandboxID"]
    assert sandbox_id.isalnum()
    assert sandbox_id.islower()
    assert len(sandbox_id) >= 20
    assert coppice_stack.api("DELETE", f"/sandboxes/{sandbox_id}")[0] == 204


def test_python_sdk_runs_a_command_and_holds_files(sdk_env: Stack) -> None:
    with Sandbox.create(template="base", timeout=60) as sandbox:
        result = sandbox.commands.run("echo hi from $(hostname) as $(whoami)")
        assert result.stdout == f"hi from {sandbox.sandbox_id} as user\n"
        sandbox.files.write("/home/user/a.txt", "hello")
        assert sandbox.files.read("/home/user/a.txt") == "hello"


def test_seed_worked_example_routes_by_host_name(sdk_env: Stack) -> None:
    """The seed's worked example: two sandboxes made with its curl call, each reached by its own
    `49999-<id>.<domain>` Host name, list different files under /root."""
    ids = []
    for _ in range(2):
        status, body = sdk_env.api("POST", "/sandboxes", {"templateID": "default"})
        assert status == 201, body
        assert isinstance(body, dict)
        ids.append(body["sandboxID"])
    try:
        for sandbox_id in ids:
            Sandbox.connect(sandbox_id).commands.run(f"touch /root/only-{sandbox_id}", user="root")
        listings = {}
        for sandbox_id in ids:
            request = urllib.request.Request(
                f"{sdk_env.sandbox_url}/files/list?path=/root",
                headers={
                    "Host": f"49999-{sandbox_id}.coppice.lan:49999",
                    "Content-Type": "application/json",
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                listings[sandbox_id] = {e["name"] for e in json.load(response)["entries"]}
        a, b = ids
        assert f"only-{a}" in listings[a]
        assert f"only-{b}" not in listings[a]
        assert f"only-{b}" in listings[b]
        assert f"only-{a}" not in listings[b]
    finally:
        for sandbox_id in ids:
            sdk_env.api("DELETE", f"/sandboxes/{sandbox_id}")


def test_example_01_commands_and_files(coppice_stack: Stack) -> None:
    out = _run_client(coppice_stack, [sys.executable, "examples/01-commands-and-files.py"])
    lines = out.splitlines()
    assert lines[-1] == "ok"
    assert "[1] run: hello from" in out
    assert "as user in /home/user" in out
    assert "[2] exit code 3, stderr='oops'" in out
    assert "[3] read back: written through /files" in out
    assert "[4] list: ['hello.txt']" in out
    assert "[6] killed: True" in out
    assert "[7] as root: root" in out


def test_node_sdk_commands_files_and_kill(coppice_stack: Stack) -> None:
    out = _run_client(coppice_stack, ["node", "envd_tour.mjs"], cwd=NODE_DIR)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stdout"] == "node-42\nuser\n"
    assert result["read"] == "written by node"
    assert "from-node.txt" in result["names"]
    assert result["failedExit"] == 7


def test_cli_sandbox_list_info_kill_and_env(coppice_stack: Stack) -> None:
    status, body = coppice_stack.api("POST", "/v2/sandboxes", {"templateID": "base"})
    assert status == 201, body
    assert isinstance(body, dict)
    sandbox_id = body["sandboxID"]
    cli = [str(COPPICE), "--data-dir", str(coppice_stack.data_dir)]

    def coppice(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args],
            env={**os.environ, "E2B_API_URL": coppice_stack.api_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert sandbox_id in coppice("sandbox", "list").stdout
    info = coppice("sandbox", "info", sandbox_id)
    assert json.loads(info.stdout)["sandboxID"] == sandbox_id
    assert coppice("sandbox", "kill", sandbox_id).returncode == 0
    again = coppice("sandbox", "kill", sandbox_id)
    assert again.returncode == 1
    assert "error 404" in again.stderr
    env = coppice("env", "--api-port", str(coppice_stack.api_port)).stdout
    assert f"export E2B_API_URL=http://127.0.0.1:{coppice_stack.api_port}" in env
    assert f"export E2B_API_KEY={coppice_stack.api_key}" in env


def test_serve_prints_the_key_it_created_and_the_client_env(coppice_stack: Stack) -> None:
    log = coppice_stack.log_path.read_text()
    assert f"a new API key was created (stored in {coppice_stack.data_dir}/api-keys)" in log
    assert f"export E2B_API_KEY={coppice_stack.api_key}" in log
    assert f"export E2B_SANDBOX_URL={coppice_stack.sandbox_url}" in log


def test_cli_template_list_shows_name_size_created_backend(coppice_stack: Stack) -> None:
    result = subprocess.run(
        [str(COPPICE), "--data-dir", str(coppice_stack.data_dir), "template", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "SIZE", "CREATED", "BACKEND"]
    names = {row.split()[0]: row for row in rows}
    assert {"base", "code-interpreter-v1"} <= names.keys()
    assert "overlay" in names["base"]
