"""A Jupyter kernel for bash contexts. It runs INSIDE a sandbox, under the sandbox's own python3.

Debian packages no bash kernel, so kernels.py copies this file into the sandbox and starts it with
ipykernel (which the code-interpreter template has). It keeps one bash process per context, so
variables, functions, exports and the working directory persist between cells. Unlike the pty-based
bash_kernel of the official template, stdout and stderr stay separate streams.

Protocol with bash: bash runs interactive (an interactive shell survives SIGINT and drops the
command it was running, which is how an interrupt stops a `while true` loop without losing state),
with no prompts, job control or history expansion. Each cell is sent as one line,
`eval $'<cell>' </dev/null`, then a line that prints a marker with the cell's status on stdout and
a marker on stderr. The markers carry a random token and a sequence number; output before them is
the cell's. An interrupt (ipykernel signals the whole process group) stops bash's command; the
kernel then asks for a fresh marker, since bash may already have consumed the old marker line.

Only the standard library and ipykernel: this must run on the sandbox's Python, not Coppice's.
"""

from __future__ import annotations

import codecs
import os
import re
import secrets
import selectors
import signal
import subprocess
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-./,:=+@%")


def ansi_c_quote(text: str) -> str:
    """`text` as a bash $'...' word: every byte outside a safe set becomes \\xHH."""
    return "$'" + "".join(chr(b) if b in _SAFE else f"\\x{b:02x}" for b in text.encode()) + "'"


class _Stream:
    """One of bash's output pipes, read up to the next marker."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.buffer = b""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.done = False


class BashKernel(Kernel):
    implementation = "coppice-bash"
    implementation_version = "1.0"
    language = "bash"
    language_version = "5"
    language_info: dict[str, object] = {  # noqa: RUF012 (ipykernel's declaration)
        "name": "bash",
        "mimetype": "text/x-sh",
        "file_extension": ".sh",
        "codemirror_mode": "shell",
    }
    banner = "bash (Coppice)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._token = secrets.token_hex(16).encode()
        self._sequence = 0
        self._bash: subprocess.Popen[bytes] | None = None

    # -- bash process

    def _start_bash(self) -> subprocess.Popen[bytes]:
        def restore_sigint() -> None:
            # The kernel ignores SIGINT outside cells; bash must not inherit that.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        bash = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "--noediting", "-i"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=restore_sigint,
            env={**os.environ, "PS1": "", "PS2": "", "TERM": "dumb"},
        )
        self._bash = bash
        self._send(b"PS1=; PS2=; set +m +H\n")
        self._finish(publish=False)  # discards bash's "no job control" notices
        return bash

    def _send(self, data: bytes) -> None:
        assert self._bash is not None
        assert self._bash.stdin is not None
        self._bash.stdin.write(data)
        self._bash.stdin.flush()

    def _ask_marker(self) -> int:
        self._sequence += 1
        seq = self._sequence
        token = self._token.decode()
        self._send(
            f"__coppice_status=$?; printf '%s:%d:%d\\n' {token} {seq} $__coppice_status;"
            f" printf '%s:%d\\n' {token} {seq} >&2\n".encode()
        )
        return seq

    def _finish(self, *, publish: bool) -> int | None:
        """Stream output until both markers of the latest request; bash's status or None (EOF)."""
        assert self._bash is not None
        assert self._bash.stdout is not None
        assert self._bash.stderr is not None
        wanted = self._ask_marker()
        streams = [
            _Stream("stdout", self._bash.stdout.fileno()),
            _Stream("stderr", self._bash.stderr.fileno()),
        ]
        marker = re.compile(re.escape(self._token) + rb":(\d+)(?::(\d+))?\n")
        status: int | None = None
        ended = False
        with selectors.DefaultSelector() as selector:
            for stream in streams:
                selector.register(stream.fd, selectors.EVENT_READ, stream)
            while not all(s.done for s in streams):
                try:
                    events = selector.select()
                except KeyboardInterrupt:
                    # Bash got the SIGINT too and dropped what it ran (maybe also our marker line).
                    wanted = self._ask_marker()
                    continue
                for key, _ in events:
                    stream = key.data
                    chunk = os.read(stream.fd, 65536)
                    if not chunk:  # bash exited: what it wrote is still the cell's output
                        self._publish(stream, stream.buffer, publish)
                        stream.done = ended = True
                        selector.unregister(stream.fd)
                        continue
                    stream.buffer += chunk
                    while (found := marker.search(stream.buffer)) is not None:
                        self._publish(stream, stream.buffer[: found.start()], publish)
                        stream.buffer = stream.buffer[found.end() :]
                        if int(found.group(1)) == wanted:
                            stream.done = True
                            selector.unregister(stream.fd)
                            if found.group(2) is not None:
                                status = int(found.group(2))
                            break
                    if not stream.done:
                        keep = self._partial_marker_length(stream.buffer)
                        cut = len(stream.buffer) - keep
                        self._publish(stream, stream.buffer[:cut], publish)
                        stream.buffer = stream.buffer[cut:]
        return None if ended else status

    def _partial_marker_length(self, data: bytes) -> int:
        """How many trailing bytes of `data` may be the start of a marker."""
        for length in range(min(len(data), len(self._token) + 24), 0, -1):
            tail = data[-length:]
            if self._token.startswith(tail[: len(self._token)]):
                return length
        return 0

    def _publish(self, stream: _Stream, data: bytes, publish: bool) -> None:
        text = stream.decoder.decode(data)
        if text and publish:
            self.send_response(  # type: ignore[no-untyped-call]
                self.iopub_socket, "stream", {"name": stream.name, "text": text}
            )

    # -- kernel protocol

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if self._bash is None or self._bash.poll() is not None:
            self._start_bash()
        interrupted = False
        try:
            self._send(f"eval {ansi_c_quote(code)} </dev/null\n".encode())
            status = self._finish(publish=not silent)
        except KeyboardInterrupt:
            interrupted = True
            status = self._finish(publish=not silent)
        except BrokenPipeError:
            status = None
        if status is None:  # bash exited (`exit` in the cell); the next cell gets a new one
            assert self._bash is not None
            code_ = self._bash.wait()
            self._bash = None
            return self._error(f"bash exited with status {code_}", silent)
        if interrupted or status == 130:
            return {"status": "aborted", "execution_count": self.execution_count}
        if status != 0:
            return self._error(str(status), silent)
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
        }

    def _error(self, value: str, silent: bool) -> dict[str, Any]:
        # As the official template's bash_kernel: no name, the exit status as the value.
        content: dict[str, Any] = {"ename": "", "evalue": value, "traceback": []}
        if not silent:
            self.send_response(self.iopub_socket, "error", content)  # type: ignore[no-untyped-call]
        return {"status": "error", "execution_count": self.execution_count, **content}

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self._bash is not None and self._bash.poll() is None:
            self._bash.kill()
            self._bash.wait()
        return {"status": "ok", "restart": restart}


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=BashKernel)
