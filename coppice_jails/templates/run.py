"""External commands of builds and imports, their output passed on as progress."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Sequence

from coppice_jails.templates.model import Progress, TemplateError

_BUILD_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


async def run_logged(argv: Sequence[str], say: Progress) -> None:
    """Run a command, passing each output line to `say`; kill its process group if cancelled."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_BUILD_ENV,
        start_new_session=True,
        limit=1 << 20,
    )
    tail: deque[str] = deque(maxlen=15)
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                say(line)
        returncode = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        raise
    if returncode != 0:
        raise TemplateError(
            f"`{' '.join(argv[:3])} …` failed (exit {returncode}):\n" + "\n".join(tail)
        )
