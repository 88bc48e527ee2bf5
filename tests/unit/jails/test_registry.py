"""The SQLite registry on its own: records, paging with ties, tokens, snapshots, the event log."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from coppice_jails import registry as registry_module
from coppice_jails.registry import (
    InvalidPageToken,
    Registry,
    SandboxQuery,
    SandboxRecord,
    SnapshotRecord,
)

RECORD = SandboxRecord(
    id="a" * 20,
    template="base",
    alias=None,
    storage_ref="/nowhere",
    jail_handle="h",
    state="running",
    started_at=100.0,
    end_at=400.0,
    metadata={"k": "v"},
    env_vars={"A": "1"},
    access_token=None,
    secure=False,
    auto_pause=False,
    allow_internet_access=None,
    client_id="6532622b",
    memory_bytes=None,
    cpu_millicores=2000,
    pids=512,
    cpu_count=2,
    memory_mb=512,
    disk_size_mb=1024,
)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    opened = await Registry.open(tmp_path)
    yield opened
    await opened.close()


async def test_round_trip_update_delete(registry: Registry) -> None:
    await registry.insert_sandbox(RECORD)
    assert await registry.get_sandbox(RECORD.id) == RECORD
    assert await registry.update_sandbox(RECORD.id, state="paused", end_at=500.0)
    assert await registry.get_sandbox(RECORD.id) == replace(RECORD, state="paused", end_at=500.0)
    assert not await registry.update_sandbox("missing", state="paused")
    with pytest.raises(sqlite3.IntegrityError):
        await registry.insert_sandbox(RECORD)
    assert await registry.delete_sandbox(RECORD.id)
    assert not await registry.delete_sandbox(RECORD.id)
    assert await registry.get_sandbox(RECORD.id) is None


async def test_paging_is_stable_with_equal_start_times(registry: Registry) -> None:
    ids = [f"{i:020d}" for i in range(7)]
    for sandbox_id in ids:
        await registry.insert_sandbox(replace(RECORD, id=sandbox_id))  # all start at 100.0
    for order in ("asc", "desc"):
        seen: list[str] = []
        token = None
        while True:
            page = await registry.list_sandboxes(
                SandboxQuery(order=order, limit=3, next_token=token)
            )
            seen += [r.id for r in page.items]
            token = page.next_token
            if token is None:
                break
        assert seen == (ids if order == "asc" else ids[::-1])
    for bad in ("!!", "bm90IGpzb24", "WzEsMl0"):  # not base64, not JSON, wrong types
        with pytest.raises(InvalidPageToken):
            await registry.list_sandboxes(SandboxQuery(next_token=bad))


async def test_due_and_next_end(registry: Registry) -> None:
    await registry.insert_sandbox(replace(RECORD, id="a" * 20, end_at=10.0))
    await registry.insert_sandbox(replace(RECORD, id="b" * 20, end_at=20.0))
    await registry.insert_sandbox(replace(RECORD, id="c" * 20, end_at=5.0, state="paused"))
    assert [r.id for r in await registry.due_sandboxes(15.0)] == ["a" * 20]
    assert await registry.next_end() == 10.0
    assert await registry.count_running() == 2


async def test_snapshots_by_id_or_name(registry: Registry) -> None:
    snapshot = SnapshotRecord("snap-1", ("team/x:v1",), "a" * 20, "base", 1.0)
    await registry.insert_snapshot(snapshot)
    assert await registry.find_snapshot("snap-1") == snapshot
    assert await registry.find_snapshot("team/x:v1") == snapshot
    assert await registry.find_snapshot("team/x") is None
    assert (await registry.list_snapshots(name="team/x:v1")).items == [snapshot]
    assert (await registry.list_snapshots(source_sandbox="b" * 20)).items == []
    assert await registry.delete_snapshot("snap-1")
    assert await registry.find_snapshot("snap-1") is None


async def test_event_log_keeps_the_newest(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "EVENTS_KEPT_PER_SANDBOX", 3)
    for i in range(5):
        await registry.append_event("a" * 20, "info", f"event {i}", {"i": str(i)}, ts=float(i))
        await registry.append_event("b" * 20, "warn", f"other {i}")
    events = await registry.events("a" * 20)
    assert [e.message for e in events] == ["event 2", "event 3", "event 4"]
    assert events[0].fields == {"i": "2"}
    assert len(await registry.events("b" * 20)) == 3
    newest = await registry.events("a" * 20, newest_first=True, limit=1)
    assert [e.message for e in newest] == ["event 4"]
    assert [e.message for e in await registry.events("a" * 20, since=3.0)] == [
        "event 3",
        "event 4",
    ]


async def test_two_connections_share_the_file_in_wal_mode(tmp_path: Path) -> None:
    first = await Registry.open(tmp_path)
    second = await Registry.open(tmp_path)
    try:
        await first.insert_sandbox(RECORD)
        assert await second.get_sandbox(RECORD.id) == RECORD

        def journal_mode() -> str:
            with sqlite3.connect(first.path) as db:
                return str(db.execute("PRAGMA journal_mode").fetchone()[0])

        assert await asyncio.to_thread(journal_mode) == "wal"
    finally:
        await first.close()
        await second.close()


async def test_traffic_token_round_trips_and_old_databases_gain_its_column(
    tmp_path: Path,
) -> None:
    # A database made before the column existed: opening it adds the column, rows keep NULL.
    old_schema = registry_module._SCHEMA.replace(",\n    traffic_access_token TEXT", "")
    assert old_schema != registry_module._SCHEMA
    db = sqlite3.connect(tmp_path / Registry.FILENAME)
    db.executescript(old_schema)
    columns = registry_module._SANDBOX_COLUMNS.replace(", traffic_access_token", "")
    db.execute(
        f"INSERT INTO sandboxes ({columns}) VALUES ({', '.join('?' * 21)})",
        ("old", "base", None, "/x", "h", "running", 1.0, 2.0, "{}", "{}", None, 0, 0, None,
         "c", None, None, None, 1, 1, 1),
    )  # fmt: skip
    db.commit()
    db.close()
    registry = await Registry.open(tmp_path)
    try:
        old = await registry.get_sandbox("old")
        assert old is not None
        assert old.traffic_access_token is None
        locked = replace(RECORD, traffic_access_token="t" * 64)
        await registry.insert_sandbox(locked)
        assert await registry.get_sandbox(RECORD.id) == locked
    finally:
        await registry.close()
    reopened = await Registry.open(tmp_path)  # twice is fine
    await reopened.close()
