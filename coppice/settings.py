"""The service's settings and their defaults, defined once for the CLI and the service."""

from __future__ import annotations

import os
from pathlib import Path

from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT

DEFAULT_DATA_DIR = Path(os.environ.get("COPPICE_DATA_DIR", "/var/lib/coppice"))
DEFAULT_HOST = "0.0.0.0"
DEFAULT_API_PORT = 3000
# One listener per envd port label; SDKs not told E2B_SANDBOX_URL dial these.
DEFAULT_GATEWAY_PORTS = (ENVD_PORT, INTERPRETER_PORT)
DEFAULT_DOMAIN = "coppice.lan"
DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")
