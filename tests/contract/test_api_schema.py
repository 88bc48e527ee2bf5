"""schemathesis against the running REST service's own /openapi.json: no 5xx, and every status
code, content type, header and body matches the document (fake backends; bounded run)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from coppice_api.app import bound_port, build_app, start_api
from coppice_jails.testing import Backends

KEY = "e2b_" + "ef" * 20
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def schemathesis_cli() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed in the venv (pip install -e '.[dev]')"
    return found


async def test_service_matches_its_openapi_document(tmp_path: Path) -> None:
    backends = Backends(tmp_path)
    async with backends.manager() as manager:
        runner = await start_api(build_app(manager, [KEY], "coppice.lan"), "127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{bound_port(runner)}/openapi.json"
            proc = await asyncio.create_subprocess_exec(
                schemathesis_cli(),
                "run",
                url,
                "--header",
                f"X-API-Key: {KEY}",
                "--checks",
                CHECKS,
                "--max-examples",
                "5",
                "--seed",
                "1",
                "--generation-database",
                "none",
                "--no-color",
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
        finally:
            await runner.cleanup()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    assert "failed" not in report
