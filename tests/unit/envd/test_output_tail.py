"""A kernel's output tail closes its own pipe exactly once, and nothing else, under uvloop (the
servers' loop). uvloop closes a pipe transport's fd twice, in libuv and again through the file
object; a file another thread opened in between lost its fd (seen as EBADF in downloads and as
libzmq aborting on its epoll fd)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import textwrap

import uvloop

from coppice_envd.interpreter.kernels import _OutputTail


async def _lost_descriptors(turns: int, rounds: int = 50) -> int:
    lost = 0
    for _ in range(rounds):
        read_end, write_end = os.pipe()
        tail = _OutputTail(read_end)
        for _ in range(turns):
            await asyncio.sleep(0)
        tail.cancel()
        await asyncio.sleep(0)
        bystanders = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
        await tail.finished()
        gc.collect()
        for fd in bystanders:
            try:
                os.fstat(fd)
                os.close(fd)
            except OSError:
                lost += 1
        os.close(write_end)
    return lost


def test_a_stopped_tail_closes_only_its_own_pipe() -> None:
    for turns in (0, 1, 2):
        assert uvloop.run(_lost_descriptors(turns)) == 0


def test_a_stopped_tail_keeps_what_it_read() -> None:
    async def run() -> str:
        read_end, write_end = os.pipe()
        tail = _OutputTail(read_end)
        os.write(write_end, b"Traceback: no ipykernel\n")
        os.close(write_end)
        return await tail.finished()

    assert uvloop.run(run()) == "Traceback: no ipykernel"


_TRACED = textwrap.dedent(
    """
    import asyncio, os, uvloop
    from coppice_envd.interpreter.kernels import _OutputTail

    async def main():
        for ends_by in ("eof", "cancel"):
            read_end, write_end = os.pipe()
            os.write(2, f"BEGIN {read_end}\\n".encode())
            tail = _OutputTail(read_end)
            os.write(write_end, b"some output")
            await asyncio.sleep(0.05)
            if ends_by == "eof":
                os.close(write_end)
            else:
                tail.cancel()
            await tail.finished()
            await asyncio.sleep(0.05)
            os.write(2, b"END\\n")
            if ends_by == "cancel":
                os.close(write_end)

    uvloop.run(main())
    """
)


def test_the_pipe_is_closed_by_exactly_one_close_call() -> None:
    # strace (scripts/test installs it) sees every close, the C-level ones of a loop included.
    traced = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=close,write",
            "-e",
            "signal=none",
            sys.executable,
            "-c",
            _TRACED,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stderr
    windows = re.findall(r'write\(2, "BEGIN (\d+)\\n".*?write\(2, "END\\n"', traced, re.S)
    assert len(windows) == 2, traced[-2000:]
    for match in re.finditer(r'write\(2, "BEGIN (\d+)\\n"(.*?)write\(2, "END\\n"', traced, re.S):
        fd, calls = match.group(1), match.group(2)
        assert len(re.findall(rf"\bclose\({fd}\)", calls)) == 1, calls
