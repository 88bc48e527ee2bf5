"""The code-interpreter API (port label 49999): `/execute`, `/contexts`, `/health`.

Wire-compatible with E2B's code-interpreter server (envd-contract §5): `/execute` streams one JSON
object per line, the last one `{"type": "end_of_execution"}`. A context is a kernel (kernels.py)
in the routed sandbox's jail; the default python context's kernel starts when the sandbox is
announced with `sandbox_started` (or first seen), so the first `run_code` pays only what is left
of that start.

Executions on one context run one at a time, in arrival order. A client that goes away (or an
SDK timeout, which closes the connection) interrupts its execution; if the kernel does not settle
within INTERRUPT_GRACE it is replaced, so the next call is never stuck behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import zmq
import zmq.asyncio

from coppice_envd.http.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    read_body,
    request_headers,
    send_body,
    send_response,
    serve_lifespan,
    start_response,
)
from coppice_envd.interpreter.kernels import (
    LANGUAGES,
    Kernel,
    KernelDied,
    KernelLanguage,
    KernelStartError,
    Message,
)
from coppice_envd.permissions.auth import token_matches
from coppice_envd.request import RequestScope, current_sandbox
from coppice_envd.rpc.streams import Keepalive, paced
from coppice_envd.sandboxes import SandboxStates, SandboxView, StateKind
from coppice_jails.runtime.base import Jail, User
from coppice_jails.users import UnknownUser

log = logging.getLogger(__name__)


KEEPALIVE_SECONDS = 5.0  # as upstream: silence longer than this gets a keepalive line
INTERRUPT_GRACE = 5.0  # an interrupted execution that has not ended by then loses its kernel
MAX_REQUEST_BYTES = 64 * 1024 * 1024

_MIME_KEYS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "text/latex": "latex",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


class HTTPError(Exception):
    """An error response with a plain-text body, as the upstream server sends them."""

    def __init__(self, status: int, text: str, content_type: str = "text/plain") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.content_type = content_type


def normalize_language(language: str | None) -> str:
    if not language:
        return "python"
    language = language.strip().lower()
    return {"js": "javascript", "ts": "typescript"}.get(language, language)


def _kernel_language(language: str) -> KernelLanguage:
    found = LANGUAGES.get(language)
    if found is None:
        raise KernelStartError(
            f"no {language} kernel in Coppice sandboxes (languages: {', '.join(LANGUAGES)})"
        )
    return found


# -- Jupyter messages to /execute lines ----------------------------------------------------


def _timestamp(msg: Message) -> str:
    date = msg["header"].get("date")
    return date.isoformat() if isinstance(date, datetime) else str(date)


def result_item(data: Mapping[str, Any], *, is_main_result: bool) -> dict[str, Any]:
    """A `result` line from a display_data/execute_result bundle (MIME type → key)."""
    item: dict[str, Any] = {"type": "result"}
    extra: dict[str, Any] = {}
    for mime, value in data.items():
        key = _MIME_KEYS.get(mime)
        if key is None:
            extra[mime] = value
        else:
            item[key] = value
    text = item.get("text")
    # Upstream strips one pair of surrounding quotes: a Python str result reads as its value.
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        item["text"] = text[1:-1]
    item["extra"] = extra
    item["is_main_result"] = is_main_result
    return item


def error_item(name: str, value: str, traceback: str) -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


# -- per-call environment variables ----------------------------------------------------------


def _env_code(language: str, assign: Mapping[str, str], remove: list[str]) -> str:
    """Code that sets `assign` and unsets `remove` in the kernel's environment."""
    if language == "bash":
        lines = [f"export {k}={shlex.quote(v)}" for k, v in assign.items()]
        lines += [f"unset {k}" for k in remove]
        return "\n".join(lines)
    # repr() of str containers is a Python literal for any text (JSON's escapes of emoji are not).
    return (
        f"(lambda e: (e.update({dict(assign)!r}),"
        f" [e.pop(k, None) for k in {list(remove)!r}]))(__import__('os').environ)"
    )


def _valid_env_name(name: str) -> bool:
    return bool(name) and name.replace("_", "a").isalnum() and not name[0].isdigit()


# -- executions ------------------------------------------------------------------------------


class _Execution:
    """One /execute call: the lines it produced so far, and whether its client left."""

    def __init__(self) -> None:
        # ("start", None), ("line", item), ("fail", HTTPError) or ("end", None)
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.abandoned = False
        self.kernel: Kernel | None = None  # while the code runs on a kernel
        self.finished = asyncio.Event()

    def emit(self, item: dict[str, Any]) -> None:
        if not self.abandoned:
            self.events.put_nowait(("line", item))

    def abandon(self) -> None:
        """The client is gone: interrupt the code, and replace the kernel if that fails."""
        self.abandoned = True
        kernel = self.kernel
        if kernel is not None and not self.finished.is_set():
            _background(self._interrupt(kernel))

    async def _interrupt(self, kernel: Kernel) -> None:
        await kernel.interrupt()
        try:
            await asyncio.wait_for(self.finished.wait(), INTERRUPT_GRACE)
        except TimeoutError:
            log.warning("kernel %s ignored an interrupt: replacing it", kernel.kernel_id)
            await kernel.kill()


_background_tasks: set[asyncio.Task[None]] = set()


def _background(coroutine: Awaitable[None]) -> None:
    async def run() -> None:
        try:
            await coroutine
        except Exception:
            log.exception("interpreter background task failed")

    task = asyncio.create_task(run())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


@dataclass
class Context:
    """A code context: a language, a working directory and (while it lives) a kernel."""

    id: str
    language: str
    cwd: str
    sandbox: SandboxContexts
    kernel: Kernel | None = None
    removed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def _ready_kernel(self) -> Kernel:
        """The live kernel, started afresh if there is none (call with the lock held)."""
        if self.kernel is not None and self.kernel.alive:
            return self.kernel
        if self.kernel is not None:
            await self.kernel.kill()
            self.kernel = None
        self.kernel = await self.sandbox.start_kernel(self)
        return self.kernel

    async def ensure_started(self) -> None:
        async with self.lock:
            if self.removed:
                raise HTTPError(404, f"Context {self.id} not found")
            await self._ready_kernel()

    async def restart(self) -> None:
        """A fresh kernel; executions running on the old one end with ContextRestarting."""
        old, self.kernel = self.kernel, None
        if old is not None:
            await old.shutdown()
        await self.ensure_started()

    async def remove(self) -> None:
        self.removed = True
        old, self.kernel = self.kernel, None
        if old is not None:
            await old.shutdown()

    async def run(self, execution: _Execution, code: str, env_vars: Mapping[str, str]) -> None:
        """Run `code` when it is this call's turn, feeding `execution` (never raises)."""
        try:
            async with self.lock:
                if execution.abandoned:
                    return
                if self.removed:
                    execution.events.put_nowait(
                        ("fail", HTTPError(404, f"Context {self.id} not found"))
                    )
                    return
                try:
                    kernel = await self._ready_kernel()
                except KernelStartError as err:
                    execution.events.put_nowait(("fail", HTTPError(500, str(err))))
                    return
                execution.events.put_nowait(("start", None))
                await self._run_on(kernel, execution, code, env_vars)
        except Exception:
            log.exception("execution on context %s failed", self.id)
            execution.emit(error_item("InternalError", "the execution failed in Coppice", ""))
        finally:
            execution.finished.set()
            execution.events.put_nowait(("end", None))

    async def _run_on(
        self, kernel: Kernel, execution: _Execution, code: str, env_vars: Mapping[str, str]
    ) -> None:
        sandbox_env = self.sandbox.view.env_vars
        if env_vars:
            await self._silently(kernel, _env_code(self.language, env_vars, []))
        try:
            if not execution.abandoned:  # the client may leave while the variables are set
                execution.kernel = kernel
                await _stream(kernel, code, execution)
        finally:
            execution.kernel = None
            if env_vars and kernel.alive:
                restore = {k: sandbox_env[k] for k in env_vars if k in sandbox_env}
                gone = [k for k in env_vars if k not in sandbox_env]
                await self._silently(kernel, _env_code(self.language, restore, gone))

    @staticmethod
    async def _silently(kernel: Kernel, code: str) -> None:
        with contextlib.suppress(KernelDied):
            async for _ in kernel.execute(code, silent=True).messages():
                pass


async def _stream(kernel: Kernel, code: str, execution: _Execution) -> None:
    """Run `code` and turn its Jupyter messages into /execute lines."""
    errored = False

    def error(name: str, value: str, traceback: str) -> None:
        nonlocal errored
        if not errored:  # only the first error of an execution is reported, as upstream
            errored = True
            execution.emit(error_item(name, value, traceback))

    reply_error: tuple[str, str, str] | None = None
    try:
        async for msg in kernel.execute(code).messages():
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_input":
                execution.emit(
                    {"type": "number_of_executions", "execution_count": content["execution_count"]}
                )
            elif kind == "stream":
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                execution.emit(
                    {"type": name, "text": content.get("text", ""), "timestamp": _timestamp(msg)}
                )
            elif kind in ("display_data", "execute_result"):
                execution.emit(
                    result_item(content.get("data", {}), is_main_result=kind == "execute_result")
                )
            elif kind == "error":
                error(*_error_fields(content))
            elif kind == "execute_reply" and content["status"] == "error":
                # Replies travel on another channel than the output: report it in order, at the end.
                reply_error = _error_fields(content)
            elif kind == "execute_reply" and content["status"] in ("aborted", "abort"):
                reply_error = ("ExecutionAborted", "Execution was aborted", "")
    except KernelDied as died:
        # As upstream when its kernel restarts; a death Coppice did not ask for says how.
        value = "Context was restarted" if died.stopped else f"Context was restarted: {died}"
        error("ContextRestarting", value, "")
    if reply_error is not None:
        error(*reply_error)


def _error_fields(content: Mapping[str, Any]) -> tuple[str, str, str]:
    traceback = content.get("traceback") or []
    return str(content.get("ename", "")), str(content.get("evalue", "")), "".join(traceback)


# -- contexts of one sandbox -----------------------------------------------------------------


class SandboxContexts:
    """The contexts of one sandbox, in creation order, and its default context per language."""

    def __init__(
        self,
        view: SandboxView,
        zmq_context: zmq.asyncio.Context,
        on_jail_gone: Callable[[SandboxContexts], None],
    ) -> None:
        self.view = view
        self._on_jail_gone = on_jail_gone
        self.jail: Jail = view.jail
        self._zmq = zmq_context
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, Context] = {}
        self._defaults_lock = asyncio.Lock()
        self._user: User | None = None

    async def user(self) -> User:
        """The user kernels run as: the default user, whoever calls (resolved as for a request
        without Basic auth; until found, every call looks again)."""
        if self._user is None:
            try:
                self._user = await RequestScope(self.view, basic_user=None).user()
            except UnknownUser as err:
                raise KernelStartError(str(err)) from None
        return self._user

    async def start_kernel(self, context: Context) -> Kernel:
        user = await self.user()
        base = {**self.view.process_env(user), "SHELL": "/bin/bash", "LANG": "C.UTF-8"}
        env = {**base, **self.view.env_vars}  # the sandbox's own variables still win
        kernel = await Kernel.start(
            self.jail,
            kernel_id=context.id,
            language=_kernel_language(context.language),
            user=user,
            cwd=context.cwd,
            env=env,
            zmq_context=self._zmq,
        )
        kernel.on_exit = self._kernel_exited
        return kernel

    def _kernel_exited(self, kernel: Kernel) -> None:
        _background(self._forget_if_jail_gone())

    async def _forget_if_jail_gone(self) -> None:
        # A kernel also ends with its sandbox (killed without `sandbox_stopped`): forget it then.
        if not await asyncio.to_thread(self.jail.is_alive):
            self._on_jail_gone(self)

    async def default_cwd(self) -> str:
        return self.view.default_workdir or (await self.user()).home

    def new_context(self, language: str, cwd: str) -> Context:
        _kernel_language(language)
        context = Context(id=str(uuid.uuid4()), language=language, cwd=cwd, sandbox=self)
        self.contexts[context.id] = context
        return context

    async def default_context(self, language: str) -> Context:
        """The language's default context, made (without waiting for its kernel) if missing."""
        async with self._defaults_lock:
            context = self.defaults.get(language)
            if context is None or context.removed:
                context = self.new_context(language, await self.default_cwd())
                self.defaults[language] = context
            return context

    async def create(self, language: str, cwd: str | None) -> Context:
        context = self.new_context(language, cwd or await self.default_cwd())
        try:
            await context.ensure_started()
        except KernelStartError:
            self.contexts.pop(context.id, None)
            raise
        return context

    def get(self, context_id: str) -> Context:
        context = self.contexts.get(context_id)
        if context is None:
            raise HTTPError(404, f"Context {context_id} not found")
        return context

    async def remove(self, context_id: str) -> None:
        context = self.get(context_id)
        del self.contexts[context_id]
        await context.remove()

    async def close(self) -> None:
        contexts, self.contexts = list(self.contexts.values()), {}
        self.defaults = {}
        await asyncio.gather(*(c.remove() for c in contexts), return_exceptions=True)


# -- the ASGI app ----------------------------------------------------------------------------


async def _read_body(receive: Receive) -> bytes:
    try:
        return await read_body(receive, MAX_REQUEST_BYTES)
    except ClientDisconnected:
        raise HTTPError(400, "the client went away") from None
    except BodyTooLarge:
        raise HTTPError(413, "request body too large") from None


def _validation_error(location: list[str | int], message: str) -> HTTPError:
    # FastAPI's 422 shape, which is what the upstream server answers bad bodies with.
    detail = [{"loc": ["body", *location], "msg": message, "type": "value_error"}]
    return HTTPError(422, json.dumps({"detail": detail}), "application/json")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise _validation_error([], f"invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise _validation_error([], "expected a JSON object")
    return data


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise _validation_error([key], "expected a string or null")
    return value


@dataclass(frozen=True)
class ExecutionRequest:
    code: str
    context_id: str | None
    language: str | None
    env_vars: dict[str, str]

    @classmethod
    def parse(cls, body: bytes) -> ExecutionRequest:
        data = _json_object(body)
        code = data.get("code")
        if not isinstance(code, str):
            raise _validation_error(["code"], "field required (a string)")
        if "\x00" in code:
            raise _validation_error(["code"], "code cannot contain NUL characters")
        env = data.get("env_vars") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise _validation_error(["env_vars"], "expected an object of strings")
        bad = [k for k in env if not _valid_env_name(k)]
        if bad:
            raise _validation_error(["env_vars"], f"invalid variable name {bad[0]!r}")
        return cls(
            code=code,
            context_id=_optional_str(data, "context_id"),
            language=_optional_str(data, "language"),
            env_vars=env,
        )


class Interpreter:
    """The ASGI app for port 49999 of every sandbox, and the kernels behind it.

    The gateway calls it with the request's sandbox bound (`routing.current_sandbox()`). The
    composition root calls `sandbox_started` when a sandbox's jail starts (to warm its default
    python kernel), `sandbox_stopped` when it is killed (not on a freezing pause: the kernels keep
    their state through it), and `close` at shutdown (the gateway's lifespan does too). All on
    the gateway's event loop. Kernels of a jail that ended without `sandbox_stopped` are noticed
    and forgotten. Contexts belong to `sandboxes` (the gateway's, once `build_gateway` is given
    this app), per sandbox id and Jail object: a new Jail for the same id (a resume that had to
    start one) starts over.
    """

    def __init__(self) -> None:
        self._zmq = zmq.asyncio.Context()
        # A request queued for a kernel that died must not hold up closing its socket.
        self._zmq.setsockopt(zmq.LINGER, 0)
        self.sandboxes = SandboxStates()
        self._contexts_kind = StateKind("code contexts", self._new_contexts)

    # -- lifecycle hooks

    async def sandbox_started(self, view: SandboxView, *, wait: bool = False) -> None:
        """Start the sandbox's default python kernel (in the background unless `wait`).

        Without a python kernel in the sandbox this only logs; requests then answer 500.
        """
        try:
            contexts = await self.contexts(view)
        except HTTPError as err:
            log.info("no python kernel for %s: %s", view.sandbox_id, err.text)
            return
        if wait:
            await self._warm_up(contexts)

    async def sandbox_stopped(self, sandbox_id: str) -> None:
        """Stop the sandbox's kernels and forget its contexts (and all its other state)."""
        await self.sandboxes.closed(sandbox_id)

    async def close(self) -> None:
        """Stop every kernel (the gateway's lifespan shutdown calls this too; twice is fine)."""
        if self._zmq.closed:
            return
        await self.sandboxes.aclose()
        loop = asyncio.get_running_loop()
        leftovers = [t for t in _background_tasks if t.get_loop() is loop]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        self._zmq.destroy(linger=0)

    async def contexts(self, view: SandboxView) -> SandboxContexts:
        """The sandbox's contexts (HTTPError 500 without its default python context); on first
        sight, the default python context comes first."""
        contexts = self.sandboxes.get(view, self._contexts_kind)
        try:
            await contexts.default_context("python")
        except KernelStartError as err:  # e.g. no such default user
            raise HTTPError(500, str(err)) from None
        return contexts

    def _new_contexts(self, view: SandboxView) -> SandboxContexts:
        contexts = SandboxContexts(view, self._zmq, self._jail_gone)
        _background(self._warm_up(contexts))
        return contexts

    def _jail_gone(self, contexts: SandboxContexts) -> None:
        self.sandboxes.discard(contexts.view.sandbox_id, self._contexts_kind, contexts)
        _background(contexts.close())

    async def _warm_up(self, contexts: SandboxContexts) -> None:
        try:
            await (await contexts.default_context("python")).ensure_started()
        except (KernelStartError, HTTPError) as err:
            log.info("no warm python kernel for %s: %s", contexts.view.sandbox_id, err)

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, shutdown=self.close)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if path == "/health" and method == "GET":
                await _send_json(send, 200, "OK")
                return
            sandbox = current_sandbox()
            contexts = await self.contexts(sandbox)
            if path == "/execute" and method == "POST":
                # The SDKs send envd's token on /execute only, so only /execute can demand it.
                if sandbox.access_token is not None and not token_matches(
                    sandbox.access_token, request_headers(scope).get("x-access-token")
                ):
                    raise HTTPError(401, "Unauthorized")
                await self._execute(contexts, receive, send)
            elif path == "/contexts" and method == "POST":
                await self._create_context(contexts, receive, send)
            elif path == "/contexts" and method == "GET":
                await _send_json(send, 200, [c.describe() for c in contexts.contexts.values()])
            elif path.startswith("/contexts/"):
                await self._context_action(contexts, method, path.split("/")[2:], send)
            else:
                raise HTTPError(404, "Not Found")
        except HTTPError as err:
            await _send_error(send, err)

    async def _create_context(
        self, contexts: SandboxContexts, receive: Receive, send: Send
    ) -> None:
        data = _json_object(await _read_body(receive))
        language = normalize_language(_optional_str(data, "language"))
        cwd = _optional_str(data, "cwd")
        try:
            context = await contexts.create(language, cwd)
        except KernelStartError as err:
            raise HTTPError(500, f"Failed to create context: {err}") from None
        await _send_json(send, 200, context.describe())

    async def _context_action(
        self, contexts: SandboxContexts, method: str, parts: list[str], send: Send
    ) -> None:
        if len(parts) == 1 and method == "DELETE":
            await contexts.remove(parts[0])
        elif len(parts) == 2 and parts[1] == "restart" and method == "POST":
            try:
                await contexts.get(parts[0]).restart()
            except KernelStartError as err:
                raise HTTPError(500, f"Failed to restart context {parts[0]}: {err}") from None
        else:
            raise HTTPError(404, "Not Found")
        await _send_json(send, 200, None)

    async def _execute(self, contexts: SandboxContexts, receive: Receive, send: Send) -> None:
        request = ExecutionRequest.parse(await _read_body(receive))
        if request.context_id and request.language:
            raise HTTPError(400, "Only one of context_id or language can be provided")
        if request.context_id:
            context = contexts.get(request.context_id)
        else:
            try:
                context = await contexts.default_context(normalize_language(request.language))
            except KernelStartError as err:
                raise HTTPError(500, str(err)) from None
        execution = _Execution()
        # The run holds the context's lock until the kernel has settled, even after we return.
        _background(context.run(execution, request.code, request.env_vars))
        watcher = asyncio.create_task(_wait_disconnect(receive))
        try:
            await _stream_response(execution, watcher, send)
        finally:
            if not execution.finished.is_set():
                execution.abandon()
            watcher.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream_response(
    execution: _Execution, disconnect: asyncio.Task[None], send: Send
) -> None:
    """Send the execution's lines as they come; what is already queued goes out in one chunk.

    The status line waits for the first lines (the kernel's execute_input follows the start
    within a millisecond): one write and one client wake-up fewer per execution.
    """
    started = headers_sent = False

    async def send_lines(lines: list[Mapping[str, Any]], *, more: bool = True) -> None:
        nonlocal headers_sent
        if not headers_sent:
            await start_response(send, 200)
            headers_sent = True
        body = "".join(json.dumps(line) + "\n" for line in lines).encode()
        await send_body(send, body, more=more)

    async def next_events() -> list[tuple[str, Any]] | None:
        """What the execution queued since the last call; None once the client has left."""
        get = asyncio.ensure_future(execution.events.get())
        try:
            await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        if disconnect.done():
            return None
        events = [get.result()]
        while not execution.events.empty():
            events.append(execution.events.get_nowait())
        return events

    events = paced(next_events, KEEPALIVE_SECONDS)
    async with contextlib.aclosing(events):
        async for batch in events:
            if batch is Keepalive.DUE:
                if started:  # a queued execution is not running yet: nothing to keep alive
                    await send_lines([{"type": "keepalive"}])
                continue
            if batch is None:
                return
            lines: list[Mapping[str, Any]] = []
            for kind, value in batch:
                if kind == "fail":  # only ever before "start"
                    await _send_error(send, value)
                    return
                if kind == "start":
                    started = True
                elif kind == "line":
                    lines.append(value)
                elif kind == "end":
                    if not started:
                        await _send_error(send, HTTPError(500, "the execution did not start"))
                        return
                    lines.append({"type": "end_of_execution"})
                    await send_lines(lines, more=False)
                    return
            if lines:
                await send_lines(lines)


async def _send_json(send: Send, status: int, value: Any) -> None:
    """JSON as the upstream (FastAPI) server writes it."""
    await send_response(
        send, status, json.dumps(value).encode(), [("content-type", "application/json")]
    )


async def _send_error(send: Send, error: HTTPError) -> None:
    await send_response(
        send, error.status, error.text.encode(), [("content-type", error.content_type)]
    )
