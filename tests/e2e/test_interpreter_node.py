"""The code interpreter through the official Node SDK (`@e2b/code-interpreter`, pinned in
tests/node/package.json) against a real `coppice serve` on the built `code-interpreter-v1`
template: tests/node/interpreter_tour.mjs prints one JSON line, asserted here."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest
from fixtures import REPO
from fixtures.stack import Stack

pytestmark = pytest.mark.slow

NODE_DIR = REPO / "tests" / "node"


def test_node_interpreter_tour(coppice_stack: Stack) -> None:
    ran = subprocess.run(
        ["node", "interpreter_tour.mjs"],
        cwd=NODE_DIR,
        env={**os.environ, **coppice_stack.sdk_env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    tour: dict[str, Any] = json.loads(ran.stdout.strip().splitlines()[-1])

    assert (tour["chartType"], tour["chartTitle"]) == ("bar", "Coppiced stools")
    assert tour["chartBars"] == [["oak", 12], ["ash", 7], ["elm", 3]]
    assert tour["data"] == {"tree": ["oak", "ash"], "age": [40, 7]}
    assert tour["languages"] == {
        "javascript": {"value": "42", "state": "42", "errors": [None, None]},
        "typescript": {"value": "42", "state": "42", "errors": [None, None]},
        "r": {"value": "[1] 42", "state": "[1] 42", "errors": [None, None]},
    }
    assert tour["context"] == {"language": "python", "cwd": "/tmp"}
    assert tour["cwd"] == "/tmp"
    assert (tour["envDuring"], tour["envAfter"]) == ("per execution", "unset")
