"""The sandbox registry: SQLite records of sandboxes, snapshots and their event log.

One database file (WAL, so other processes such as the CLI can read while `serve` writes) in the
data dir. Every statement runs on one dedicated thread, never on the event loop; calls are short.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

SandboxState = Literal["running", "paused"]
Order = Literal["asc", "desc"]
LogLevel = Literal["debug", "info", "warn", "error"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    alias TEXT,
    storage_ref TEXT NOT NULL,
    jail_handle TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'paused')),
    started_at REAL NOT NULL,
    end_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    env_vars TEXT NOT NULL,
    access_token TEXT,
    secure INTEGER NOT NULL,
    auto_pause INTEGER NOT NULL,
    allow_internet_access INTEGER,
    client_id TEXT NOT NULL,
    memory_bytes INTEGER,
    cpu_millicores INTEGER,
    pids INTEGER,
    cpu_count INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_size_mb INTEGER NOT NULL,
    traffic_access_token TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_by_start ON sandboxes (started_at, id);
CREATE TABLE IF NOT EXISTS snapshots (
    snapshot_id TEXT PRIMARY KEY,
    names TEXT NOT NULL,
    source_sandbox TEXT NOT NULL,
    source_template TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_created ON snapshots (created_at, snapshot_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_sandbox ON events (sandbox_id, seq);
"""

# Columns added since the first schema: (table, column, its definition), added to an older
# database when it is opened (SQLite's ADD COLUMN; the new column is NULL in existing rows).
_ADDED_COLUMNS = (("sandboxes", "traffic_access_token", "TEXT"),)

# The event log is a short history, not an archive: older entries of a sandbox are dropped.
EVENTS_KEPT_PER_SANDBOX = 1000


class InvalidPageToken(ValueError):
    pass


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    template: str  # the template (or snapshot) name the root was cloned from
    alias: str | None  # the name the client asked for when it differs (e.g. `default`)
    storage_ref: str  # host path of the sandbox root, as storage.clone returned it
    jail_handle: str
    state: SandboxState
    started_at: float  # unix seconds
    end_at: float
    metadata: Mapping[str, str]
    env_vars: Mapping[str, str]
    access_token: str | None
    secure: bool
    auto_pause: bool
    allow_internet_access: bool | None
    client_id: str
    memory_bytes: int | None
    cpu_millicores: int | None
    pids: int | None
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    # Created without public traffic: what the sandbox's ports (all but envd's) require.
    traffic_access_token: str | None = None


@dataclass(frozen=True)
class SnapshotRecord:
    snapshot_id: str  # also the template name its sandboxes are cloned from
    names: tuple[str, ...]
    source_sandbox: str
    source_template: str
    created_at: float


@dataclass(frozen=True)
class EventRecord:
    seq: int
    sandbox_id: str
    ts: float
    level: LogLevel
    message: str
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SandboxQuery:
    metadata: Mapping[str, str] = field(default_factory=dict)
    states: Sequence[SandboxState] = ("running", "paused")
    template: str | None = None
    started_after: float | None = None
    order: Order = "desc"
    limit: int = 100
    next_token: str | None = None


@dataclass(frozen=True)
class Page:
    items: list[SandboxRecord]
    next_token: str | None


@dataclass(frozen=True)
class SnapshotPage:
    items: list[SnapshotRecord]
    next_token: str | None


def _encode_token(started: float, key: str) -> str:
    raw = json.dumps([started, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        started, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as e:
        raise InvalidPageToken("Invalid next token") from e
    if not isinstance(started, int | float) or not isinstance(key, str):
        raise InvalidPageToken("Invalid next token")
    return float(started), key


_SANDBOX_COLUMNS = (
    "id, template, alias, storage_ref, jail_handle, state, started_at, end_at, metadata, "
    "env_vars, access_token, secure, auto_pause, allow_internet_access, client_id, "
    "memory_bytes, cpu_millicores, pids, cpu_count, memory_mb, disk_size_mb, traffic_access_token"
)


def _sandbox_from_row(row: sqlite3.Row) -> SandboxRecord:
    allow = row["allow_internet_access"]
    return SandboxRecord(
        id=row["id"],
        template=row["template"],
        alias=row["alias"],
        storage_ref=row["storage_ref"],
        jail_handle=row["jail_handle"],
        state=row["state"],
        started_at=row["started_at"],
        end_at=row["end_at"],
        metadata=json.loads(row["metadata"]),
        env_vars=json.loads(row["env_vars"]),
        access_token=row["access_token"],
        secure=bool(row["secure"]),
        auto_pause=bool(row["auto_pause"]),
        allow_internet_access=None if allow is None else bool(allow),
        client_id=row["client_id"],
        memory_bytes=row["memory_bytes"],
        cpu_millicores=row["cpu_millicores"],
        pids=row["pids"],
        cpu_count=row["cpu_count"],
        memory_mb=row["memory_mb"],
        disk_size_mb=row["disk_size_mb"],
        traffic_access_token=row["traffic_access_token"],
    )


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a database made by an older Coppice up to `_SCHEMA` (its tables exist already)."""
    for table, column, definition in _ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _snapshot_from_row(row: sqlite3.Row) -> SnapshotRecord:
    return SnapshotRecord(
        snapshot_id=row["snapshot_id"],
        names=tuple(json.loads(row["names"])),
        source_sandbox=row["source_sandbox"],
        source_template=row["source_template"],
        created_at=row["created_at"],
    )


class Registry:
    """Async access to the registry database; open with `await Registry.open(data_dir)`."""

    FILENAME = "registry.sqlite3"

    def __init__(self, path: Path) -> None:
        self.path = path
        # One thread owns the connection: statements are serialized and never block the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, data_dir: Path) -> Registry:
        registry = cls(data_dir / cls.FILENAME)
        await registry._run(registry._connect)
        return registry

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        _add_missing_columns(db)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("registry is closed")
        return self._db

    # Sandboxes -------------------------------------------------------------------------------
    async def insert_sandbox(self, record: SandboxRecord) -> None:
        values = (
            record.id,
            record.template,
            record.alias,
            record.storage_ref,
            record.jail_handle,
            record.state,
            record.started_at,
            record.end_at,
            json.dumps(dict(record.metadata)),
            json.dumps(dict(record.env_vars)),
            record.access_token,
            int(record.secure),
            int(record.auto_pause),
            None if record.allow_internet_access is None else int(record.allow_internet_access),
            record.client_id,
            record.memory_bytes,
            record.cpu_millicores,
            record.pids,
            record.cpu_count,
            record.memory_mb,
            record.disk_size_mb,
            record.traffic_access_token,
        )
        placeholders = ", ".join("?" * len(values))
        sql = f"INSERT INTO sandboxes ({_SANDBOX_COLUMNS}) VALUES ({placeholders})"
        await self._run(lambda: self._conn.execute(sql, values))

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        sql = f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes WHERE id = ?"

        def query() -> SandboxRecord | None:
            row = self._conn.execute(sql, (sandbox_id,)).fetchone()
            return None if row is None else _sandbox_from_row(row)

        return await self._run(query)

    async def all_sandboxes(self) -> list[SandboxRecord]:
        sql = f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes ORDER BY started_at, id"
        return await self._run(
            lambda: [_sandbox_from_row(r) for r in self._conn.execute(sql).fetchall()]
        )

    async def update_sandbox(
        self,
        sandbox_id: str,
        *,
        state: SandboxState | None = None,
        end_at: float | None = None,
        jail_handle: str | None = None,
    ) -> bool:
        """Change some fields of a record; False if there is no such record."""
        changes: dict[str, object] = {}
        if state is not None:
            changes["state"] = state
        if end_at is not None:
            changes["end_at"] = end_at
        if jail_handle is not None:
            changes["jail_handle"] = jail_handle
        if not changes:
            return await self.get_sandbox(sandbox_id) is not None
        assignments = ", ".join(f"{column} = ?" for column in changes)
        sql = f"UPDATE sandboxes SET {assignments} WHERE id = ?"
        params = (*changes.values(), sandbox_id)
        cursor = await self._run(lambda: self._conn.execute(sql, params))
        return cursor.rowcount > 0

    async def delete_sandbox(self, sandbox_id: str) -> bool:
        def delete() -> bool:
            with self._conn:
                self._conn.execute("BEGIN")
                cursor = self._conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
                self._conn.execute("DELETE FROM events WHERE sandbox_id = ?", (sandbox_id,))
            return cursor.rowcount > 0

        return await self._run(delete)

    async def due_sandboxes(self, now: float) -> list[SandboxRecord]:
        """Running sandboxes whose end time has passed."""
        sql = (
            f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes "
            "WHERE state = 'running' AND end_at <= ? ORDER BY end_at"
        )
        return await self._run(
            lambda: [_sandbox_from_row(r) for r in self._conn.execute(sql, (now,)).fetchall()]
        )

    async def next_end(self) -> float | None:
        """The earliest end time of a running sandbox (when the reaper must wake up next)."""
        sql = "SELECT MIN(end_at) FROM sandboxes WHERE state = 'running'"
        value = await self._run(lambda: self._conn.execute(sql).fetchone()[0])
        return None if value is None else float(value)

    async def count_using_template(self, template: str) -> int:
        sql = "SELECT COUNT(*) FROM sandboxes WHERE template = ?"
        return int(await self._run(lambda: self._conn.execute(sql, (template,)).fetchone()[0]))

    async def list_sandboxes(self, query: SandboxQuery) -> Page:
        """One page of sandboxes matching the query, ordered by start time (then id)."""
        where: list[str] = []
        params: list[object] = []
        if query.states:
            where.append(f"state IN ({', '.join('?' * len(query.states))})")
            params.extend(query.states)
        for key, value in query.metadata.items():
            where.append(
                "EXISTS (SELECT 1 FROM json_each(sandboxes.metadata) AS m "
                "WHERE m.key = ? AND m.value = ?)"
            )
            params.extend((key, value))
        if query.template is not None:
            where.append("(template = ? OR alias = ?)")
            params.extend((query.template, query.template))
        if query.started_after is not None:
            where.append("started_at >= ?")
            params.append(query.started_after)
        if query.next_token is not None:
            started, key = _decode_token(query.next_token)
            op = "<" if query.order == "desc" else ">"
            where.append(f"(started_at {op} ? OR (started_at = ? AND id {op} ?))")
            params.extend((started, started, key))
        direction = "DESC" if query.order == "desc" else "ASC"
        sql = f"SELECT {_SANDBOX_COLUMNS} FROM sandboxes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY started_at {direction}, id {direction} LIMIT ?"
        params.append(query.limit + 1)

        rows = await self._run(lambda: self._conn.execute(sql, params).fetchall())
        items = [_sandbox_from_row(r) for r in rows[: query.limit]]
        more = len(rows) > query.limit
        token = _encode_token(items[-1].started_at, items[-1].id) if more and items else None
        return Page(items, token)

    async def count_running(self) -> int:
        sql = "SELECT COUNT(*) FROM sandboxes WHERE state = 'running'"
        return int(await self._run(lambda: self._conn.execute(sql).fetchone()[0]))

    # Snapshots -------------------------------------------------------------------------------
    async def insert_snapshot(self, record: SnapshotRecord) -> None:
        sql = (
            "INSERT INTO snapshots (snapshot_id, names, source_sandbox, source_template, "
            "created_at) VALUES (?, ?, ?, ?, ?)"
        )
        params = (
            record.snapshot_id,
            json.dumps(list(record.names)),
            record.source_sandbox,
            record.source_template,
            record.created_at,
        )
        await self._run(lambda: self._conn.execute(sql, params))

    async def find_snapshot(self, id_or_name: str) -> SnapshotRecord | None:
        sql = (
            "SELECT * FROM snapshots WHERE snapshot_id = ? OR EXISTS "
            "(SELECT 1 FROM json_each(snapshots.names) AS n WHERE n.value = ?) "
            "ORDER BY created_at DESC LIMIT 1"
        )

        def query() -> SnapshotRecord | None:
            row = self._conn.execute(sql, (id_or_name, id_or_name)).fetchone()
            return None if row is None else _snapshot_from_row(row)

        return await self._run(query)

    async def list_snapshots(
        self,
        *,
        source_sandbox: str | None = None,
        name: str | None = None,
        limit: int = 100,
        next_token: str | None = None,
    ) -> SnapshotPage:
        """Snapshots, newest first."""
        where: list[str] = []
        params: list[object] = []
        if source_sandbox is not None:
            where.append("source_sandbox = ?")
            params.append(source_sandbox)
        if name is not None:
            where.append(
                "(snapshot_id = ? OR EXISTS "
                "(SELECT 1 FROM json_each(snapshots.names) AS n WHERE n.value = ?))"
            )
            params.extend((name, name))
        if next_token is not None:
            created, key = _decode_token(next_token)
            where.append("(created_at < ? OR (created_at = ? AND snapshot_id < ?))")
            params.extend((created, created, key))
        sql = "SELECT * FROM snapshots"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, snapshot_id DESC LIMIT ?"
        params.append(limit + 1)
        rows = await self._run(lambda: self._conn.execute(sql, params).fetchall())
        items = [_snapshot_from_row(r) for r in rows[:limit]]
        more = len(rows) > limit
        token = _encode_token(items[-1].created_at, items[-1].snapshot_id) if more else None
        return SnapshotPage(items, token)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        sql = "DELETE FROM snapshots WHERE snapshot_id = ?"
        cursor = await self._run(lambda: self._conn.execute(sql, (snapshot_id,)))
        return cursor.rowcount > 0

    # Events ----------------------------------------------------------------------------------
    async def append_event(
        self,
        sandbox_id: str,
        level: LogLevel,
        message: str,
        fields: Mapping[str, str] | None = None,
        *,
        ts: float | None = None,
    ) -> None:
        """Add an entry to a sandbox's log (lifecycle, process start/exit)."""
        when = time.time() if ts is None else ts
        encoded = json.dumps(dict(fields or {}))

        def append() -> None:
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.execute(
                    "INSERT INTO events (sandbox_id, ts, level, message, fields) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (sandbox_id, when, level, message, encoded),
                )
                # Older than this sandbox's newest EVENTS_KEPT_PER_SANDBOX entries: dropped.
                self._conn.execute(
                    "DELETE FROM events WHERE sandbox_id = ? AND seq < (SELECT seq FROM events "
                    "WHERE sandbox_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (sandbox_id, sandbox_id, EVENTS_KEPT_PER_SANDBOX - 1),
                )

        await self._run(append)

    async def events(
        self,
        sandbox_id: str,
        *,
        since: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[EventRecord]:
        where = "sandbox_id = ?"
        params: list[object] = [sandbox_id]
        if since is not None:
            where += " AND ts <= ?" if newest_first else " AND ts >= ?"
            params.append(since)
        direction = "DESC" if newest_first else "ASC"
        sql = f"SELECT * FROM events WHERE {where} ORDER BY seq {direction} LIMIT ?"
        params.append(limit)
        rows = await self._run(lambda: self._conn.execute(sql, params).fetchall())
        return [
            EventRecord(
                seq=r["seq"],
                sandbox_id=r["sandbox_id"],
                ts=r["ts"],
                level=r["level"],
                message=r["message"],
                fields=json.loads(r["fields"]),
            )
            for r in rows
        ]
