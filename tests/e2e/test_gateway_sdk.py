"""End to end through the official `e2b` Python SDK (sync and async) in debug mode, against a
real gateway: the SDK's envd base URL is the gateway (E2B_SANDBOX_URL), and routing falls back
to the most recent sandbox for its `debug_sandbox_id`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    ConnectionConfig,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    Sandbox,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry
from fixtures.gateway import RunningGateway, start_gateway
from packaging.version import Version

from coppice_envd.testing import USER_UID, StaticLookup, make_sandbox

TOKEN = "envd-token-123"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sdk-sbx"


@pytest.fixture
def gateway(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    with start_gateway(StaticLookup([make_sandbox(root)])) as gw:
        monkeypatch.setenv("E2B_DEBUG", "true")
        monkeypatch.setenv("E2B_SANDBOX_URL", gw.url)
        monkeypatch.setenv("E2B_API_KEY", "not-a-real-key")
        yield gw


def test_sync_sdk_files(gateway: RunningGateway, root: Path) -> None:
    sbx = Sandbox.create()
    assert sbx.is_running()
    home = root / "home/user"
    info = sbx.files.write("/home/user/hello.txt", "hello world")
    assert (info.path, info.name, info.type) == ("/home/user/hello.txt", "hello.txt", FileType.FILE)
    assert sbx.files.read("/home/user/hello.txt") == "hello world"
    assert (home / "hello.txt").stat().st_uid == USER_UID
    sbx.files.write("data.bin", b"\x00\xffbytes")
    assert sbx.files.read("data.bin", format="bytes") == b"\x00\xffbytes"
    written = sbx.files.write_files(
        [
            WriteEntry(path="/home/user/many/a.txt", data="A"),
            WriteEntry(path="/home/user/many/sub/b.txt", data=b"B"),
            WriteEntry(path="many/c.txt", data="C"),
        ]
    )
    assert [w.path for w in written] == [
        "/home/user/many/a.txt",
        "/home/user/many/sub/b.txt",
        "/home/user/many/c.txt",
    ]
    sbx.files.write("tagged.txt", "t", metadata={"owner": "team-a"})
    assert sbx.files.get_info("tagged.txt").metadata == {"owner": "team-a"}
    assert sorted(e.name for e in sbx.files.list("/home/user/many")) == ["a.txt", "c.txt", "sub"]
    deep = sbx.files.list("/home/user/many", depth=2)
    assert [e.path for e in deep] == [
        "/home/user/many/a.txt",
        "/home/user/many/c.txt",
        "/home/user/many/sub",
        "/home/user/many/sub/b.txt",
    ]
    assert sbx.files.exists("many/a.txt")
    assert not sbx.files.exists("many/nope.txt")
    entry = sbx.files.get_info("/home/user/hello.txt")
    assert (entry.size, entry.permissions, entry.owner, entry.type) == (
        11,
        "-rw-r--r--",
        "user",
        FileType.FILE,
    )
    assert sbx.files.make_dir("newdir/inner") is True
    assert sbx.files.make_dir("newdir/inner") is False
    moved = sbx.files.rename("hello.txt", "newdir/inner/moved.txt")
    assert moved.path == "/home/user/newdir/inner/moved.txt"
    assert not (home / "hello.txt").exists()
    sbx.files.remove("newdir")
    assert not (home / "newdir").exists()
    with pytest.raises(FileNotFoundException):
        sbx.files.read("newdir/inner/moved.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("/no/such/file")
    sbx.files.write("/root/as-root.txt", "r", user="root")
    assert (root / "root/as-root.txt").stat().st_uid == 0
    assert sbx.files.read("as-root.txt", user="root") == "r"


def test_sync_sdk_large_file(gateway: RunningGateway, root: Path) -> None:
    sbx = Sandbox.create()
    data = os.urandom(50 * 1024 * 1024)
    sbx.files.write("/home/user/big.bin", data)
    assert hashlib.sha256((root / "home/user/big.bin").read_bytes()).digest() == (
        hashlib.sha256(data).digest()
    )
    assert hashlib.sha256(sbx.files.read("big.bin", format="bytes")).digest() == (
        hashlib.sha256(data).digest()
    )
    assert sbx.files.read("big.bin", format="bytes", gzip=True) == data


def test_sync_sdk_watch_dir(gateway: RunningGateway, root: Path) -> None:
    sbx = Sandbox.create()
    handle = sbx.files.watch_dir("/home/user", recursive=True)
    events: list[FilesystemEvent] = []

    def collect(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(events) < count and time.monotonic() < deadline:
            events.extend(handle.get_new_events())

    # A files.write shows as envd's does: a new file is created, written and chowned; one
    # that is there is chowned, then truncated and written.
    sbx.files.write("/home/user/watched.txt", "w")
    collect(3)
    assert handle.get_new_events() == []
    sbx.files.write("/home/user/watched.txt", "again")
    collect(5)
    (root / "home/user/sub").mkdir()
    collect(6)
    (root / "home/user/sub/f").write_text("f")  # the new directory is watched by now
    collect(8)
    handle.stop()
    assert [(e.name, e.type) for e in events] == [
        ("watched.txt", FilesystemEventType.CREATE),
        ("watched.txt", FilesystemEventType.WRITE),
        ("watched.txt", FilesystemEventType.CHMOD),
        ("watched.txt", FilesystemEventType.CHMOD),
        ("watched.txt", FilesystemEventType.WRITE),
        ("sub", FilesystemEventType.CREATE),
        ("sub/f", FilesystemEventType.CREATE),
        ("sub/f", FilesystemEventType.WRITE),
    ]


def test_sync_sdk_signed_urls(tmp_path: Path) -> None:
    root = tmp_path / "secure"
    with start_gateway(StaticLookup([make_sandbox(root, "sec1", access_token=TOKEN)])) as gw:
        config = ConnectionConfig(
            api_key="not-a-real-key",
            sandbox_url=gw.url,
            extra_sandbox_headers={
                "X-Access-Token": TOKEN,
                "E2b-Sandbox-Id": "sec1",
                "E2b-Sandbox-Port": "49983",
            },
        )
        sbx = Sandbox(
            sandbox_id="sec1",
            sandbox_domain=None,
            envd_version=Version("0.6.13"),
            envd_access_token=TOKEN,
            traffic_access_token=None,
            connection_config=config,
        )
        sbx.files.write("secret.txt", "for your eyes")
        assert sbx.files.read("secret.txt") == "for your eyes"
        url = sbx.download_url("secret.txt", use_signature_expiration=60)
        assert "signature=v1_" in url
        assert httpx.get(url).text == "for your eyes"
        assert httpx.get(url.replace("secret.txt", "other.txt")).status_code == 401
        upload = sbx.upload_url("/home/user/uploaded.txt")
        response = httpx.post(upload, files={"file": ("uploaded.txt", b"via url")})
        assert response.status_code == 200
        assert (root / "home/user/uploaded.txt").read_bytes() == b"via url"
        # Without the token the RPCs are refused.
        assert (
            httpx.post(
                f"{gw.url}/filesystem.Filesystem/Stat",
                json={"path": "/"},
                headers={"e2b-sandbox-id": "sec1"},
            ).status_code
            == 401
        )


async def test_async_sdk_files_and_watch(gateway: RunningGateway, root: Path) -> None:
    sbx = await AsyncSandbox.create()
    assert await sbx.is_running()
    await sbx.files.write("async.txt", "from async")
    assert await sbx.files.read("/home/user/async.txt") == "from async"
    assert [e.name for e in await sbx.files.list("/home/user")] == ["async.txt"]
    assert await sbx.files.exists("async.txt")
    assert await sbx.files.make_dir("adir") is True
    assert await sbx.files.make_dir("adir") is False
    await sbx.files.rename("async.txt", "adir/moved.txt")
    assert (await sbx.files.get_info("adir/moved.txt")).size == len("from async")
    await sbx.files.remove("adir")
    assert not await sbx.files.exists("adir")
    events: asyncio.Queue[FilesystemEvent] = asyncio.Queue()
    handle = await sbx.files.watch_dir("/home/user", events.put_nowait, include_entry=True)
    await sbx.files.write("streamed.txt", "s")
    first = await asyncio.wait_for(events.get(), 10)
    second = await asyncio.wait_for(events.get(), 10)
    third = await asyncio.wait_for(events.get(), 10)
    await handle.stop()  # type: ignore[no-untyped-call]  # the SDK leaves it untyped
    assert (first.name, first.type) == ("streamed.txt", FilesystemEventType.CREATE)
    assert (second.name, second.type) == ("streamed.txt", FilesystemEventType.WRITE)
    assert (third.name, third.type) == ("streamed.txt", FilesystemEventType.CHMOD)
    assert first.entry is not None
    assert first.entry.path == "/home/user/streamed.txt"
