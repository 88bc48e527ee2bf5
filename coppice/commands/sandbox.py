"""`coppice sandbox list|info|kill`, through the lifecycle API."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from coppice.commands.env import configured_api_key
from coppice.settings import DEFAULT_API_PORT


def run_sandbox(data_dir: Path, api_url: str | None, action: str, sandbox_id: str | None) -> int:
    """`action` list, info or kill (these two of `sandbox_id`)."""
    default_url = f"http://127.0.0.1:{DEFAULT_API_PORT}"
    api_url = (api_url or os.environ.get("E2B_API_URL") or default_url).rstrip("/")
    key = os.environ.get("E2B_API_KEY") or configured_api_key(data_dir) or ""
    if action == "list":
        status, body = _api_call("GET", f"{api_url}/v2/sandboxes", key)
        if status == 200:
            _print_sandbox_table(body)
            return 0
    elif action == "info":
        status, body = _api_call("GET", f"{api_url}/sandboxes/{sandbox_id}", key)
        if status == 200:
            print(json.dumps(body, indent=2))
            return 0
    else:
        status, body = _api_call("DELETE", f"{api_url}/sandboxes/{sandbox_id}", key)
        if status == 204:
            print(f"killed {sandbox_id}")
            return 0
    message = body.get("message") if isinstance(body, dict) else body
    print(f"error {status}: {message}", file=sys.stderr)
    return 1


def _print_sandbox_table(sandboxes: list[dict[str, Any]]) -> None:
    print(f"{'SANDBOX ID':<24} {'TEMPLATE':<22} {'STATE':<8} {'STARTED':<26} END")
    for s in sandboxes:
        print(
            f"{s['sandboxID']:<24} {s['templateID']:<22} {s['state']:<8} "
            f"{s['startedAt']:<26} {s['endAt']}"
        )


def _api_call(method: str, url: str, key: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")
    except urllib.error.URLError as error:
        return 0, f"cannot reach {url}: {error.reason}"
