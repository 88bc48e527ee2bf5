"""The code-interpreter API (port label 49999): `/execute`, `/contexts`, `/health`.

Wire-compatible with E2B's code-interpreter server (envd-contract §5): `/execute` streams one JSON
object per line, the last one `{"type": "end_of_execution"}`. The contexts (contexts.py) live in
the routed sandbox's jail; the default python context's kernel starts when the sandbox is
announced with `sandbox_started` (or first seen), so the first `run_code` pays only what is left
of that start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
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
from coppice_envd.interpreter.contexts import (
    Execution,
    HTTPError,
    SandboxContexts,
    cancel_background_tasks,
    run_in_background,
)
from coppice_envd.interpreter.kernels import KernelStartError
from coppice_envd.permissions.auth import token_matches
from coppice_envd.request import current_sandbox
from coppice_envd.rpc.streams import Keepalive, paced
from coppice_envd.sandboxes import SandboxStates, SandboxView, StateKind

log = logging.getLogger(__name__)


KEEPALIVE_SECONDS = 5.0  # as upstream: silence longer than this gets a keepalive line
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def normalize_language(language: str | None) -> str:
    if not language:
        return "python"
    language = language.strip().lower()
    return {"js": "javascript", "ts": "typescript"}.get(language, language)


def _valid_env_name(name: str) -> bool:
    return bool(name) and name.replace("_", "a").isalnum() and not name[0].isdigit()


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

    The gateway calls it with the request's sandbox bound (`request.current_sandbox()`). The
    composition root calls `sandbox_started` when a sandbox's jail starts (to warm its default
    python kernel) and `close` at shutdown (the gateway's lifespan does too). All on the
    gateway's event loop. Contexts belong to `sandboxes` (the gateway's, once `build_gateway` is
    given this app), per sandbox id and Jail object: they close with the sandbox's other state
    when it stops (not on a freezing pause: the kernels keep their state through it), and a new
    Jail for the same id (a resume that had to start one) starts over. Kernels of a jail that
    ended unannounced are noticed and forgotten.
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

    async def close(self) -> None:
        """Stop every kernel (the gateway's lifespan shutdown calls this too; twice is fine)."""
        if self._zmq.closed:
            return
        await self.sandboxes.aclose()
        await cancel_background_tasks()
        self._zmq.destroy(linger=0)

    async def contexts(self, view: SandboxView) -> SandboxContexts:
        """The sandbox's contexts (HTTPError 500 without its default python context); on first
        sight, the default contexts come first (python's, then the other installed languages')."""
        contexts = self.sandboxes.get(view, self._contexts_kind)
        try:
            await contexts.ensure_defaults()
        except KernelStartError as err:  # e.g. no such default user
            raise HTTPError(500, str(err)) from None
        return contexts

    def _new_contexts(self, view: SandboxView) -> SandboxContexts:
        contexts = SandboxContexts(view, self._zmq, self._jail_gone)
        run_in_background(self._warm_up(contexts))
        return contexts

    def _jail_gone(self, contexts: SandboxContexts) -> None:
        self.sandboxes.discard(contexts.view.sandbox_id, self._contexts_kind, contexts)
        run_in_background(contexts.close())

    async def _warm_up(self, contexts: SandboxContexts) -> None:
        try:
            await contexts.ensure_defaults()
            if "python" not in contexts.defaults:
                return  # a template without ipykernel (base): nothing to warm, nothing to log
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
        execution = Execution()
        # The run holds the context's lock until the kernel has settled, even after we return.
        run_in_background(context.run(execution, request.code, request.env_vars))
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
    execution: Execution, disconnect: asyncio.Task[None], send: Send
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
