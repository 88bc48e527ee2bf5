"""Code contexts: a language, a working directory and a kernel (kernels.py) in one sandbox's
jail, the contexts of each sandbox, and executions turning Jupyter messages into /execute lines.

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

import zmq.asyncio

from coppice_envd.interpreter.kernels import (
    LANGUAGES,
    Kernel,
    KernelDied,
    KernelLanguage,
    KernelStartError,
    Message,
    installed_languages,
)
from coppice_envd.request import RequestScope
from coppice_envd.sandboxes import SandboxView
from coppice_jails.runtime.base import Jail, JailError, User
from coppice_jails.users import UnknownUser

KERNEL_USER = "root"

log = logging.getLogger(__name__)


INTERRUPT_GRACE = 5.0  # an interrupted execution that has not ended by then loses its kernel

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
    """Code that sets `assign` and unsets `remove` in the kernel's environment (for java, as
    upstream: its system properties, `System.getProperty`; a JVM cannot change its environment).
    Names are checked identifiers; values go in as string literals of the language."""
    if language == "bash":
        lines = [f"export {k}={shlex.quote(v)}" for k, v in assign.items()]
        lines += [f"unset {k}" for k in remove]
    elif language in ("javascript", "typescript"):
        # A JSON string is a JavaScript string literal.
        lines = [f"process.env[{json.dumps(k)}] = {json.dumps(v)};" for k, v in assign.items()]
        lines += [f"delete process.env[{json.dumps(k)}];" for k in remove]
        lines.append("void 0;")  # no result: nothing to publish late
    elif language == "r":
        # JSON's escapes are R's too, but not its \uD83D\uDE00 pairs: other characters verbatim.
        lines = [
            f"Sys.setenv(`{k}` = {json.dumps(v, ensure_ascii=False)})" for k, v in assign.items()
        ]
        lines += [f"Sys.unsetenv({json.dumps(k)})" for k in remove]
        lines.append("invisible()")
    elif language == "java":
        # ASCII JSON: Java reads \uXXXX (and surrogate pairs) as JSON does, and JSON never
        # escapes a quote, backslash or line break that way (Java would unescape them first).
        lines = [
            f"System.setProperty({json.dumps(k)}, {json.dumps(v)});" for k, v in assign.items()
        ]
        lines += [f"System.clearProperty({json.dumps(k)});" for k in remove]
    else:
        # repr() of str containers is a Python literal for any text (JSON's escapes of emoji
        # are not).
        return (
            f"(lambda e: (e.update({dict(assign)!r}),"
            f" [e.pop(k, None) for k in {list(remove)!r}]))(__import__('os').environ)"
        )
    return "\n".join(lines)


# -- executions ------------------------------------------------------------------------------


class Execution:
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
            run_in_background(self._interrupt(kernel))

    async def _interrupt(self, kernel: Kernel) -> None:
        await kernel.interrupt()
        try:
            await asyncio.wait_for(self.finished.wait(), INTERRUPT_GRACE)
        except TimeoutError:
            log.warning("kernel %s ignored an interrupt: replacing it", kernel.kernel_id)
            await kernel.kill()


_background_tasks: set[asyncio.Task[None]] = set()


def run_in_background(coroutine: Awaitable[None]) -> None:
    async def run() -> None:
        try:
            await coroutine
        except Exception:
            log.exception("interpreter background task failed")

    task = asyncio.create_task(run())
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


async def cancel_background_tasks() -> None:
    """Cancel this loop's background tasks and wait for them (at shutdown)."""
    loop = asyncio.get_running_loop()
    leftovers = [t for t in _background_tasks if t.get_loop() is loop]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


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

    async def run(self, execution: Execution, code: str, env_vars: Mapping[str, str]) -> None:
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
        self, kernel: Kernel, execution: Execution, code: str, env_vars: Mapping[str, str]
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


async def _stream(kernel: Kernel, code: str, execution: Execution) -> None:
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
        self._defaults_made = False
        self._users: dict[str | None, User] = {}

    async def user(self, name: str | None = None) -> User:
        """The user `name` of the sandbox, or its default user (resolved as for a request
        without Basic auth); until found, every call looks again."""
        if name not in self._users:
            try:
                self._users[name] = await RequestScope(self.view, basic_user=name).user()
            except UnknownUser as err:
                raise KernelStartError(str(err)) from None
        return self._users[name]

    async def start_kernel(self, context: Context) -> Kernel:
        # As upstream's Jupyter server, whose kernels run as root (its systemd unit names no
        # user); the default cwd is still the default user's (default_cwd).
        user = await self.user(KERNEL_USER)
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
        run_in_background(self._forget_if_jail_gone())

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

    async def ensure_defaults(self) -> None:
        """On first sight, a default context for each language whose kernel the sandbox has,
        python first, as upstream lists them; their kernels start on first use."""
        if self._defaults_made:
            return
        async with self._defaults_lock:
            if self._defaults_made:
                return
            try:
                languages = await asyncio.to_thread(installed_languages, self.jail)
            except (OSError, JailError) as err:  # the jail is going away: python alone, as before
                log.info("cannot look for kernels in %s: %s", self.view.sandbox_id, err)
                languages = ["python"]
            cwd = await self.default_cwd()
            for language in languages:
                if language not in self.defaults:
                    self.defaults[language] = self.new_context(language, cwd)
            self._defaults_made = True

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
