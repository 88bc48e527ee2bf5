"""The gateway's proxy to an in-sandbox server against a direct GET to that server, in one run.

    .venv/bin/python bench/bench_proxy.py [--calls 3000]

The in-sandbox server is Python's `http.server` (SimpleHTTPRequestHandler, a 1 KiB file), in
its own process: once as `python -m http.server` runs it (HTTP/1.0, a connection per request),
once with `protocol_version = "HTTP/1.1"` (keep-alive, so the proxy's pooled connection is
reused). The gateway runs in its own process too (uvloop, as `coppice serve`), over a stand-in
sandbox whose jail address is loopback. One keep-alive client (pyqwest, the SDK's HTTP stack)
times each GET: direct to the server (the floor), through the gateway with Host
`<port>-bench.coppice.lan`, and a trivial ASGI endpoint on the same hypercorn (what the gateway's
server costs before the proxy does anything).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyqwest
from benchlib import percentile, timed_calls

from coppice_envd.http.asgi import Receive, Scope, Send, send_response
from coppice_envd.server import build_gateway, run_servers, serve_gateway
from coppice_envd.testing import StaticLookup, make_sandbox

REPO = Path(__file__).resolve().parent.parent


def _listen() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def serve_files(directory: Path, port_file: Path, version: str) -> None:
    """Child process: http.server on `directory`, as `python -m http.server` (or keep-alive)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = version
        # headers and body are two writes: without this, Nagle and the client's delayed ACK
        # hold every kept-alive response ~40 ms
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever()


def serve_gateway_process(root: Path, port_file: Path) -> None:
    """Child process: the gateway plus a trivial floor endpoint on one hypercorn listener."""
    gateway = build_gateway(StaticLookup([make_sandbox(root, "bench")]), process=None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/floor":
            await send_response(send, 200, b"x" * 1024)
        else:
            await gateway(scope, receive, send)

    sock = _listen()
    port_file.write_text(str(sock.getsockname()[1]))
    run_servers(serve_gateway(app, sockets=[sock]))


def _start(*args: str, port_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO)
    for _ in range(400):
        if port_file.exists() and port_file.read_text():
            return process, int(port_file.read_text())
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{args[0]} did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--files", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--gateway", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.files:
        serve_files(Path(args.files[0]), Path(args.files[1]), args.files[2])
        return
    if args.gateway:
        serve_gateway_process(Path(args.gateway[0]), Path(args.gateway[1]))
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        site = work / "site"
        site.mkdir()
        (site / "file.txt").write_bytes(b"y" * 1024)
        processes = []
        try:
            ports = {}
            for name, spec in (("1.0", "HTTP/1.0"), ("1.1", "HTTP/1.1")):
                process, ports[name] = _start(
                    "--files", str(site), str(work / f"port-{name}"), spec,
                    port_file=work / f"port-{name}",
                )  # fmt: skip
                processes.append(process)
            process, gateway_port = _start(
                "--gateway", str(work / "root"), str(work / "gw-port"), port_file=work / "gw-port"
            )
            processes.append(process)
            run(ports, gateway_port, args.calls)
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)


def run(ports: dict[str, int], gateway_port: int, calls: int) -> None:
    client = pyqwest.SyncClient()
    gateway = f"http://127.0.0.1:{gateway_port}"

    def get(url: str, host: str | None = None) -> Callable[[], object]:
        headers = {"host": host} if host else {}

        def call() -> object:
            response = client.get(url, headers)
            assert response.status == 200, response.status
            return response.content

        return call

    calls_by_name = {
        "floor: trivial ASGI GET on the gateway's hypercorn": get(f"{gateway}/floor"),
        "direct GET, http.server HTTP/1.1 (keep-alive)": get(
            f"http://127.0.0.1:{ports['1.1']}/file.txt"
        ),
        "proxied GET, http.server HTTP/1.1 (keep-alive)": get(
            f"{gateway}/file.txt", f"{ports['1.1']}-bench.coppice.lan"
        ),
        "direct GET, python -m http.server (HTTP/1.0)": get(
            f"http://127.0.0.1:{ports['1.0']}/file.txt"
        ),
        "proxied GET, python -m http.server (HTTP/1.0)": get(
            f"{gateway}/file.txt", f"{ports['1.0']}-bench.coppice.lan"
        ),
    }
    per_call = timed_calls(calls, *calls_by_name.values(), rounds=10, warmup=200)
    samples = dict(zip(calls_by_name, per_call, strict=True))
    p50 = {name: statistics.median(timings) for name, timings in samples.items()}
    width = max(map(len, samples))
    print(f"{'measurement':<{width}}  {'p50':>8}  {'p99':>8}  note")
    for name, timings in samples.items():
        note = ""
        if name.startswith("proxied"):
            direct = p50[name.replace("proxied", "direct")]
            added = p50[name] - direct
            note = f"+{added:.3f} ms over direct ({p50[name] / direct:.2f}x); target ≤ +0.5 ms"
        print(f"{name:<{width}}  {p50[name]:>6.3f}ms  {percentile(timings, 0.99):>6.3f}ms  {note}")


if __name__ == "__main__":
    main()
