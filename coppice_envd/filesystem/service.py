"""The envd `filesystem.Filesystem` Connect service (envd-contract §2).

Every RPC resolves its paths for the request's effective user (§1.3), then acts through the
routed sandbox's `ConfinedRoot`, in a thread. Errors carry the codes and messages SDKs branch on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import secrets
import stat
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from filesystem import filesystem_pb2 as fs

from coppice_envd.filesystem import ops as fsops
from coppice_envd.filesystem.entryinfo import entry_info, walk_entries
from coppice_envd.filesystem.watch import DirectoryWatch, WatchError
from coppice_envd.permissions.accounts import Accounts
from coppice_envd.permissions.paths import PathExpansionError, expand_and_resolve
from coppice_envd.request import RequestScope, current_request, unknown_user_unauthenticated
from coppice_envd.rpc.streams import Keepalive, keepalive_interval, paced, rpc_deadline
from coppice_envd.sandboxes import SandboxStates, SandboxView, StateKind
from coppice_jails.confined import ConfinedRoot
from coppice_jails.runtime.base import User

_T = TypeVar("_T")

_WATCHER_ID_ALPHABET = string.ascii_lowercase + string.digits


def go_error(op: str, path: str, error: OSError) -> str:
    """An OSError worded like Go's *PathError: `lstat /x: no such file or directory`."""
    text = os.strerror(error.errno) if error.errno else str(error)
    return f"{op} {path}: {text[:1].lower()}{text[1:]}"


@dataclass
class Operation:
    """What a blocking filesystem call gets: the sandbox root, user and path resolution."""

    root: ConfinedRoot
    user: User
    scope: RequestScope

    def resolve(self, path: str) -> str:
        try:
            return expand_and_resolve(path, self.user, self.scope.sandbox.default_workdir)
        except PathExpansionError as e:
            raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from e

    def accounts(self) -> Accounts:
        return self.scope.accounts_sync(self.root)


async def run_operation(work: Callable[[Operation], _T]) -> _T:
    """Run `work` in a thread against the current request's sandbox."""
    scope = current_request()

    def in_thread() -> _T:
        with scope.sandbox.jail.open_root() as root:
            with unknown_user_unauthenticated():
                user = scope.user_sync(root)
            return work(Operation(root=root, user=user, scope=scope))

    return await asyncio.to_thread(in_thread)


def _stat_entry(op: Operation, path: str) -> fs.EntryInfo:
    try:
        return entry_info(op.root, path, op.accounts())
    except FileNotFoundError as e:
        raise ConnectError(Code.NOT_FOUND, "file not found: " + go_error("lstat", path, e)) from e
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error getting file info: " + go_error("lstat", path, e)
        ) from e


def _stat(op: Operation, path: str) -> fs.StatResponse:
    return fs.StatResponse(entry=_stat_entry(op, op.resolve(path)))


def _list_dir(op: Operation, path: str, depth: int) -> fs.ListDirResponse:
    requested = op.resolve(path)
    try:
        dir_fd = op.root.open(requested, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as e:
        raise ConnectError(
            Code.NOT_FOUND, "path not found: " + go_error("lstat", requested, e)
        ) from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConnectError(
                Code.FAILED_PRECONDITION, f'cyclic symlink or chain >255 links at "{requested}"'
            ) from e
        if e.errno == errno.ENOTDIR:
            try:
                resolved = op.root.resolve(requested)
            except OSError:
                resolved = requested
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {resolved}") from e
        raise ConnectError(
            Code.INTERNAL, "error resolving path: " + go_error("lstat", requested, e)
        ) from e
    try:
        entries = list(walk_entries(op.root, dir_fd, requested, max(depth, 1), op.accounts()))
    except OSError as e:
        raise ConnectError(Code.INTERNAL, f"error reading directory {requested}: {e}") from e
    finally:
        os.close(dir_fd)
    return fs.ListDirResponse(entries=entries)


def _make_dir(op: Operation, path: str) -> fs.MakeDirResponse:
    resolved = op.resolve(path)
    try:
        fd = op.root.open(resolved, os.O_PATH)
    except FileNotFoundError:
        fd = -1
    except NotADirectoryError:
        fd = -1  # a file on the way: mkdir -p below says which
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error getting file info: " + go_error("stat", resolved, e)
        ) from e
    if fd >= 0:
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        if is_dir:
            raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {resolved}")
        raise ConnectError(
            Code.INVALID_ARGUMENT, f"path already exists but it is not a directory: {resolved}"
        )
    try:
        fsops.make_dirs(op.root, resolved, op.user)
    except fsops.NotADirectoryComponent as e:
        raise ConnectError(Code.INTERNAL, e.strerror or str(e)) from e
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error creating directory: " + go_error("mkdir", resolved, e)
        ) from e
    return fs.MakeDirResponse(entry=_stat_entry(op, resolved))


def _move(op: Operation, source: str, destination: str) -> fs.MoveResponse:
    src, dst = op.resolve(source), op.resolve(destination)
    try:
        fsops.make_dirs(op.root, posixpath.dirname(posixpath.normpath(dst)), op.user)
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, f"error creating destination directory: {e.strerror}"
        ) from e
    try:
        fsops.rename(op.root, src, dst)
    except FileNotFoundError as e:
        raise ConnectError(
            Code.NOT_FOUND, "source file not found: " + go_error("rename", f"{src} {dst}", e)
        ) from e
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error renaming: " + go_error("rename", f"{src} {dst}", e)
        ) from e
    return fs.MoveResponse(entry=_stat_entry(op, dst))


def _remove(op: Operation, path: str) -> fs.RemoveResponse:
    resolved = op.resolve(path)
    try:
        fsops.remove_tree(op.root, resolved)
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error removing file or directory: " + go_error("remove", resolved, e)
        ) from e
    return fs.RemoveResponse()


def _open_watch(op: Operation, path: str, recursive: bool, include_entry: bool) -> DirectoryWatch:
    resolved = op.resolve(path)
    try:
        fd = op.root.open(resolved, os.O_PATH)
    except FileNotFoundError as e:
        raise ConnectError(
            Code.NOT_FOUND, f"path {resolved} not found: " + go_error("stat", resolved, e)
        ) from e
    except OSError as e:
        raise ConnectError(
            Code.INTERNAL, "error getting file info: " + go_error("stat", resolved, e)
        ) from e
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not is_dir:
        raise ConnectError(Code.INVALID_ARGUMENT, f"path {resolved} not a directory")
    # envd refuses network filesystems here; sandbox roots on zfs-fuse are local storage seen
    # through FUSE, so no filesystem type is refused.
    try:
        return DirectoryWatch.open_sync(
            op.root, resolved, recursive=recursive, include_entry=include_entry
        )
    except OSError as e:
        raise ConnectError(Code.INTERNAL, f"error setting up watcher: {e}") from e


LEGACY_USER_AGENT = "connect-python"
_Trimmable = TypeVar(
    "_Trimmable",
    fs.StatResponse,
    fs.MakeDirResponse,
    fs.MoveResponse,
    fs.ListDirResponse,
    fs.WatchDirResponse,
    fs.GetWatcherEventsResponse,
)


def _trimmed(ctx: RequestContext[Any, Any], response: _Trimmable) -> _Trimmable:
    """envd's answer to SDKs old enough to send `User-Agent: connect-python` (§2.10): entries
    carry only name, type and path, events only name and type."""
    if ctx.request_headers.get("user-agent") != LEGACY_USER_AGENT:
        return response
    ctx.response_headers["x-e2b-legacy-sdk"] = "true"
    entries: list[fs.EntryInfo] = []
    events: list[fs.FilesystemEvent] = []
    if isinstance(response, fs.ListDirResponse):
        entries = list(response.entries)
    elif isinstance(response, fs.GetWatcherEventsResponse):
        events = list(response.events)
    elif isinstance(response, fs.WatchDirResponse):
        events = [response.filesystem] if response.HasField("filesystem") else []
    elif response.HasField("entry"):
        entries = [response.entry]
    for entry in entries:
        entry.CopyFrom(fs.EntryInfo(name=entry.name, type=entry.type, path=entry.path))
    for event in events:
        event.ClearField("entry")
    return response


@dataclass
class _PollingWatcher:
    watch: DirectoryWatch
    events: list[fs.FilesystemEvent] = field(default_factory=list)
    error: str | None = None
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            await self.watch.run(lambda event: self.events.append(event))
        except WatchError as e:
            self.error = str(e)
        finally:
            self.watch.close()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


@dataclass
class _PollingWatchers:
    """A sandbox's CreateWatcher watchers by id (other sandboxes' ids are unknown here)."""

    by_id: dict[str, _PollingWatcher] = field(default_factory=dict)

    async def close(self) -> None:
        watchers, self.by_id = self.by_id, {}
        for watcher in watchers.values():
            await watcher.stop()


def _no_watchers(sandbox: SandboxView) -> _PollingWatchers:
    return _PollingWatchers()


_WATCHERS = StateKind("polling watchers", _no_watchers)


class FilesystemService:
    """Implements the generated `filesystem_connect.Filesystem` protocol. Its polling watchers
    belong to `sandboxes` (the gateway's, once `build_gateway` is given this service)."""

    def __init__(self) -> None:
        self.sandboxes = SandboxStates()

    def _watchers(self) -> _PollingWatchers:
        return self.sandboxes.get(current_request().sandbox, _WATCHERS)

    async def stat(
        self, request: fs.StatRequest, ctx: RequestContext[fs.StatRequest, fs.StatResponse], /
    ) -> fs.StatResponse:
        return _trimmed(ctx, await run_operation(lambda op: _stat(op, request.path)))

    async def make_dir(
        self,
        request: fs.MakeDirRequest,
        ctx: RequestContext[fs.MakeDirRequest, fs.MakeDirResponse],
        /,
    ) -> fs.MakeDirResponse:
        return _trimmed(ctx, await run_operation(lambda op: _make_dir(op, request.path)))

    async def move(
        self, request: fs.MoveRequest, ctx: RequestContext[fs.MoveRequest, fs.MoveResponse], /
    ) -> fs.MoveResponse:
        response = await run_operation(lambda op: _move(op, request.source, request.destination))
        return _trimmed(ctx, response)

    async def list_dir(
        self,
        request: fs.ListDirRequest,
        ctx: RequestContext[fs.ListDirRequest, fs.ListDirResponse],
        /,
    ) -> fs.ListDirResponse:
        response = await run_operation(lambda op: _list_dir(op, request.path, request.depth))
        return _trimmed(ctx, response)

    async def remove(
        self,
        request: fs.RemoveRequest,
        ctx: RequestContext[fs.RemoveRequest, fs.RemoveResponse],
        /,
    ) -> fs.RemoveResponse:
        return await run_operation(lambda op: _remove(op, request.path))

    async def watch_dir(
        self,
        request: fs.WatchDirRequest,
        ctx: RequestContext[fs.WatchDirRequest, fs.WatchDirResponse],
        /,
    ) -> AsyncIterator[fs.WatchDirResponse]:
        watch = await run_operation(
            lambda op: _open_watch(op, request.path, request.recursive, request.include_entry)
        )
        deadline = rpc_deadline(ctx.timeout_ms)
        queue: asyncio.Queue[fs.FilesystemEvent] = asyncio.Queue()
        runner = asyncio.create_task(watch.run(queue.put_nowait))

        async def next_event() -> fs.FilesystemEvent:
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, runner}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done():
                return getter.result()
            error = runner.exception()
            raise ConnectError(Code.INTERNAL, str(error) if error else "watcher stopped")

        try:
            yield fs.WatchDirResponse(start=fs.WatchDirResponse.StartEvent())
            events = paced(next_event, keepalive_interval(ctx.request_headers), deadline)
            async with contextlib.aclosing(events):
                async for event in events:
                    if event is Keepalive.DUE:
                        yield fs.WatchDirResponse(keepalive=fs.WatchDirResponse.KeepAlive())
                    else:
                        yield _trimmed(ctx, fs.WatchDirResponse(filesystem=event))
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, WatchError):
                await runner
            watch.close()

    async def create_watcher(
        self,
        request: fs.CreateWatcherRequest,
        ctx: RequestContext[fs.CreateWatcherRequest, fs.CreateWatcherResponse],
        /,
    ) -> fs.CreateWatcherResponse:
        watch = await run_operation(
            lambda op: _open_watch(op, request.path, request.recursive, request.include_entry)
        )
        watcher_id = "w" + "".join(secrets.choice(_WATCHER_ID_ALPHABET) for _ in range(20))
        watcher = _PollingWatcher(watch=watch)
        watcher.task = asyncio.create_task(watcher.run())
        self._watchers().by_id[watcher_id] = watcher
        return fs.CreateWatcherResponse(watcher_id=watcher_id)

    def _watcher(self, watcher_id: str) -> _PollingWatcher:
        watcher = self._watchers().by_id.get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {watcher_id} not found")
        return watcher

    async def get_watcher_events(
        self,
        request: fs.GetWatcherEventsRequest,
        ctx: RequestContext[fs.GetWatcherEventsRequest, fs.GetWatcherEventsResponse],
        /,
    ) -> fs.GetWatcherEventsResponse:
        watcher = self._watcher(request.watcher_id)
        if watcher.error is not None:
            raise ConnectError(Code.INTERNAL, watcher.error)
        events, watcher.events = watcher.events, []
        return _trimmed(ctx, fs.GetWatcherEventsResponse(events=events))

    async def remove_watcher(
        self,
        request: fs.RemoveWatcherRequest,
        ctx: RequestContext[fs.RemoveWatcherRequest, fs.RemoveWatcherResponse],
        /,
    ) -> fs.RemoveWatcherResponse:
        watcher = self._watcher(request.watcher_id)
        del self._watchers().by_id[request.watcher_id]
        await watcher.stop()
        return fs.RemoveWatcherResponse()
