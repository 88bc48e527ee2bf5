"""envd's `/files` routes (envd-contract §3.6, §3.7) and the seed's `/files/list`.

Downloads stream from the file, uploads stream into a temporary file that is renamed into place
when complete, so nobody ever sees half a file; nothing is held in memory whole. All file I/O is
confined to the routed sandbox's root and runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import mimetypes
import os
import posixpath
import re
import stat
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from coppice_envd.envd_api.routes import HTTPRequest, Routes
from coppice_envd.filesystem import ops as fsops
from coppice_envd.filesystem.entryinfo import read_metadata, walk_entries
from coppice_envd.http.asgi import (
    ClientDisconnected,
    Send,
    send_body,
    send_error,
    send_json,
    send_response,
    start_response,
)
from coppice_envd.http.multipart import MultipartError, MultipartReader
from coppice_envd.permissions.accounts import Accounts
from coppice_envd.permissions.auth import check_file_access
from coppice_envd.permissions.paths import PathExpansionError, expand_and_resolve
from coppice_envd.request import RequestScope
from coppice_envd.rpc.codecs import message_to_json
from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User

CHUNK = 1024 * 1024
PSEUDO_FILE_LIMIT = 16 * 1024 * 1024  # what a download of a size-0 (pseudo-)file reads at most
_METADATA_HEADER = "x-metadata-"
_METADATA_KEY_LIMIT = 246
_METADATA_TOTAL_LIMIT = 4096
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")


class HTTPFailure(Exception):
    """Ends a `/files` request with envd's JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class FileRequest:
    """A `/files` request past its access check: the sandbox root (open for the request's
    duration) and the user it acts as."""

    request: HTTPRequest
    root: ConfinedRoot
    user: User

    def resolve(self, path: str) -> str:
        try:
            return expand_and_resolve(path, self.user, self.request.scope.sandbox.default_workdir)
        except PathExpansionError as e:
            raise HTTPFailure(400, f"error expanding and resolving path '{path}': {e}") from e


async def _authorize(request: HTTPRequest, operation: str) -> FileRequest:
    """Signature or token check, then the user (`username` or the default user)."""
    raw_expiration = request.param("signature_expiration")
    expiration = None
    if raw_expiration is not None:
        try:
            expiration = int(raw_expiration)
        except ValueError as e:
            raise HTTPFailure(400, "invalid signature_expiration") from e
    username = request.param("username")
    denied = check_file_access(
        request.scope.sandbox.access_token,
        request.headers.get("x-access-token"),
        path=request.param("path") or "",
        operation=operation,
        username=username or "",
        signature=request.param("signature"),
        expiration=expiration,
    )
    if denied is not None:
        raise HTTPFailure(401, denied)
    name = username if username else request.scope.sandbox.default_user
    try:
        root, user = await asyncio.to_thread(_open_as, request.scope, name)
    except OSError as e:  # the jail is gone
        raise HTTPFailure(502, e.strerror or str(e)) from e
    if user is None:
        root.close()
        raise HTTPFailure(401, f"error looking up user '{name}': user: unknown user {name}")
    return FileRequest(request=request, root=root, user=user)


def _open_as(scope: RequestScope, name: str) -> tuple[ConfinedRoot, User | None]:
    """The sandbox's files as its processes see them, and the user `name` there. Blocking."""
    root = scope.sandbox.jail.open_root()
    try:
        return root, scope.accounts_sync(root).user(name)
    except BaseException:
        root.close()
        raise


async def _serve(request: HTTPRequest, send: Send, operation: str, handler: Any) -> None:
    try:
        files = await _authorize(request, operation)
    except HTTPFailure as failure:
        await send_error(send, failure.status, failure.message)
        return
    try:
        await handler(files, send)
    except HTTPFailure as failure:
        await send_error(send, failure.status, failure.message)
    finally:
        files.root.close()


# -- download ---------------------------------------------------------------------------------


def _accepted_encoding(header: str | None, *, identity_only: bool) -> str | None:
    """gzip or identity as Accept-Encoding allows (q-values, `*`); None if neither is."""
    q: dict[str, float] = {}
    for item in (header or "").split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    weight = float(value)
        q[coding] = weight
    star = q.get("*")
    gzip_q = q.get("gzip", star if star is not None else 0.0)
    identity_q = q.get("identity", star if star is not None and star == 0 else 1.0)
    if not identity_only and gzip_q > 0 and gzip_q >= identity_q:
        return "gzip"
    return "identity" if identity_q > 0 else None


def _content_disposition(name: str) -> str:
    if name.isascii() and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        return f"inline; filename={name}"
    if name.isascii():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'inline; filename="{escaped}"'
    return f"inline; filename*=utf-8''{quote(name, safe='')}"


def _content_type(raw_path: str, head: bytes) -> str:
    guessed, _ = mimetypes.guess_type(raw_path, strict=False)
    if guessed:
        return guessed + ("; charset=utf-8" if guessed.startswith("text/") else "")
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text/plain; charset=utf-8"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3:  # a character cut at the sniff window
                return "text/plain; charset=utf-8"
    return "application/octet-stream"


@dataclass(frozen=True)
class _Download:
    fd: int
    size: int
    mtime: float
    head: bytes  # the first bytes, to guess the content type from


def _open_for_download(files: FileRequest, path: str) -> _Download:
    try:
        fd = files.root.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise HTTPFailure(404, f"path '{path}' does not exist") from e
    except OSError as e:
        raise HTTPFailure(500, f"error checking if path exists '{path}': {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise HTTPFailure(400, f"path '{path}' is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise HTTPFailure(400, f"path '{path}' is not a regular file")
        if st.st_size == 0:
            # Pseudo-files (/proc, /sys) say size 0 whatever they hold: serve what reading gives.
            fd, pseudo = -1, fd
            try:
                fd = _read_into_memfd(pseudo)  # closes `pseudo`, even when it raises
            except OSError as e:  # e.g. EIO from /proc/<pid>/mem
                raise HTTPFailure(500, f"error reading file '{path}': {e.strerror}") from e
        size = os.fstat(fd).st_size
        return _Download(fd, size, st.st_mtime, os.pread(fd, 512, 0))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _read_into_memfd(fd: int) -> int:
    """A memfd holding what reading `fd` to its end gives (at most PSEUDO_FILE_LIMIT bytes);
    `fd` is closed."""
    copy = -1
    try:
        copy = os.memfd_create("download", os.MFD_CLOEXEC)
        total = 0
        while total < PSEUDO_FILE_LIMIT:
            try:
                data = os.read(fd, min(CHUNK, PSEUDO_FILE_LIMIT - total))
            except BlockingIOError:
                break  # a file that waits for more (/proc/kmsg): what is there so far
            if not data:
                break
            os.write(copy, data)
            total += len(data)
        return copy
    except BaseException:
        if copy >= 0:
            os.close(copy)
        raise
    finally:
        os.close(fd)


def _single_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range; ValueError if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # not a single byte range: serve the whole file
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    if not first:
        length = int(last)
        if length <= 0:
            raise ValueError("unsatisfiable")
        return max(0, size - length), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise ValueError("unsatisfiable")
    return start, end


async def _download(files: FileRequest, send: Send) -> None:
    request = files.request
    raw_path = request.param("path") or ""
    path = files.resolve(raw_path)
    opened = await asyncio.to_thread(_open_for_download, files, path)
    fd, size = opened.fd, opened.size
    try:
        conditional = any(
            h in request.headers
            for h in ("range", "if-modified-since", "if-none-match", "if-range")
        )
        encoding = _accepted_encoding(
            request.headers.get("accept-encoding"), identity_only=conditional
        )
        if encoding is None:
            raise HTTPFailure(
                406,
                "error parsing Accept-Encoding: no acceptable encoding found, supported: [gzip]",
            )
        headers = [
            ("vary", "Accept-Encoding"),
            ("content-disposition", _content_disposition(posixpath.basename(path))),
            ("last-modified", email.utils.formatdate(opened.mtime, usegmt=True)),
        ]
        if encoding == "gzip":
            guessed = mimetypes.guess_type(raw_path, strict=False)[0]
            headers += [
                ("content-encoding", "gzip"),
                ("content-type", guessed or "application/octet-stream"),
            ]
            await _stream(send, 200, headers, fd, 0, size, gzip=True)
            return
        start, end, status = 0, size, 200
        headers += [
            ("accept-ranges", "bytes"),
            ("content-type", _content_type(raw_path, opened.head)),
        ]
        if "range" in request.headers:
            try:
                byte_range = _single_range(request.headers["range"], size)
            except ValueError:
                await send_response(send, 416, headers=[("content-range", f"bytes */{size}")])
                return
            if byte_range is not None:
                start, end = byte_range
                status = 206
                headers.append(("content-range", f"bytes {start}-{end - 1}/{size}"))
        headers.append(("content-length", str(end - start)))
        await _stream(send, status, headers, fd, start, end, gzip=False)
    finally:
        os.close(fd)


async def _stream(
    send: Send,
    status: int,
    headers: list[tuple[str, str]],
    fd: int,
    start: int,
    end: int,
    *,
    gzip: bool,
) -> None:
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None

    def read_piece(offset: int) -> tuple[bytes, int]:
        """(bytes to send, file bytes consumed) for the chunk at `offset`."""
        length = min(CHUNK, end - offset)
        data = os.pread(fd, length, offset) if length > 0 else b""
        if compressor is None:
            return data, len(data)
        body = compressor.compress(data)
        if not data or offset + len(data) >= end:
            body += compressor.flush()
        return body, len(data)

    await start_response(send, status, headers)
    offset = start
    while True:
        body, consumed = await asyncio.to_thread(read_piece, offset)
        offset += consumed
        last = offset >= end or consumed == 0  # consumed 0: the file shrank meanwhile
        await send_body(send, body, more=not last)
        if last:
            return


async def download(request: HTTPRequest, send: Send) -> None:
    await _serve(request, send, "read", _download)


# -- upload -----------------------------------------------------------------------------------


def upload_metadata(headers: dict[str, str]) -> dict[str, str]:
    """`X-Metadata-<Key>` headers → metadata (keys lower-cased), validated as envd does."""
    metadata = {
        name[len(_METADATA_HEADER) :].lower(): value
        for name, value in headers.items()
        if name.startswith(_METADATA_HEADER)
    }
    total = 0
    for key, value in metadata.items():
        if not key or len(key.encode()) > _METADATA_KEY_LIMIT:
            raise HTTPFailure(400, f"invalid metadata: key '{key}' must be 1-246 bytes")
        if not _PRINTABLE.match(key) or not _PRINTABLE.match(value):
            raise HTTPFailure(400, f"invalid metadata: '{key}' must be printable ASCII")
        total += 9 + len(key) + len(value)
    if total > _METADATA_TOTAL_LIMIT:
        raise HTTPFailure(400, "invalid metadata: larger than 4096 bytes")
    return metadata


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            data = chunk
            # Bounded steps: a small compressed chunk can expand a lot.
            while data:
                out = decompressor.decompress(data, CHUNK)
                data = decompressor.unconsumed_tail
                if out:
                    yield out
            if decompressor.eof and decompressor.unused_data:
                raise HTTPFailure(400, "error decompressing request body: trailing data")
        if not decompressor.eof:
            raise HTTPFailure(400, "error decompressing request body: unexpected EOF")
    except zlib.error as e:
        raise HTTPFailure(400, f"error decompressing request body: {e}") from e


def _os_failure(error: OSError, path: str) -> HTTPFailure:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return HTTPFailure(507, "not enough disk space available")
    if isinstance(error, fsops.TargetIsDirectory):
        return HTTPFailure(400, f"path is a directory: {path}")
    if isinstance(error, fsops.NotADirectoryComponent):
        return HTTPFailure(500, f"error creating parent directories: {error.strerror}")
    return HTTPFailure(500, f"error writing file '{path}': {error.strerror or error}")


async def _write_file(
    files: FileRequest, path: str, data: AsyncIterator[bytes], metadata: dict[str, str]
) -> dict[str, Any]:
    """Stream `data` into `path` (in the root) as the user; never visible half-written."""
    try:
        pending = await asyncio.to_thread(fsops.begin_upload, files.root, path, files.user)
    except OSError as e:
        raise _os_failure(e, path) from e
    # One batch is written in a thread while the next one is received.
    writing: asyncio.Future[None] | None = None
    try:
        batch: list[bytes] = []
        batched = 0
        async for chunk in data:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= CHUNK:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(pending.write, batch))
                batch, batched = [], 0
        if writing is not None:
            await writing
        if batch:
            await asyncio.to_thread(pending.write, batch)
        await asyncio.to_thread(pending.commit, metadata)
    except BaseException as e:
        if writing is not None:
            # Its error (if any) is this one or moot; abort() waits for its thread to finish.
            writing.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.to_thread(pending.abort)
        if isinstance(e, OSError):
            raise _os_failure(e, path) from e
        raise
    written = await asyncio.to_thread(_read_back_metadata, files.root, path)
    info: dict[str, Any] = {"path": path, "name": posixpath.basename(path), "type": "file"}
    if written:
        info["metadata"] = written
    return info


def _read_back_metadata(root: ConfinedRoot, path: str) -> dict[str, str]:
    try:
        fd = root.open(path, os.O_PATH)
    except OSError:
        return {}
    try:
        return read_metadata(fd)
    finally:
        os.close(fd)


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    media, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        key, eq, value = item.strip().partition("=")
        if eq:
            params[key.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), params


async def _upload(files: FileRequest, send: Send) -> None:
    request = files.request
    body: AsyncIterator[bytes] = request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        body = _gunzip(body)
    elif encoding not in ("", "identity"):
        raise HTTPFailure(
            400, f"error decompressing request body: unsupported Content-Encoding: {encoding}"
        )
    metadata = upload_metadata(request.headers)
    content_type = request.headers.get("content-type", "")
    media, params = _media_type(content_type)
    query_path = request.param("path")
    written: list[dict[str, Any]] = []
    if media == "application/octet-stream":
        if not query_path:
            raise HTTPFailure(400, "path query parameter is required for raw body upload")
        written.append(await _write_file(files, files.resolve(query_path), body, metadata))
    elif media.startswith("multipart/"):
        seen: set[str] = set()
        try:
            async for part in MultipartReader(body, params.get("boundary", "")).parts():
                if part.form_name != "file":
                    continue
                target = query_path or part.filename
                if not target:
                    raise HTTPFailure(400, "the file part has no filename and no path was given")
                path = files.resolve(target)
                if path in seen:
                    raise HTTPFailure(
                        400,
                        f"you cannot upload multiple files to the same path '{path}' in one "
                        "upload request, only the first specified file was uploaded",
                    )
                seen.add(path)
                written.append(await _write_file(files, path, part.data(), metadata))
        except MultipartError as e:
            raise HTTPFailure(500, f"error parsing multipart form: {e}") from e
    else:
        raise HTTPFailure(
            400,
            f"unsupported content type: {content_type}, "
            "expected multipart/form-data or application/octet-stream",
        )
    await send_json(send, 200, written)


async def upload(request: HTTPRequest, send: Send) -> None:
    # A client that goes away gets no answer; its unfinished file was never renamed into place.
    with contextlib.suppress(ClientDisconnected):
        await _serve(request, send, "write", _upload)


# -- the seed's /files/list -------------------------------------------------------------------


def _list(files: FileRequest, path: str) -> list[dict[str, Any]]:
    try:
        dir_fd = files.root.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as e:
        raise HTTPFailure(404, f"path '{path}' does not exist") from e
    except NotADirectoryError as e:
        raise HTTPFailure(400, f"path '{path}' is not a directory") from e
    try:
        accounts = Accounts.read(files.root)
        return [
            message_to_json(entry) for entry in walk_entries(files.root, dir_fd, path, 1, accounts)
        ]
    finally:
        os.close(dir_fd)


async def _list_files(files: FileRequest, send: Send) -> None:
    path = files.resolve(files.request.param("path") or "")
    entries = await asyncio.to_thread(_list, files, path)
    await send_json(send, 200, {"entries": entries})


async def list_files(request: HTTPRequest, send: Send) -> None:
    """`GET /files/list?path=…` → `{"entries": [EntryInfo JSON, ...]}` (needs the token)."""
    await _serve(request, send, "read", _list_files)


def add_routes(routes: Routes) -> None:
    routes.add("GET", "/files", download)
    routes.add("POST", "/files", upload)
    routes.add("GET", "/files/list", list_files)
