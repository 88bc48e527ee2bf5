"""A sandbox killed while a request streams: the connection drops, as when E2B's VM goes away,
and the official SDKs tell the user the sandbox was killed (their health probe then gets the
proxy's "The sandbox was not found")."""

from __future__ import annotations

import threading

import httpx
import pytest
from e2b import Sandbox, TimeoutException
from e2b_code_interpreter import Sandbox as CodeSandbox
from fixtures.stack import Stack

pytestmark = pytest.mark.slow


def test_a_command_of_a_killed_sandbox_raises_that_it_was_killed(sdk_env: Stack) -> None:
    sandbox = Sandbox.create(template="base", timeout=120)
    command = sandbox.commands.run("sleep 60", background=True)
    sandbox.kill()
    with pytest.raises(TimeoutException, match="sandbox was killed or reached its end of life"):
        command.wait()


def test_a_foreground_command_ends_the_same_way(sdk_env: Stack) -> None:
    sandbox = Sandbox.create(template="base", timeout=120)
    timer = threading.Timer(1.0, sandbox.kill)
    timer.start()
    try:
        with pytest.raises(TimeoutException, match="killed or reached its end of life"):
            sandbox.commands.run("echo started; sleep 60")
    finally:
        timer.cancel()


def test_the_proxy_answer_for_a_killed_sandbox(sdk_env: Stack) -> None:
    sandbox = Sandbox.create(template="base", timeout=120)
    sandbox.kill()
    health = httpx.get(
        f"{sdk_env.sandbox_url}/health", headers={"E2b-Sandbox-Id": sandbox.sandbox_id}
    )
    assert health.status_code == 502
    assert health.json() == {
        "sandboxId": sandbox.sandbox_id,
        "message": "The sandbox was not found",
        "code": 502,
    }
    assert not sandbox.is_running()


def test_run_code_of_a_killed_sandbox_raises_that_it_was_killed(sdk_env: Stack) -> None:
    sandbox = CodeSandbox.create(timeout=120)
    sandbox.run_code("x = 1")  # the kernel is up: the kill lands mid-execution
    timer = threading.Timer(1.0, sandbox.kill)
    timer.start()
    try:
        with pytest.raises(
            TimeoutException, match="sandbox was killed while the request was in progress"
        ):
            sandbox.run_code("import time; time.sleep(300)", timeout=300)
    finally:
        timer.cancel()
