"""Where subcommands write: results to stdout, progress to stderr (so results stay pipeable)."""

from __future__ import annotations

import sys


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
