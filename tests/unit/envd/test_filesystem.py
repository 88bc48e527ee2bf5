"""The Filesystem Connect service over a real gateway: EntryInfo exactly as envd, the RPCs'
semantics and error codes, watches, and confinement to the sandbox root."""

from __future__ import annotations

import base64
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.gateway import RunningGateway, connect_unary, envelope, read_envelopes, start_gateway

from coppice_envd.filesystem.entryinfo import go_mode_string
from coppice_envd.testing import USER_UID, StaticLookup, make_sandbox

FS = "filesystem.Filesystem"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sbx1"


@pytest.fixture
def gateway(root: Path) -> Iterator[RunningGateway]:
    with start_gateway(StaticLookup([make_sandbox(root)])) as gw:
        yield gw


def call(
    gw: RunningGateway, method: str, body: object, **headers: str
) -> tuple[int, dict[str, Any]]:
    return connect_unary(gw.url, f"{FS}/{method}", body, headers)


def test_go_mode_strings() -> None:
    assert go_mode_string(stat.S_IFREG | 0o644) == "-rw-r--r--"
    assert go_mode_string(stat.S_IFDIR | 0o755) == "drwxr-xr-x"
    assert go_mode_string(stat.S_IFDIR | stat.S_ISVTX | 0o777) == "dtrwxrwxrwx"
    assert go_mode_string(stat.S_IFLNK | 0o777) == "Lrwxrwxrwx"
    assert go_mode_string(stat.S_IFCHR | 0o666) == "Dcrw-rw-rw-"
    assert go_mode_string(stat.S_IFBLK | 0o660) == "Drw-rw----"
    assert go_mode_string(stat.S_IFREG | stat.S_ISUID | 0o755) == "urwxr-xr-x"
    assert go_mode_string(stat.S_IFREG | stat.S_ISGID | 0o755) == "grwxr-xr-x"
    assert go_mode_string(stat.S_IFIFO | 0o644) == "prw-r--r--"
    assert go_mode_string(stat.S_IFSOCK | 0o755) == "Srwxr-xr-x"


def test_stat_entry_info_fields(gateway: RunningGateway, root: Path) -> None:
    f = root / "home/user/a.txt"
    f.write_text("hello")
    os.chown(f, USER_UID, 27)
    f.chmod(0o640)
    os.utime(f, ns=(0, 1_700_000_000_123_456_789))
    os.setxattr(f, "user.e2b.author", b"me")
    os.setxattr(f, "user.other", b"not metadata")
    status, body = call(gateway, "Stat", {"path": "a.txt"})
    assert status == 200
    assert body == {
        "entry": {
            "name": "a.txt",
            "type": "FILE_TYPE_FILE",
            "path": "/home/user/a.txt",
            "size": "5",
            "mode": 0o640,
            "permissions": "-rw-r-----",
            "owner": "user",
            "group": "sudo",
            "modifiedTime": "2023-11-14T22:13:20.123456789Z",
            "metadata": {"author": "me"},
        }
    }


def test_stat_unknown_ids_and_special_modes(gateway: RunningGateway, root: Path) -> None:
    d = root / "home/user/shared"
    d.mkdir()
    os.chown(d, 4242, 4343)
    d.chmod(0o1777)
    os.mkfifo(root / "home/user/pipe", 0o600)
    _, body = call(gateway, "Stat", {"path": "~/shared"})
    entry = body["entry"]
    assert (entry["owner"], entry["group"]) == ("4242", "4343")
    assert (entry["type"], entry["permissions"], entry["mode"]) == (
        "FILE_TYPE_DIRECTORY",
        "dtrwxrwxrwx",
        0o777,
    )
    _, body = call(gateway, "Stat", {"path": "/home/user/pipe"})
    assert body["entry"]["permissions"] == "prw-------"
    assert "type" not in body["entry"]  # FILE_TYPE_UNSPECIFIED is the default: omitted


def test_stat_symlinks(gateway: RunningGateway, root: Path) -> None:
    (root / "home/user/target.txt").write_text("12345678")
    (root / "home/user/rel").symlink_to("target.txt")
    (root / "home/user/broken").symlink_to("/nowhere/at/all")
    _, body = call(gateway, "Stat", {"path": "/home/user/rel"})
    entry = body["entry"]
    assert entry["type"] == "FILE_TYPE_FILE"  # the target's type: envd never says SYMLINK
    assert entry["symlinkTarget"] == "/home/user/target.txt"
    assert entry["permissions"] == "Lrwxrwxrwx"
    assert entry["size"] == str(len("target.txt"))  # the link's own size
    assert entry["mode"] == 0o644  # the target's permission bits
    assert entry["isSymlink"] is True
    _, body = call(gateway, "Stat", {"path": "/home/user/broken"})
    entry = body["entry"]
    assert entry["symlinkTarget"] == "/home/user/broken"
    assert "type" not in entry
    assert "mode" not in entry


def test_stat_errors(gateway: RunningGateway) -> None:
    status, body = call(gateway, "Stat", {"path": "/no/such"})
    assert status == 404
    assert body == {
        "code": "not_found",
        "message": "file not found: lstat /no/such: no such file or directory",
    }
    status, body = call(gateway, "Stat", {"path": "~root/x"})
    assert (status, body["code"]) == (400, "invalid_argument")
    assert body["message"] == "cannot expand user-specific home dir"


def test_effective_user_from_basic_auth(gateway: RunningGateway, root: Path) -> None:
    (root / "root/r.txt").write_text("r")
    status, body = call(gateway, "Stat", {"path": "r.txt"}, authorization=_basic("root"))
    assert status == 200
    assert body["entry"]["path"] == "/root/r.txt"
    status, body = call(gateway, "Stat", {"path": "r.txt"}, authorization=_basic("nobody"))
    assert status == 401
    assert body == {"code": "unauthenticated", "message": "invalid username: 'nobody'"}
    # A stream reports the same error as HTTP 200 plus an end-of-stream error.
    response = httpx.post(
        f"{gateway.url}/{FS}/WatchDir",
        content=envelope({"path": "/home/user"}),
        headers={"content-type": "application/connect+json", "authorization": _basic("nobody")},
    )
    assert response.status_code == 200
    assert read_envelopes(response.content) == [
        (2, {"error": {"code": "unauthenticated", "message": "invalid username: 'nobody'"}})
    ]


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


def _tree(root: Path) -> None:
    home = root / "home/user"
    for d in ("b", "b/inner", "b/inner/deep", "a"):
        (home / "proj" / d).mkdir(parents=True)
    (home / "proj/z.txt").write_text("z")
    (home / "proj/b/inner/f.txt").write_text("f")
    (home / "proj/b/inner/deep/g.txt").write_text("g")
    (home / "elsewhere").mkdir()
    (home / "elsewhere/hidden.txt").write_text("h")
    (home / "proj/link-dir").symlink_to("/home/user/elsewhere")
    (home / "proj-link").symlink_to("proj")


def test_list_dir_depth_and_order(gateway: RunningGateway, root: Path) -> None:
    _tree(root)
    _, body = call(gateway, "ListDir", {"path": "/home/user/proj"})
    assert [e["path"] for e in body["entries"]] == [
        "/home/user/proj/a",
        "/home/user/proj/b",
        "/home/user/proj/link-dir",
        "/home/user/proj/z.txt",
    ]
    assert body == call(gateway, "ListDir", {"path": "/home/user/proj", "depth": 1})[1]
    _, body = call(gateway, "ListDir", {"path": "proj-link", "depth": 3})
    # Pre-order, lexical, through the requested (symlinked) path, symlinked dirs not entered.
    assert [e["path"] for e in body["entries"]] == [
        "/home/user/proj-link/a",
        "/home/user/proj-link/b",
        "/home/user/proj-link/b/inner",
        "/home/user/proj-link/b/inner/deep",
        "/home/user/proj-link/b/inner/f.txt",
        "/home/user/proj-link/link-dir",
        "/home/user/proj-link/z.txt",
    ]
    link = body["entries"][5]
    assert (link["type"], link["symlinkTarget"]) == ("FILE_TYPE_DIRECTORY", "/home/user/elsewhere")


def test_list_dir_errors(gateway: RunningGateway, root: Path) -> None:
    (root / "home/user/file").write_text("x")
    (root / "home/user/loop").symlink_to("loop")
    status, body = call(gateway, "ListDir", {"path": "/home/user/nope"})
    assert (status, body["code"]) == (404, "not_found")
    assert body["message"].startswith("path not found: ")
    status, body = call(gateway, "ListDir", {"path": "/home/user/file"})
    assert status == 400
    assert body == {
        "code": "invalid_argument",
        "message": "path is not a directory: /home/user/file",
    }
    status, body = call(gateway, "ListDir", {"path": "/home/user/loop"})
    assert (status, body["code"]) == (400, "failed_precondition")
    status, body = call(gateway, "ListDir", {"path": "/home/user/empty-dir-missing"})
    assert status == 404
    (root / "home/user/empty").mkdir()
    assert call(gateway, "ListDir", {"path": "/home/user/empty"}) == (200, {})


def test_make_dir(gateway: RunningGateway, root: Path) -> None:
    status, body = call(gateway, "MakeDir", {"path": "new/a/b"})
    assert status == 200
    assert body["entry"]["path"] == "/home/user/new/a/b"
    assert body["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    for d in ("new", "new/a", "new/a/b"):
        st = (root / "home/user" / d).stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER_UID, USER_UID, 0o755)
    assert (root / "home").stat().st_uid == 0  # existing components are left alone
    status, body = call(gateway, "MakeDir", {"path": "new/a"})
    assert status == 409
    assert body == {
        "code": "already_exists",
        "message": "directory already exists: /home/user/new/a",
    }
    (root / "home/user/f").write_text("x")
    status, body = call(gateway, "MakeDir", {"path": "/home/user/f"})
    assert (status, body["code"]) == (400, "invalid_argument")
    status, body = call(gateway, "MakeDir", {"path": "/home/user/f/sub"})
    assert (status, body["code"]) == (500, "internal")
    assert body["message"] == "path is a file: /home/user/f"


def test_move(gateway: RunningGateway, root: Path) -> None:
    (root / "home/user/a.txt").write_text("a")
    (root / "home/user/old.txt").write_text("old")
    status, body = call(gateway, "Move", {"source": "a.txt", "destination": "x/y/b.txt"})
    assert status == 200
    assert body["entry"]["path"] == "/home/user/x/y/b.txt"
    assert (root / "home/user/x/y/b.txt").read_text() == "a"
    assert (root / "home/user/x").stat().st_uid == USER_UID
    status, _ = call(gateway, "Move", {"source": "x/y/b.txt", "destination": "old.txt"})
    assert status == 200
    assert (root / "home/user/old.txt").read_text() == "a"
    status, body = call(gateway, "Move", {"source": "gone", "destination": "z"})
    assert (status, body["code"]) == (404, "not_found")
    assert body["message"].startswith("source file not found: rename /home/user/gone")


def test_remove(gateway: RunningGateway, root: Path) -> None:
    (root / "home/user/d/e").mkdir(parents=True)
    (root / "home/user/d/e/f").write_text("f")
    (root / "home/user/keep").mkdir()
    (root / "home/user/keep/k").write_text("k")
    (root / "home/user/link").symlink_to("keep")
    assert call(gateway, "Remove", {"path": "d"}) == (200, {})
    assert not (root / "home/user/d").exists()
    assert call(gateway, "Remove", {"path": "d"}) == (200, {})  # idempotent
    assert call(gateway, "Remove", {"path": "link"}) == (200, {})
    assert (root / "home/user/keep/k").exists()  # only the link went


# -- confinement ------------------------------------------------------------------------------


def test_symlink_to_etc_shadow_is_the_sandboxes(gateway: RunningGateway, root: Path) -> None:
    (root / "etc/shadow").chmod(0o604)
    host_shadow = Path("/etc/shadow").read_bytes()
    (root / "home/user/x").symlink_to("/etc/shadow")
    _, body = call(gateway, "Stat", {"path": "/home/user/x"})
    assert body["entry"]["symlinkTarget"] == "/etc/shadow"
    assert body["entry"]["mode"] == 0o604  # the sandbox's shadow, not the host's (0640)
    assert httpx.get(f"{gateway.url}/files", params={"path": "/home/user/x"}).text == (
        "sandbox-shadow\n"
    )
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": "/home/user/x"},
        content=b"overwritten",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert (root / "etc/shadow").read_bytes() == b"overwritten"
    assert Path("/etc/shadow").read_bytes() == host_shadow
    _, body = call(gateway, "ListDir", {"path": "/home/user"})
    (entry,) = [e for e in body["entries"] if e["name"] == "x"]
    assert entry["mode"] == 0o604
    assert call(gateway, "Move", {"source": "x", "destination": "y"})[0] == 200
    assert (root / "home/user/y").is_symlink()
    assert (root / "etc/shadow").exists()
    assert call(gateway, "Remove", {"path": "y"}) == (200, {})
    assert (root / "etc/shadow").exists()
    assert Path("/etc/shadow").read_bytes() == host_shadow


def test_dotdot_and_symlinked_parents_stay_inside(
    gateway: RunningGateway, root: Path, tmp_path: Path
) -> None:
    name = f"coppice-escape-{os.getpid()}-{time.monotonic_ns()}"
    (root / "home/user/up").symlink_to("/")
    (root / "home/user/hostish").symlink_to("../../../../../../tmp")
    status, body = call(gateway, "Stat", {"path": "/../../../../etc/shadow"})
    assert status == 200
    assert body["entry"]["size"] == str(len("sandbox-shadow\n"))
    status, _ = call(gateway, "MakeDir", {"path": f"/home/user/up/etc/{name}"})
    assert status == 200
    assert (root / "etc" / name).is_dir()
    assert not Path("/etc", name).exists()
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": f"/home/user/hostish/{name}.txt"},
        content=b"inside",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert (root / "tmp" / f"{name}.txt").read_bytes() == b"inside"
    assert not Path("/tmp", f"{name}.txt").exists()
    status, _ = call(
        gateway, "Move", {"source": f"/tmp/{name}.txt", "destination": f"/../../tmp/{name}.2"}
    )
    assert status == 200
    assert (root / "tmp" / f"{name}.2").exists()
    assert not Path("/tmp", f"{name}.2").exists()
    outside = tmp_path / "outside.txt"
    outside.write_text("host file")
    (root / "home/user/out").symlink_to(outside)
    status, _ = call(gateway, "Remove", {"path": f"/home/user/up/{outside.relative_to('/')}"})
    assert status == 200
    assert outside.exists()
    _, body = call(gateway, "ListDir", {"path": "/home/user/up/"})
    assert {e["name"] for e in body["entries"]} == {"etc", "home", "root", "tmp"}


# -- watches ----------------------------------------------------------------------------------


def _watch_stream(
    gw: RunningGateway, body: dict[str, Any], timeout_ms: int = 3000
) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/{FS}/WatchDir",
        content=envelope(body),
        headers={
            "content-type": "application/connect+json",
            "connect-timeout-ms": str(timeout_ms),
        },
        timeout=30,
    )


def test_watch_dir_stream(gateway: RunningGateway, root: Path) -> None:
    home = root / "home/user"
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.url}/{FS}/WatchDir",
            content=envelope({"path": "/home/user", "recursive": True, "includeEntry": True}),
            headers={"content-type": "application/connect+json", "connect-timeout-ms": "20000"},
        ) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_bytes()
        buffer = b""

        def next_frame() -> tuple[int, dict[str, Any]]:
            nonlocal buffer
            while len(buffer) < 5 or len(buffer) < 5 + int.from_bytes(buffer[1:5], "big"):
                buffer += next(chunks)
            length = int.from_bytes(buffer[1:5], "big")
            frame = read_envelopes(buffer[: 5 + length])[0]
            buffer = buffer[5 + length :]
            return frame

        assert next_frame() == (0, {"start": {}})
        (home / "new.txt").write_text("data")
        events = [next_frame()[1]["filesystem"] for _ in range(2)]
        assert [(e["name"], e["type"]) for e in events] == [
            ("new.txt", "EVENT_TYPE_CREATE"),
            ("new.txt", "EVENT_TYPE_WRITE"),
        ]
        assert events[0]["entry"]["path"] == "/home/user/new.txt"
        (home / "sub").mkdir()
        assert next_frame()[1]["filesystem"]["name"] == "sub"
        (home / "sub/inner.txt").write_text("x")  # the new directory is watched too
        events = [next_frame()[1]["filesystem"] for _ in range(2)]
        assert [(e["name"], e["type"]) for e in events] == [
            ("sub/inner.txt", "EVENT_TYPE_CREATE"),
            ("sub/inner.txt", "EVENT_TYPE_WRITE"),
        ]
        (home / "new.txt").rename(home / "renamed.txt")
        events = [next_frame()[1]["filesystem"] for _ in range(2)]
        assert [(e["name"], e["type"]) for e in events] == [
            ("new.txt", "EVENT_TYPE_RENAME"),
            ("renamed.txt", "EVENT_TYPE_CREATE"),
        ]
        assert "entry" not in events[0]
        (home / "renamed.txt").unlink()
        event = next_frame()[1]["filesystem"]
        assert (event["name"], event["type"]) == ("renamed.txt", "EVENT_TYPE_REMOVE")


def test_watch_dir_keepalive_deadline_and_errors(gateway: RunningGateway, root: Path) -> None:
    response = httpx.post(
        f"{gateway.url}/{FS}/WatchDir",
        content=envelope({"path": "/home/user"}),
        headers={
            "content-type": "application/connect+json",
            "connect-timeout-ms": "1500",
            "keepalive-ping-interval": "0.5",
        },
        timeout=30,
    )
    frames = read_envelopes(response.content)
    assert frames[0] == (0, {"start": {}})
    assert (0, {"keepalive": {}}) in frames
    assert frames[-1] == (
        2,
        {"error": {"code": "deadline_exceeded", "message": "context deadline exceeded"}},
    )
    (root / "home/user/file").write_text("x")
    for path, code in (("/home/user/nope", "not_found"), ("/home/user/file", "invalid_argument")):
        frames = read_envelopes(_watch_stream(gateway, {"path": path}).content)
        assert len(frames) == 1
        assert frames[0][1]["error"]["code"] == code


def test_polling_watcher(tmp_path: Path) -> None:
    a, b = make_sandbox(tmp_path / "a"), make_sandbox(tmp_path / "b")
    with start_gateway(StaticLookup([a, b])) as gw:
        on_a = {"e2b-sandbox-id": "a"}
        status, body = call(gw, "CreateWatcher", {"path": "/home/user"}, **on_a)
        assert status == 200
        watcher_id = body["watcherId"]
        assert watcher_id.startswith("w")
        assert len(watcher_id) == 21
        (tmp_path / "a/home/user/one.txt").write_text("1")
        deadline = time.monotonic() + 10
        events: list[dict[str, Any]] = []
        while len(events) < 2 and time.monotonic() < deadline:
            events += call(gw, "GetWatcherEvents", {"watcherId": watcher_id}, **on_a)[1].get(
                "events", []
            )
        assert events == [
            {"name": "one.txt", "type": "EVENT_TYPE_CREATE"},
            {"name": "one.txt", "type": "EVENT_TYPE_WRITE"},
        ]
        assert call(gw, "GetWatcherEvents", {"watcherId": watcher_id}, **on_a) == (200, {})
        # Another sandbox cannot read or remove it.
        status, body = call(gw, "GetWatcherEvents", {"watcherId": watcher_id})
        assert (status, body["code"]) == (404, "not_found")
        assert call(gw, "RemoveWatcher", {"watcherId": watcher_id})[0] == 404
        assert call(gw, "RemoveWatcher", {"watcherId": watcher_id}, **on_a) == (200, {})
        status, body = call(gw, "GetWatcherEvents", {"watcherId": watcher_id}, **on_a)
        assert body == {"code": "not_found", "message": f"watcher with id {watcher_id} not found"}


def test_legacy_sdk_gets_trimmed_entries(gateway: RunningGateway, root: Path) -> None:
    (root / "home/user/old.txt").write_text("o")
    response = httpx.post(
        f"{gateway.url}/{FS}/ListDir",
        json={"path": "/home/user"},
        headers={"user-agent": "connect-python"},
    )
    assert response.headers["x-e2b-legacy-sdk"] == "true"
    assert response.json() == {
        "entries": [{"name": "old.txt", "type": "FILE_TYPE_FILE", "path": "/home/user/old.txt"}]
    }
    _, body = call(gateway, "Stat", {"path": "old.txt"})
    assert "permissions" in body["entry"]  # everyone else gets the full entry


def _drain(gw: RunningGateway, watcher_id: str, count: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    deadline = time.monotonic() + 10
    while len(events) < count and time.monotonic() < deadline:
        _, body = call(gw, "GetWatcherEvents", {"watcherId": watcher_id})
        events += [(e["name"], e["type"]) for e in body.get("events", [])]
    return events


def test_recursive_watch_follows_renames_and_reports_its_own_removal(
    gateway: RunningGateway, root: Path
) -> None:
    watched = root / "home/user/w"
    (watched / "a").mkdir(parents=True)
    _, body = call(gateway, "CreateWatcher", {"path": "/home/user/w", "recursive": True})
    watcher_id = body["watcherId"]
    (watched / "a").rename(watched / "b")
    assert _drain(gateway, watcher_id, 2) == [
        ("a", "EVENT_TYPE_RENAME"),
        ("b", "EVENT_TYPE_CREATE"),
    ]
    (watched / "b/f").write_text("f")  # the moved directory's watch now reports under b/
    assert _drain(gateway, watcher_id, 2) == [
        ("b/f", "EVENT_TYPE_CREATE"),
        ("b/f", "EVENT_TYPE_WRITE"),
    ]
    (watched / "b/f").unlink()
    (watched / "b").rmdir()
    watched.rmdir()
    events = _drain(gateway, watcher_id, 3)
    assert events == [
        ("b/f", "EVENT_TYPE_REMOVE"),
        ("b", "EVENT_TYPE_REMOVE"),
        (".", "EVENT_TYPE_REMOVE"),
    ]
    assert call(gateway, "RemoveWatcher", {"watcherId": watcher_id}) == (200, {})
