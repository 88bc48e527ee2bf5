"""What `coppice env` prints (coppice/commands/env.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coppice.commands.env import client_env, export_lines, run_env
from coppice.settings import Settings
from coppice.tls import tls_files


def test_client_env_with_tls_is_the_domain_and_the_ca_and_no_url_override(
    tmp_path: Path,
) -> None:
    files = tls_files(tmp_path / "my data")
    env = client_env("e2b_k", "127.0.0.1", 3000, 49983, "coppice.lan", (8443, files))
    assert env == {
        "E2B_DOMAIN": "coppice.lan:8443",  # the SDKs dial https://<name>.<domain>
        "E2B_API_KEY": "e2b_k",
        "SSL_CERT_FILE": str(files.bundle),
        "NODE_EXTRA_CA_CERTS": str(files.ca_cert),
    }
    assert f"export SSL_CERT_FILE='{files.bundle}'" in export_lines(env)  # quoted: a space
    on_443 = client_env("e2b_k", "127.0.0.1", 3000, 49983, "coppice.lan", (443, files))
    assert on_443["E2B_DOMAIN"] == "coppice.lan"


def test_the_sandbox_domain_carries_the_tls_port_unless_443() -> None:
    assert Settings(domain="c.lan").sandbox_domain == "c.lan"
    assert Settings(domain="c.lan", tls=True, tls_port=8443).sandbox_domain == "c.lan:8443"
    assert Settings(domain="c.lan", tls=True, tls_port=443).sandbox_domain == "c.lan"


def test_env_without_tls_is_plain_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_env(tmp_path, "127.0.0.1", 3000, 49983, "coppice.lan", as_json=True) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["E2B_SANDBOX_URL"] == "http://127.0.0.1:49983"
    assert "SSL_CERT_FILE" not in env


def test_env_with_tls_before_the_first_tls_start_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_env(tmp_path, "127.0.0.1", 3000, 49983, "coppice.lan", tls_port=443) == 1
    assert "run `coppice serve --tls` once" in capsys.readouterr().err
