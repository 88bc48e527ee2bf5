"""The FreeBSD runtime's command lines (it cannot run here: see its module docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from coppice_jails.runtime.base import (
    ExecError,
    ExecSpec,
    JailStats,
    Limits,
    ProcessNotFound,
    User,
)
from coppice_jails.runtime.freebsd import (
    FreeBSDRuntime,
    create_command,
    exec_command,
    limit_commands,
    parse_jail_names,
    parse_stats,
    pause_command,
    remove_commands,
    signal_command,
    stats_command,
)

SID = "abc123def456ghi789jk"
USER = User("user", 1000, 1000, "/home/user", (1000,))


def test_create() -> None:
    assert create_command(SID, Path("/pool/sandboxes/x")) == [
        "jail", "-i", "-c", f"name=coppice_{SID}", "persist", "path=/pool/sandboxes/x",
        f"host.hostname={SID}", "ip4=inherit", "mount.devfs",
    ]  # fmt: skip


def test_limits() -> None:
    limits = Limits(memory_bytes=512 * 1024 * 1024, cpu_millicores=1500, pids=64)
    assert limit_commands(SID, limits) == [
        ["rctl", "-a", f"jail:coppice_{SID}:memoryuse:deny=536870912"],
        ["rctl", "-a", f"jail:coppice_{SID}:maxproc:deny=64"],
        ["rctl", "-a", f"jail:coppice_{SID}:pcpu:deny=150"],
    ]
    unlimited = Limits(memory_bytes=None, cpu_millicores=None, pids=None)
    assert limit_commands(SID, unlimited) == []


def test_exec_keeps_env_cwd_and_argv_out_of_shell_text() -> None:
    spec = ExecSpec(
        ["python3", "-c", "print('$HOME; rm -rf /')"],
        USER,
        "/home/user/my dir",
        {"PATH": "/usr/bin:/bin", "X": "a b;c"},
    )
    assert exec_command(SID, spec) == [
        "jexec", "-U", "user", f"coppice_{SID}",
        "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "X=a b;c",
        "/bin/sh", "-c", 'cd -- "$1" && shift && exec "$@"', "coppice-exec",
        "/home/user/my dir", "python3", "-c", "print('$HOME; rm -rf /')",
    ]  # fmt: skip


def test_signal_pause_stats_remove() -> None:
    assert signal_command(SID, 42, 15) == ["jexec", f"coppice_{SID}", "/bin/kill", "-15", "42"]
    assert pause_command(SID, resume=False) == ["pkill", "-STOP", "-j", f"coppice_{SID}"]
    assert pause_command(SID, resume=True) == ["pkill", "-CONT", "-j", f"coppice_{SID}"]
    assert stats_command(SID) == ["rctl", "-u", f"jail:coppice_{SID}"]
    assert remove_commands(SID) == [
        ["jail", "-r", f"coppice_{SID}"],
        ["rctl", "-r", f"jail:coppice_{SID}"],
    ]


def test_parse_stats() -> None:
    usage = "cputime=3\ndatasize=1\nmemoryuse=1048576\nmaxproc=7\npcpu=0\n"
    assert parse_stats(usage, Limits(memory_bytes=1 << 30)) == JailStats(
        cpu_usage_usec=3_000_000, memory_bytes=1048576, memory_limit_bytes=1 << 30, pids=7
    )


def test_only_coppice_jails_are_listed() -> None:
    assert parse_jail_names("web\ncoppice_b2\ncoppice_a1\n42\n") == ["a1", "b2"]


class FakeHost:
    """Records commands; answers from a table of (command prefix -> result)."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.commands: list[list[str]] = []

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str, str]:
        self.commands.append(list(argv))
        line = " ".join(argv)
        for prefix, answer in self.answers.items():
            if line.startswith(prefix):
                return answer
        return 0, "", ""


async def test_start_issues_create_then_limits() -> None:
    host = FakeHost({"jail -i -c": (0, "7\n", "")})
    jail = await FreeBSDRuntime(host).start(SID, Path("/r"), Limits(pids=10))
    assert jail.handle == "7"
    assert host.commands == [create_command(SID, Path("/r")), *limit_commands(SID, Limits(pids=10))]


async def test_failed_limit_rolls_the_jail_back() -> None:
    host = FakeHost({"jail -i -c": (0, "7\n", ""), "rctl -a": (1, "", "rctl: RACCT disabled")})
    with pytest.raises(Exception, match="RACCT disabled"):
        await FreeBSDRuntime(host).start(SID, Path("/r"), Limits())
    assert host.commands[-2:] == remove_commands(SID)


async def test_attach_requires_the_same_jid() -> None:
    host = FakeHost({"jls -j": (0, "8\n", "")})
    runtime = FreeBSDRuntime(host)
    assert await runtime.attach(SID, Path("/r"), "7") is None
    attached = await runtime.attach(SID, Path("/r"), "8")
    assert attached is not None
    assert attached.handle == "8"


async def test_signal_to_unknown_pid_and_pty_are_errors() -> None:
    host = FakeHost({"jexec": (1, "", "kill: 42: No such process")})
    jail = await FreeBSDRuntime(host).start(SID, Path("/r"), Limits())
    with pytest.raises(ProcessNotFound):
        await jail.signal(42, 15)
    with pytest.raises(ExecError):
        await jail.exec(ExecSpec(["sh"], USER, "/", {}, pty=(24, 80)))


async def test_pause_tolerates_an_empty_jail_only() -> None:
    host = FakeHost({"pkill -STOP": (1, "", ""), "pkill -CONT": (2, "", "pkill: bad jail")})
    jail = await FreeBSDRuntime(host).start(SID, Path("/r"), Limits())
    await jail.freeze()
    with pytest.raises(Exception, match="bad jail"):
        await jail.thaw()
