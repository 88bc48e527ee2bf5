"""What the lifecycle API and the gateway both know about envd, the agent E2B runs in every
sandbox: the version whose behaviour the gateway implements, its ports, its default PATH."""

from __future__ import annotations

# ≥ 0.6.4 opens every SDK feature gate.
ENVD_VERSION = "0.6.13"
ENVD_PORT = 49983  # envd: processes and files
INTERPRETER_PORT = 49999  # the code interpreter
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
