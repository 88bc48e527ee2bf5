"""A kernel's output tail stopped while its pipe is still being connected loses no one else's
file descriptor under uvloop, the servers' loop (uvloop closes a pipe's fd twice when
connect_read_pipe is cancelled midway: the second close hit a kill's file as EBADF)."""

from __future__ import annotations

import asyncio
import gc
import os

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
