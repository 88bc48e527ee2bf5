"""A Jupyter kernel for java contexts. It runs INSIDE a sandbox, under the sandbox's own python3.

No IJava in Debian: kernels.py copies this file and CoppiceJShell.java into the sandbox, and this
kernel (on ipykernel) keeps one JVM per context running CoppiceJShell, which evaluates each cell
with the JDK's jdk.jshell API, so declarations persist between cells. The frame protocol between
the two is described in CoppiceJShell.java. The JVM starts with the kernel, so a warmed context's
first cell does not wait for it.

Only the standard library and ipykernel: this must run on the sandbox's Python, not Coppice's.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import IO, Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

_HERE = os.path.dirname(os.path.abspath(__file__))
# A small heap-friendly, quick-starting JVM: C1 only, no perf data file in /tmp.
_JAVA = (
    "java",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Xshare:auto",
    os.path.join(_HERE, "CoppiceJShell.java"),
)


class JavaKernel(Kernel):
    implementation = "coppice-java"
    implementation_version = "1.0"
    language = "java"
    language_version = "17"
    language_info: dict[str, object] = {  # noqa: RUF012 (ipykernel's declaration)
        "name": "java",
        "mimetype": "text/x-java-source",
        "file_extension": ".jshell",
        "codemirror_mode": "java",
    }
    banner = "Java (jshell, Coppice)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._java: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._interrupted = False
        self._start_java()

    def _start_java(self) -> None:
        def restore_sigint() -> None:
            # The kernel ignores SIGINT outside cells; the JVM turns it into a snippet stop.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self._java = subprocess.Popen(
            _JAVA, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=restore_sigint
        )
        self._ready = False

    def _frame(self) -> tuple[str, bytes] | None:
        """The JVM's next frame, or None when it has exited."""
        assert self._java is not None
        stdout: IO[bytes] | None = self._java.stdout
        assert stdout is not None
        header = stdout.readline()
        if not header.endswith(b"\n"):
            return None
        kind, length = header.decode().split()
        data = stdout.read(int(length))
        return kind, data

    def _next_frame(self) -> tuple[str, bytes] | None:
        """As _frame; an interrupt meanwhile (the JVM got the SIGINT too) is not an end."""
        while True:
            try:
                return self._frame()
            except KeyboardInterrupt:
                self._interrupted = True

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
        self._interrupted = False
        if self._java is None or self._java.poll() is not None:
            self._start_java()
        assert self._java is not None
        error: dict[str, Any] | None = None
        try:
            while not self._ready:
                frame = self._next_frame()
                if frame is None:
                    raise BrokenPipeError
                self._ready = frame[0] == "ready"
            data = code.encode()
            assert self._java.stdin is not None
            self._java.stdin.write(b"code %d\n" % len(data) + data)
            self._java.stdin.flush()
            while (frame := self._next_frame()) is not None and frame[0] != "done":
                kind, payload = frame
                text = payload.decode("utf-8", "replace")
                if kind in ("out", "err") and not silent:
                    name = "stdout" if kind == "out" else "stderr"
                    self.send_response(  # type: ignore[no-untyped-call]
                        self.iopub_socket, "stream", {"name": name, "text": text}
                    )
                elif kind == "result" and not silent:
                    self.send_response(  # type: ignore[no-untyped-call]
                        self.iopub_socket,
                        "execute_result",
                        {
                            "execution_count": self.execution_count,
                            "data": {"text/plain": text},
                            "metadata": {},
                        },
                    )
                elif kind == "error":
                    ename, evalue, traceback = [*text.split("\0"), "", ""][:3]
                    error = {"ename": ename, "evalue": evalue, "traceback": [traceback]}
            if frame is None:
                raise BrokenPipeError
        except BrokenPipeError:
            # The JVM ended (System.exit in a cell, or killed); the next cell gets a new one.
            status = self._java.wait()
            self._java = None
            error = {"ename": "", "evalue": f"the JVM exited with status {status}", "traceback": []}
        if error is not None:
            if not silent:
                self.send_response(self.iopub_socket, "error", error)  # type: ignore[no-untyped-call]
            return {"status": "error", "execution_count": self.execution_count, **error}
        if self._interrupted:
            return {"status": "aborted", "execution_count": self.execution_count}
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
        }

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self._java is not None and self._java.poll() is None:
            self._java.kill()
            self._java.wait()
        return {"status": "ok", "restart": restart}


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=JavaKernel)
