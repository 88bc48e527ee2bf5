"""SandboxManager over the real SQLite registry and in-memory fake backends."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from coppice_jails.manager import (
    Conflict,
    CreateSpec,
    InvalidArgument,
    LiveSandbox,
    NotFound,
    OperationFailed,
    SandboxManager,
    TemplateNotFound,
)
from coppice_jails.registry import Registry, SandboxQuery, SandboxRecord
from coppice_jails.testing import Backends


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backends(tmp_path: Path) -> Backends:
    return Backends(tmp_path)


def assert_nothing_left(backends: Backends) -> None:
    assert backends.storage.sandboxes == {}
    assert backends.runtime.jails == {}
    assert backends.runtime.leftovers == set()


async def test_create_returns_a_dns_safe_id_and_records_it(backends: Backends) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="default", metadata={"k": "v"}))
        assert re.fullmatch(r"[a-z0-9]{20,}", record.id)
        assert record.template == "base"
        assert record.alias == "default"
        assert record.state == "running"
        assert record.end_at - record.started_at == 300
        assert record.access_token is None
        assert await manager.get(record.id) == record
        assert record.id in backends.storage.sandboxes
        live = manager.get_live(record.id)
        assert live is not None
        assert live.jail is backends.runtime.jails[record.id]
        assert live.template.env == {"LANG": "C.UTF-8"}
        assert manager.most_recent_live() == live


async def test_secure_sandboxes_get_an_access_token(backends: Backends) -> None:
    async with backends.manager() as manager:
        a = await manager.create(CreateSpec(template="base", secure=True))
        b = await manager.create(CreateSpec(template="base", secure=True))
        assert a.access_token
        assert b.access_token
        assert a.access_token != b.access_token


async def test_unknown_template_names_the_available_ones(backends: Backends) -> None:
    async with backends.manager() as manager:
        with pytest.raises(TemplateNotFound, match="base, code-interpreter-v1"):
            await manager.create(CreateSpec(template="nope"))
    assert_nothing_left(backends)


@pytest.mark.parametrize("seconds", [0, -5, 10**9])
async def test_bad_timeout_is_refused(backends: Backends, seconds: int) -> None:
    async with backends.manager() as manager:
        with pytest.raises(InvalidArgument, match="Timeout"):
            await manager.create(CreateSpec(template="base", timeout=seconds))
    assert_nothing_left(backends)


async def test_clone_failure_rolls_back(backends: Backends) -> None:
    backends.storage.fail_clone = True
    async with backends.manager() as manager:
        with pytest.raises(OperationFailed, match="clone failed"):
            await manager.create(CreateSpec(template="base"))
        assert (await manager.list_sandboxes(SandboxQuery())).items == []
    assert_nothing_left(backends)


async def test_jail_start_failure_rolls_back(backends: Backends) -> None:
    backends.runtime.fail_start = True
    async with backends.manager() as manager:
        with pytest.raises(OperationFailed, match="jail start failed"):
            await manager.create(CreateSpec(template="base"))
        assert (await manager.list_sandboxes(SandboxQuery())).items == []
    assert_nothing_left(backends)


class FailingInsertRegistry(Registry):
    async def insert_sandbox(self, record: SandboxRecord) -> None:
        raise RuntimeError("disk full")


async def test_record_commit_failure_rolls_back(backends: Backends, tmp_path: Path) -> None:
    registry = FailingInsertRegistry(tmp_path / "reg.sqlite3")
    await registry._run(registry._connect)
    manager = SandboxManager(registry, backends.storage, backends.runtime, backends.templates)
    try:
        with pytest.raises(OperationFailed, match="disk full"):
            await manager.create(CreateSpec(template="base"))
        assert manager.most_recent_live() is None
    finally:
        await registry.close()
    assert_nothing_left(backends)


async def test_cancelled_create_rolls_back(backends: Backends) -> None:
    gate = asyncio.Event()
    original = backends.runtime.start

    async def slow_start(*args: object) -> object:
        gate.set()
        await asyncio.Event().wait()
        return await original(*args)  # type: ignore[arg-type]

    backends.runtime.start = slow_start  # type: ignore[method-assign,assignment]
    async with backends.manager() as manager:
        task = asyncio.create_task(manager.create(CreateSpec(template="base")))
        await gate.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert_nothing_left(backends)


async def test_kill_removes_jail_storage_and_record(backends: Backends) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        await manager.kill(record.id)
        with pytest.raises(NotFound):
            await manager.get(record.id)
        with pytest.raises(NotFound):
            await manager.kill(record.id)
        assert manager.get_live(record.id) is None
    assert_nothing_left(backends)


async def test_pause_freezes_and_connect_resumes(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        record = await manager.create(CreateSpec(template="base", timeout=60))
        jail = backends.runtime.jails[record.id]
        paused = await manager.pause(record.id)
        assert paused.state == "paused"
        assert jail.frozen
        assert manager.get_live(record.id) is None
        with pytest.raises(Conflict, match="already paused"):
            await manager.pause(record.id)
        clock.now += 1000
        result = await manager.connect(record.id, 120)
        assert result.resumed
        assert not jail.frozen
        assert result.record.state == "running"
        assert result.record.end_at == clock.now + 120
        assert manager.get_live(record.id) is not None


async def test_connect_to_a_running_sandbox_only_extends(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        record = await manager.create(CreateSpec(template="base", timeout=600))
        shorter = await manager.connect(record.id, 10)
        assert not shorter.resumed
        assert shorter.record.end_at == record.end_at
        longer = await manager.connect(record.id, 6000)
        assert longer.record.end_at == clock.now + 6000


async def test_resume_of_a_running_sandbox_conflicts(backends: Backends) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        with pytest.raises(Conflict, match="already running"):
            await manager.resume(record.id, 60)
        await manager.pause(record.id)
        assert (await manager.resume(record.id, 60)).state == "running"


async def test_set_timeout_overwrites_and_refresh_only_extends(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        record = await manager.create(CreateSpec(template="base", timeout=600))
        assert (await manager.set_timeout(record.id, 5)).end_at == clock.now + 5
        assert (await manager.refresh(record.id, 1)).end_at == clock.now + 5
        assert (await manager.refresh(record.id, 50)).end_at == clock.now + 50
        with pytest.raises(InvalidArgument):
            await manager.set_timeout(record.id, -1)
        with pytest.raises(NotFound):
            await manager.set_timeout("nosuchsandbox", 5)


async def test_reaper_kills_at_end_time_and_pauses_auto_pause(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        short = await manager.create(CreateSpec(template="base", timeout=10))
        long = await manager.create(CreateSpec(template="base", timeout=1000))
        pausing = await manager.create(CreateSpec(template="base", timeout=10, auto_pause=True))
        assert await manager.reap_due() == []
        clock.now += 11
        assert sorted(await manager.reap_due()) == sorted([short.id, pausing.id])
        with pytest.raises(NotFound):
            await manager.get(short.id)
        assert short.id not in backends.storage.sandboxes
        assert (await manager.get(long.id)).state == "running"
        assert (await manager.get(pausing.id)).state == "paused"
        assert backends.runtime.jails[pausing.id].frozen


async def test_reaper_task_runs_on_its_own(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        record = await manager.create(CreateSpec(template="base", timeout=5))
        clock.now += 6
        killed = asyncio.Event()
        original_destroy = backends.storage.destroy

        async def destroy(sandbox_id: str) -> None:
            await original_destroy(sandbox_id)
            killed.set()

        backends.storage.destroy = destroy  # type: ignore[method-assign]
        await manager.set_timeout(record.id, 0)  # wakes the reaper
        await killed.wait()
        with pytest.raises(NotFound):
            await manager.get(record.id)


async def test_restart_keeps_live_sandboxes(backends: Backends) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
    async with backends.manager() as manager:
        live = manager.get_live(record.id)
        assert live is not None
        assert live.jail is backends.runtime.jails[record.id]
        assert backends.runtime.started == 1


async def test_reconcile_restarts_dead_jails_and_destroys_orphans(backends: Backends) -> None:
    async with backends.manager() as manager:
        running = await manager.create(CreateSpec(template="base"))
        paused = await manager.create(CreateSpec(template="base"))
        await manager.pause(paused.id)
    backends.runtime.kill_all()
    backends.storage.sandboxes["orphanclone000000000"] = "base"
    backends.runtime.leftovers.add("orphanjail0000000000")
    async with backends.manager() as manager:
        assert "orphanclone000000000" not in backends.storage.sandboxes
        assert "orphanjail0000000000" not in backends.runtime.leftovers
        live = manager.get_live(running.id)
        assert live is not None
        assert live.jail.is_alive()
        assert (await manager.get(running.id)).jail_handle == live.jail.handle
        # A paused sandbox whose jail died is kept as its filesystem and restarts on connect.
        assert (await manager.get(paused.id)).state == "paused"
        assert paused.id in backends.storage.sandboxes
        assert (await manager.connect(paused.id, 60)).resumed
        assert manager.get_live(paused.id) is not None
        events = [e.message for e in await manager.logs(running.id)]
        assert "jail was dead after a restart; started a new one" in events


async def test_reconcile_keeps_a_record_whose_jail_cannot_restart(backends: Backends) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
    backends.runtime.kill_all()
    backends.runtime.fail_start = True
    async with backends.manager() as manager:
        kept = await manager.get(record.id)
        assert kept.state == "paused"
        assert any(e.level == "error" for e in await manager.logs(record.id))


async def test_list_pages_and_filters(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock) as manager:
        made = []
        for i in range(5):
            clock.now += 1
            meta = {"team": "a" if i % 2 == 0 else "b", "n": str(i), "odd key=&": "v w%"}
            made.append(await manager.create(CreateSpec(template="base", metadata=meta)))
        await manager.pause(made[0].id)

        seen: list[str] = []
        token = None
        while True:
            page = await manager.list_sandboxes(SandboxQuery(limit=2, next_token=token))
            assert len(page.items) <= 2
            seen += [r.id for r in page.items]
            token = page.next_token
            if token is None:
                break
        assert seen == [r.id for r in reversed(made)]

        asc = await manager.list_sandboxes(SandboxQuery(order="asc", limit=100))
        assert [r.id for r in asc.items] == [r.id for r in made]
        team_a = await manager.list_sandboxes(SandboxQuery(metadata={"team": "a"}))
        assert {r.id for r in team_a.items} == {made[0].id, made[2].id, made[4].id}
        both = await manager.list_sandboxes(SandboxQuery(metadata={"team": "a", "n": "2"}))
        assert [r.id for r in both.items] == [made[2].id]
        odd = await manager.list_sandboxes(SandboxQuery(metadata={"odd key=&": "v w%"}))
        assert len(odd.items) == 5
        running_a = await manager.list_sandboxes(
            SandboxQuery(metadata={"team": "a"}, states=("running",))
        )
        assert {r.id for r in running_a.items} == {made[2].id, made[4].id}
        paused = await manager.list_sandboxes(SandboxQuery(states=("paused",)))
        assert [r.id for r in paused.items] == [made[0].id]


async def test_snapshot_create_from_it_and_delete(backends: Backends) -> None:
    async with backends.manager() as manager:
        source = await manager.create(CreateSpec(template="base"))
        snap = await manager.snapshot(source.id, "my-snap")
        assert snap.snapshot_id.startswith("snap-")
        assert snap.names == ("my-snap",)
        assert snap.snapshot_id in backends.storage.templates
        assert not backends.runtime.jails[source.id].frozen
        with pytest.raises(Conflict):
            await manager.snapshot(source.id, "my-snap")

        child = await manager.create(CreateSpec(template="my-snap"))
        assert child.template == snap.snapshot_id
        live = manager.get_live(child.id)
        assert live is not None
        assert live.template.env == {"LANG": "C.UTF-8"}
        page = await manager.list_snapshots(sandbox_id=source.id)
        assert [s.snapshot_id for s in page.items] == [snap.snapshot_id]

        with pytest.raises(Conflict, match="used by 1"):
            await manager.delete_template(snap.snapshot_id)
        await manager.kill(child.id)
        await manager.delete_template(snap.snapshot_id)
        assert snap.snapshot_id not in backends.storage.templates
        assert (await manager.list_snapshots()).items == []
        with pytest.raises(NotFound):
            await manager.delete_template(snap.snapshot_id)


async def test_failed_snapshot_leaves_no_template_and_thaws(backends: Backends) -> None:
    backends.storage.fail_snapshot = True
    async with backends.manager() as manager:
        source = await manager.create(CreateSpec(template="base"))
        with pytest.raises(OperationFailed):
            await manager.snapshot(source.id)
        assert backends.storage.templates == {"base", "code-interpreter-v1"}
        assert not backends.runtime.jails[source.id].frozen
        assert (await manager.list_snapshots()).items == []


async def test_fork_copies_state_and_cleans_its_template(backends: Backends) -> None:
    async with backends.manager() as manager:
        parent = await manager.create(
            CreateSpec(template="base", metadata={"k": "v"}, env_vars={"A": "1"})
        )
        forks = await manager.fork(parent.id, 3, 60)
        assert len(forks) == 3
        records = [f for f in forks if isinstance(f, SandboxRecord)]
        assert len(records) == 3
        assert len({r.id for r in records}) == 3
        fork_template = records[0].template
        assert fork_template.startswith("fork-")
        assert fork_template in backends.storage.templates
        assert all(r.metadata == {"k": "v"} and r.env_vars == {"A": "1"} for r in records)
        assert all(backends.storage.sandboxes[r.id] == fork_template for r in records)
        assert (await manager.list_snapshots()).items == []  # internal, not listed
        for r in records:
            await manager.kill(r.id)
        assert fork_template not in backends.storage.templates


async def test_fork_reports_each_failure(backends: Backends) -> None:
    async with backends.manager() as manager:
        parent = await manager.create(CreateSpec(template="base"))
        backends.runtime.fail_start = True
        forks = await manager.fork(parent.id, 2, 60)
        assert all(isinstance(f, OperationFailed) for f in forks)
        assert set(backends.storage.sandboxes) == {parent.id}
        assert backends.storage.templates == {"base", "code-interpreter-v1"}


async def test_metrics_come_from_jail_stats(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock, metrics_interval=3600) as manager:
        record = await manager.create(CreateSpec(template="base"))
        clock.now += 10
        backends.runtime.jails[record.id].cpu_usage_usec = 2_000_000  # 2 s of 2 cpus in 10 s
        [metrics] = await manager.metrics(record.id)  # never sampled yet: sampled now
        assert metrics.cpu_used_pct == 10.0
        assert metrics.mem_used == 10 * 1024 * 1024
        assert metrics.disk_used == 4096
        await manager.pause(record.id)
        clock.now += 10
        assert await manager.metrics(record.id) == [metrics]  # history stays, no new samples
        assert await manager.latest_metrics(record.id) == metrics


async def test_metrics_are_a_series_over_the_sandbox_s_life(backends: Backends) -> None:
    clock = Clock()
    async with backends.manager(clock=clock, metrics_interval=0.01) as manager:
        created_at = clock.now
        record = await manager.create(CreateSpec(template="base"))
        for _ in range(3):
            clock.now += 5
            for _ in range(500):
                series = await manager.metrics(record.id)
                if series and series[-1].timestamp == clock.now:
                    break
                await asyncio.sleep(0.01)
        series = await manager.metrics(record.id)
        stamps = [m.timestamp for m in series]
        assert stamps == sorted(stamps)
        assert {created_at + 5, created_at + 10, created_at + 15} <= set(stamps)
        window = await manager.metrics(record.id, created_at + 5, created_at + 10)
        assert {m.timestamp for m in window} <= {created_at + 5, created_at + 10}
        assert await manager.metrics(record.id, created_at - 3600, created_at - 1800) == []
        await manager.kill(record.id)
        with pytest.raises(NotFound):
            await manager.metrics(record.id)


async def test_registry_is_usable_from_another_process(backends: Backends, tmp_path: Path) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        script = (
            "import sqlite3,sys; db=sqlite3.connect(sys.argv[1]);"
            "print(db.execute('select id from sandboxes').fetchone()[0])"
        )
        proc = await asyncio.create_subprocess_exec(
            "python3",
            "-c",
            script,
            str(manager.registry.path),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert out.decode().strip() == record.id


class Recorder:
    """A SandboxObserver that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    async def sandbox_started(self, live: LiveSandbox) -> None:
        assert live.jail.is_alive()
        self.events.append(("started", live.record.id))

    async def sandbox_ending(self, sandbox_id: str) -> None:
        self.events.append(("ending", sandbox_id))

    async def sandbox_stopped(self, sandbox_id: str) -> None:
        self.events.append(("stopped", sandbox_id))


async def test_observers_hear_of_new_jails_and_ended_sandboxes(backends: Backends) -> None:
    clock = Clock()
    recorder = Recorder()
    registry = await Registry.open(backends.data_dir)
    manager = SandboxManager(
        registry, backends.storage, backends.runtime, backends.templates, clock=clock
    )
    manager.add_observer(recorder)
    await manager.start()
    try:
        a = await manager.create(CreateSpec(template="base"))
        b = await manager.create(CreateSpec(template="base", timeout=10))
        await manager.pause(a.id)
        await manager.connect(a.id, 60)  # thawed, same jail: nothing new to tell
        assert recorder.events == [("started", a.id), ("started", b.id)]
        await manager.kill(a.id)
        clock.now += 11
        assert await manager.reap_due() == [b.id]
        assert recorder.events[2:] == [
            ("ending", a.id), ("stopped", a.id), ("ending", b.id), ("stopped", b.id)
        ]  # fmt: skip
        c = await manager.create(CreateSpec(template="base"))
        paused = await manager.create(CreateSpec(template="base"))
        await manager.pause(paused.id)
    finally:
        await manager.close()
    # A restarted service tells its observers of every running sandbox it finds again.
    restarted = SandboxManager(registry, backends.storage, backends.runtime, backends.templates)
    again = Recorder()
    restarted.add_observer(again)
    await restarted.start()
    try:
        assert again.events == [("started", c.id)]
    finally:
        await restarted.close()
        await registry.close()


async def _registry_down(sandbox_id: str, **fields: object) -> None:
    raise RuntimeError("registry down")


async def test_pause_that_cannot_be_recorded_thaws_the_jail(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        monkeypatch.setattr(manager.registry, "update_sandbox", _registry_down)
        with pytest.raises(OperationFailed, match=r"Pausing sandbox .* registry down"):
            await manager.pause(record.id)
        assert not backends.runtime.jails[record.id].frozen
        assert (await manager.get(record.id)).state == "running"


async def test_resume_that_cannot_be_recorded_freezes_the_jail_again(
    backends: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with backends.manager() as manager:
        record = await manager.create(CreateSpec(template="base"))
        await manager.pause(record.id)
        monkeypatch.setattr(manager.registry, "update_sandbox", _registry_down)
        with pytest.raises(OperationFailed, match=r"Resuming sandbox .* registry down"):
            await manager.resume(record.id, 60)
        assert backends.runtime.jails[record.id].frozen
        assert manager.get_live(record.id) is None
