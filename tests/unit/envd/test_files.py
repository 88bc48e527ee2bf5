"""envd's `/files` over a real gateway: uploads (multipart, raw, gzip, metadata, ownership,
atomic visibility), downloads (encodings, ranges, errors), signed URLs and `/files/list`."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures.gateway import RunningGateway, start_gateway

from coppice_envd.permissions.auth import file_signature
from coppice_envd.testing import USER_UID, StaticLookup, make_sandbox

TOKEN = "secret-token-a"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sbx"


@pytest.fixture
def gateway(root: Path) -> Iterator[RunningGateway]:
    with start_gateway(StaticLookup([make_sandbox(root)])) as gw:
        yield gw


def _multipart(*files: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "text/plain")) for name, data in files]


def test_upload_multipart_one_and_many(gateway: RunningGateway, root: Path) -> None:
    response = httpx.post(
        f"{gateway.url}/files", params={"path": "a.txt"}, files=_multipart(("x", b"one"))
    )
    assert response.status_code == 200
    assert response.json() == [{"path": "/home/user/a.txt", "name": "a.txt", "type": "file"}]
    response = httpx.post(
        f"{gateway.url}/files",
        files=_multipart(("/home/user/d1/d2/b.txt", b"two"), ("rel/c.txt", b"three")),
    )
    assert response.json() == [
        {"path": "/home/user/d1/d2/b.txt", "name": "b.txt", "type": "file"},
        {"path": "/home/user/rel/c.txt", "name": "c.txt", "type": "file"},
    ]
    home = root / "home/user"
    assert (home / "a.txt").read_bytes() == b"one"
    assert (home / "d1/d2/b.txt").read_bytes() == b"two"
    assert (home / "rel/c.txt").read_bytes() == b"three"
    for path in ("a.txt", "d1", "d1/d2", "d1/d2/b.txt", "rel"):
        st = (home / path).lstat()
        assert (st.st_uid, st.st_gid) == (USER_UID, USER_UID), path
    assert stat.S_IMODE((home / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((home / "d1").stat().st_mode) == 0o755
    # No multipart part named `file`: an empty answer.
    response = httpx.post(f"{gateway.url}/files", files=[("other", ("x", b"x", "text/plain"))])
    assert response.json() == []


def test_upload_as_root_and_existing_mode(gateway: RunningGateway, root: Path) -> None:
    script = root / "home/user/run.sh"
    script.write_text("old")
    script.chmod(0o750)
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": "/home/user/run.sh"},
        content=b"#!/bin/sh\n",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    assert script.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(script.stat().st_mode) == 0o750
    assert script.stat().st_uid == USER_UID
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": "r.txt", "username": "root"},
        files=_multipart(("ignored", b"r")),
    )
    assert response.json()[0]["path"] == "/root/r.txt"
    assert (root / "root/r.txt").stat().st_uid == 0


def test_upload_gzip_and_raw_errors(gateway: RunningGateway, root: Path) -> None:
    payload = os.urandom(300_000)
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": "z.bin"},
        content=gzip.compress(payload),
        headers={"content-type": "application/octet-stream", "content-encoding": "gzip"},
    )
    assert response.status_code == 200
    assert (root / "home/user/z.bin").read_bytes() == payload
    response = httpx.post(
        f"{gateway.url}/files",
        content=gzip.compress(
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="m.txt"\r\n\r\n'
            b"multi\r\n--B--\r\n"
        ),
        headers={"content-type": "multipart/form-data; boundary=B", "content-encoding": "gzip"},
    )
    assert response.json()[0]["path"] == "/home/user/m.txt"
    assert (root / "home/user/m.txt").read_bytes() == b"multi"
    cases = [
        ({"content-type": "application/octet-stream", "content-encoding": "gzip"}, b"not gzip"),
        ({"content-type": "application/octet-stream", "content-encoding": "br"}, b"x"),
        ({"content-type": "text/plain"}, b"x"),
        ({}, b"x"),
    ]
    for headers, content in cases:
        response = httpx.post(
            f"{gateway.url}/files", params={"path": "bad"}, content=content, headers=headers
        )
        assert response.status_code == 400, headers
        assert response.json()["code"] == 400
    assert not (root / "home/user/bad").exists()
    response = httpx.post(
        f"{gateway.url}/files", content=b"x", headers={"content-type": "application/octet-stream"}
    )
    assert response.json() == {
        "code": 400,
        "message": "path query parameter is required for raw body upload",
    }
    response = httpx.post(
        f"{gateway.url}/files", params={"path": "same"}, files=_multipart(("a", b"1"), ("b", b"2"))
    )
    assert response.status_code == 400
    assert "multiple files to the same path '/home/user/same'" in response.json()["message"]
    assert (root / "home/user/same").read_bytes() == b"1"  # the first stays written
    (root / "home/user/adir").mkdir()
    response = httpx.post(
        f"{gateway.url}/files",
        params={"path": "adir"},
        content=b"x",
        headers={"content-type": "application/octet-stream"},
    )
    assert response.json() == {"code": 400, "message": "path is a directory: /home/user/adir"}


def test_upload_metadata(gateway: RunningGateway, root: Path) -> None:
    def put(headers: dict[str, str | bytes]) -> httpx.Response:
        raw = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()]
        return httpx.post(
            f"{gateway.url}/files",
            params={"path": "meta.txt"},
            content=b"m",
            headers=[(b"content-type", b"application/octet-stream"), *raw],
        )

    response = put({"X-Metadata-Author": "me", "x-metadata-kind": "note"})
    assert response.json()[0]["metadata"] == {"author": "me", "kind": "note"}
    f = root / "home/user/meta.txt"
    assert os.getxattr(f, "user.e2b.author") == b"me"
    response = put({"X-Metadata-Kind": "other"})
    assert response.json()[0]["metadata"] == {"kind": "other"}
    assert "user.e2b.author" not in os.listxattr(f)
    response = put({})
    assert "metadata" not in response.json()[0]
    response = put({"X-Metadata-Bad": "caf\u00e9".encode()})
    assert response.status_code == 400
    assert response.json()["message"].startswith("invalid metadata")
    assert put({"X-Metadata-Big": "v" * 4100}).status_code == 400


def test_download(gateway: RunningGateway, root: Path) -> None:
    data = b"line\n" * 1000
    (root / "home/user/t.txt").write_bytes(data)
    (root / "home/user/blob").write_bytes(b"\x00\x01\x02")
    response = httpx.get(
        f"{gateway.url}/files", params={"path": "t.txt"}, headers={"accept-encoding": "identity"}
    )
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-disposition"] == "inline; filename=t.txt"
    assert response.headers["content-length"] == str(len(data))
    assert "content-encoding" not in response.headers
    blob = httpx.get(f"{gateway.url}/files", params={"path": "blob"})
    assert blob.headers["content-type"] == "application/octet-stream"
    with httpx.Client() as client:
        raw = client.get(
            f"{gateway.url}/files",
            params={"path": "~/t.txt"},
            headers={"accept-encoding": "gzip"},
        )
        assert raw.headers["content-encoding"] == "gzip"
        assert raw.content == data  # httpx decodes it
    response = httpx.get(
        f"{gateway.url}/files", params={"path": "t.txt"}, headers={"range": "bytes=5-9"}
    )
    assert (response.status_code, response.content) == (206, b"line\n")
    assert response.headers["content-range"] == f"bytes 5-9/{len(data)}"
    response = httpx.get(
        f"{gateway.url}/files", params={"path": "t.txt"}, headers={"range": "bytes=99999-"}
    )
    assert response.status_code == 416
    response = httpx.get(
        f"{gateway.url}/files",
        params={"path": "t.txt"},
        headers={"accept-encoding": "gzip;q=0, identity;q=0"},
    )
    assert response.status_code == 406


def test_download_errors(gateway: RunningGateway) -> None:
    response = httpx.get(f"{gateway.url}/files", params={"path": "missing"})
    assert response.status_code == 404
    assert response.json() == {"code": 404, "message": "path '/home/user/missing' does not exist"}
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    response = httpx.get(f"{gateway.url}/files", params={"path": "/home"})
    assert response.json() == {"code": 400, "message": "path '/home' is a directory"}
    response = httpx.get(f"{gateway.url}/files", params={"path": "x", "username": "ghost"})
    assert response.json() == {
        "code": 401,
        "message": "error looking up user 'ghost': user: unknown user ghost",
    }
    response = httpx.get(f"{gateway.url}/files", params={"path": "~ghost/x"})
    assert response.status_code == 400


def test_upload_is_never_visible_half_written(gateway: RunningGateway, root: Path) -> None:
    target = root / "home/user/big.bin"
    target.write_bytes(b"old content")
    halfway = threading.Event()
    resume = threading.Event()
    chunk = os.urandom(256 * 1024)

    def body() -> Iterator[bytes]:
        for i in range(16):
            if i == 8:
                halfway.set()
                resume.wait(30)
            yield chunk

    result: list[httpx.Response] = []
    uploader = threading.Thread(
        target=lambda: result.append(
            httpx.post(
                f"{gateway.url}/files",
                params={"path": "big.bin"},
                content=body(),
                headers={"content-type": "application/octet-stream"},
                timeout=60,
            )
        )
    )
    uploader.start()
    assert halfway.wait(30)
    time.sleep(0.3)  # let the gateway write what it has received
    assert target.read_bytes() == b"old content"
    assert [p.name for p in target.parent.iterdir() if "coppice-upload" in p.name]
    resume.set()
    uploader.join(60)
    assert result[0].status_code == 200
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(chunk * 16).digest()
    assert not [p for p in target.parent.iterdir() if "coppice-upload" in p.name]


def test_signed_urls_and_tokens(tmp_path: Path) -> None:
    a = make_sandbox(tmp_path / "a", access_token=TOKEN)
    b = make_sandbox(tmp_path / "b", access_token="token-of-b")
    (tmp_path / "a/home/user/s.txt").write_text("signed")
    with start_gateway(StaticLookup([a, b])) as gw:
        on_a = {"e2b-sandbox-id": "a"}

        def get(params: dict[str, str], **headers: str) -> httpx.Response:
            return httpx.get(f"{gw.url}/files", params=params, headers={**on_a, **headers})

        signature = file_signature("s.txt", "read", "", TOKEN, None)
        assert get({"path": "s.txt", "signature": signature}).text == "signed"
        assert get({"path": "s.txt"}, **{"x-access-token": TOKEN}).text == "signed"
        expires = int(time.time()) + 60
        signature = file_signature("s.txt", "read", "user", TOKEN, expires)
        params = {"path": "s.txt", "username": "user", "signature": signature}
        assert get({**params, "signature_expiration": str(expires)}).text == "signed"
        old = int(time.time()) - 1
        expired = {**params, "signature": file_signature("s.txt", "read", "user", TOKEN, old)}
        failures = {
            "missing signature query parameter": get({"path": "s.txt"}),
            "invalid signature": get({"path": "s.txt", "signature": "v1_nope"}),
            "signature is already expired": get({**expired, "signature_expiration": str(old)}),
            "access token present in header but does not match": get(
                {"path": "s.txt"}, **{"x-access-token": "token-of-b"}
            ),
        }
        for message, response in failures.items():
            assert response.json() == {"code": 401, "message": message}
        # A write signature is not a read signature, and b's token does not open a.
        write_sig = file_signature("s.txt", "write", "", TOKEN, None)
        assert get({"path": "s.txt", "signature": write_sig}).status_code == 401
        response = httpx.post(
            f"{gw.url}/files",
            params={"path": "up.txt", "signature": write_sig.replace("s.txt", "x")},
            headers={**on_a, "content-type": "application/octet-stream"},
            content=b"u",
        )
        assert response.status_code == 401
        up_sig = file_signature("up.txt", "write", "", TOKEN, None)
        response = httpx.post(
            f"{gw.url}/files",
            params={"path": "up.txt", "signature": up_sig},
            headers={**on_a, "content-type": "application/octet-stream"},
            content=b"u",
        )
        assert response.status_code == 200
        assert (tmp_path / "a/home/user/up.txt").read_bytes() == b"u"
        other = httpx.get(
            f"{gw.url}/files",
            params={"path": "s.txt"},
            headers={"e2b-sandbox-id": "b", "x-access-token": TOKEN},
        )
        assert other.status_code == 401


def test_files_list(gateway: RunningGateway, root: Path) -> None:
    (root / "root/only-in-a").write_text("a")
    response = httpx.get(
        f"{gateway.url}/files/list", params={"path": "/root"}, headers={"accept": "*/*"}
    )
    assert response.status_code == 200
    (entry,) = response.json()["entries"]
    assert (entry["name"], entry["path"], entry["type"]) == (
        "only-in-a",
        "/root/only-in-a",
        "FILE_TYPE_FILE",
    )
    assert httpx.get(f"{gateway.url}/files/list", params={"path": "/nope"}).status_code == 404


def test_client_gone_mid_upload_loses_nothing(gateway: RunningGateway, root: Path) -> None:
    target = root / "home/user/keep.txt"
    target.write_bytes(b"original")
    with socket.create_connection(("127.0.0.1", gateway.port)) as conn:
        conn.sendall(
            b"POST /files?path=keep.txt HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 4000000\r\n\r\n"
            + bytes(1_500_000)
        )
        deadline = time.monotonic() + 10
        while not _uploads_in(target.parent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _uploads_in(target.parent)  # the upload was under way
    deadline = time.monotonic() + 10
    while _uploads_in(target.parent) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _uploads_in(target.parent)
    assert target.read_bytes() == b"original"
    assert httpx.get(f"{gateway.url}/files", params={"path": "keep.txt"}).text == "original"


def _uploads_in(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if "coppice-upload" in p.name]
