"""The official, unmodified E2B SDKs (Python `e2b`, Node `e2b`) against the REST service on a
real port, over a manager with in-memory fake backends. (Neither `Sandbox.create` nor
`Sandbox.connect` of the Python SDK contacts envd: they only call the API.)

The sync Python SDK blocks, so each call runs in a thread while the service runs on the loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest
from e2b import Sandbox, SandboxQuery, SandboxState, Template
from e2b.exceptions import SandboxException
from fixtures import REPO

from coppice_api.app import bound_port, build_app, start_api
from coppice_jails.manager import SandboxManager
from coppice_jails.testing import Backends

pytestmark = pytest.mark.usefixtures("warm_python_sdk")

KEY = "e2b_" + "cd" * 20
DOMAIN = "coppice.lan"
NODE_DIR = REPO / "tests" / "node"

P = ParamSpec("P")
R = TypeVar("R")


async def sdk(call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    return await asyncio.to_thread(call, *args, **kwargs)


@dataclass
class Service:
    url: str
    backends: Backends
    manager: SandboxManager


@pytest.fixture
async def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    backends = Backends(tmp_path)
    async with backends.manager() as manager:
        runner = await start_api(build_app(manager, [KEY], DOMAIN), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{bound_port(runner)}"
        monkeypatch.setenv("E2B_API_URL", url)
        monkeypatch.setenv("E2B_API_KEY", KEY)
        monkeypatch.setenv("E2B_DOMAIN", "other.lan")
        monkeypatch.delenv("E2B_DEBUG", raising=False)
        try:
            yield Service(url, backends, manager)
        finally:
            await runner.cleanup()


async def test_python_sdk_create_info_timeout_kill(service: Service) -> None:
    sbx = await sdk(
        Sandbox.create, "base", timeout=120, metadata={"user": "ann b"}, envs={"A": "1"}
    )
    assert sbx.sandbox_domain == DOMAIN
    info = await sdk(sbx.get_info)
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"user": "ann b"}
    assert info.state == SandboxState.RUNNING
    assert (info.end_at - info.started_at).total_seconds() == pytest.approx(120, abs=1)
    record = await service.manager.get(sbx.sandbox_id)
    assert record.env_vars == {"A": "1"}

    await sdk(sbx.set_timeout, 30)
    info = await sdk(sbx.get_info)
    assert (info.end_at - info.started_at).total_seconds() < 60

    assert await sdk(sbx.kill) is True
    assert await sdk(Sandbox.kill, sbx.sandbox_id) is False
    assert await sdk(Sandbox.kill, "nosuchsandbox0000000") is False
    assert service.backends.storage.sandboxes == {}


async def test_python_sdk_unknown_template_is_a_clear_error(service: Service) -> None:
    with pytest.raises(SandboxException, match="available: base"):
        await sdk(Sandbox.create, "no-such-template")


async def test_python_sdk_template_exists_by_name_and_alias(service: Service) -> None:
    assert await sdk(Template.exists, "base") is True
    assert await sdk(Template.exists, "no-such-template") is False


async def test_python_sdk_list_filters_and_pages(service: Service) -> None:
    team_a = [
        await sdk(Sandbox.create, "base", metadata={"team": "a/b c%", "i": str(i)})
        for i in range(3)
    ]
    other = await sdk(Sandbox.create, "base", metadata={"team": "z"})
    await sdk(team_a[0].pause)

    def all_pages(query: SandboxQuery, limit: int) -> tuple[list[str], int]:
        paginator = Sandbox.list(query=query, limit=limit)
        ids: list[str] = []
        pages = 0
        while paginator.has_next:
            ids += [s.sandbox_id for s in paginator.next_items()]
            pages += 1
        return ids, pages

    ids, pages = await sdk(all_pages, SandboxQuery(metadata={"team": "a/b c%"}), 2)
    assert sorted(ids) == sorted(s.sandbox_id for s in team_a)
    assert pages == 2
    running = SandboxQuery(metadata={"team": "a/b c%"}, state=[SandboxState.RUNNING])
    ids, _ = await sdk(all_pages, running, 10)
    assert sorted(ids) == sorted(s.sandbox_id for s in team_a[1:])
    paused = SandboxQuery(state=[SandboxState.PAUSED])
    ids, _ = await sdk(all_pages, paused, 10)
    assert ids == [team_a[0].sandbox_id]
    ids, _ = await sdk(all_pages, SandboxQuery(), 100)
    assert other.sandbox_id in ids
    assert len(ids) == 4


async def test_python_sdk_pause_then_connect(service: Service) -> None:
    sbx = await sdk(Sandbox.create, "base")
    assert await sdk(sbx.pause) is True
    assert await sdk(sbx.pause) is False  # already paused: 409
    assert service.backends.runtime.jails[sbx.sandbox_id].frozen
    assert (await sdk(sbx.get_info)).state == SandboxState.PAUSED
    again = await sdk(Sandbox.connect, sbx.sandbox_id, timeout=60)
    assert again.sandbox_id == sbx.sandbox_id
    assert not service.backends.runtime.jails[sbx.sandbox_id].frozen
    assert (await sdk(again.get_info)).state == SandboxState.RUNNING
    await sdk(again.connect)  # running: only extends


async def test_python_sdk_snapshots_and_fork(service: Service) -> None:
    sbx = await sdk(Sandbox.create, "base", metadata={"role": "parent"})
    snapshot = await sdk(sbx.create_snapshot, "my-snap")
    assert snapshot.names == ["my-snap"]
    child = await sdk(Sandbox.create, snapshot.snapshot_id)
    assert (await sdk(child.get_info)).template_id == snapshot.snapshot_id

    def list_all(sandbox_id: str | None) -> list[str]:
        paginator = Sandbox.list_snapshots(sandbox_id=sandbox_id)
        found: list[str] = []
        while paginator.has_next:
            found += [s.snapshot_id for s in paginator.next_items()]
        return found

    assert await sdk(list_all, sbx.sandbox_id) == [snapshot.snapshot_id]
    await sdk(child.kill)
    assert await sdk(Sandbox.delete_snapshot, snapshot.snapshot_id) is True
    assert await sdk(Sandbox.delete_snapshot, snapshot.snapshot_id) is False
    assert await sdk(list_all, None) == []

    forks = await sdk(sbx.fork, count=2, timeout=60)
    assert len(forks) == 2
    for fork in forks:
        assert isinstance(fork, Sandbox)
        info = await sdk(fork.get_info)
        assert info.metadata == {"role": "parent"}
        assert fork.sandbox_id != sbx.sandbox_id


async def test_snapshot_in_use_is_not_deleted(service: Service) -> None:
    sbx = await sdk(Sandbox.create, "base")
    snapshot = await sdk(sbx.create_snapshot)
    child = await sdk(Sandbox.create, snapshot.snapshot_id)
    with pytest.raises(SandboxException, match="used by 1"):
        await sdk(Sandbox.delete_snapshot, snapshot.snapshot_id)
    await sdk(child.kill)


NODE_SCRIPT = NODE_DIR / "api_lifecycle.mjs"


async def test_node_sdk_create_list_kill(service: Service) -> None:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_SCRIPT),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["domain"] == DOMAIN
    assert result["listed"] is True
    assert result["killed"] is True
    assert result["killedAgain"] is False
    assert service.backends.storage.sandboxes == {}


async def test_python_sdk_lists_sandboxes_started_at_or_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start time that the API's microsecond `startedAt` rounds up: the SDK's own
    # `started_after=info.started_at` must still find the sandbox.
    backends = Backends(tmp_path)
    async with backends.manager(clock=lambda: 1_800_000_000.0000007) as manager:
        runner = await start_api(build_app(manager, [KEY], DOMAIN), "127.0.0.1", 0)
        monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{bound_port(runner)}")
        monkeypatch.setenv("E2B_API_KEY", KEY)
        try:
            sbx = await sdk(Sandbox.create, "base", timeout=120)
            info = await sdk(sbx.get_info)

            def listed(query: SandboxQuery) -> list[str]:
                return [s.sandbox_id for s in Sandbox.list(query=query).next_items()]

            at = SandboxQuery(started_after=info.started_at)
            assert await sdk(listed, at) == [sbx.sandbox_id]
            later = SandboxQuery(started_after=info.started_at + timedelta(milliseconds=1))
            assert await sdk(listed, later) == []
        finally:
            await runner.cleanup()
