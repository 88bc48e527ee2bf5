"""Gateway filesystem speed against the floor, in one run.

    .venv/bin/python bench/bench_gateway_fs.py [--calls 2000] [--mb 100] [--transfers 5]

Unary: Connect `filesystem.Filesystem/Stat` (JSON, HTTP/1.1 keep-alive, one pyqwest client) vs a
trivial ASGI endpoint on the same hypercorn with the same client (the floor); the official SDK's
`files.get_info` for reference. Transfer: the median of 5 100 MB uploads (POST /files,
octet-stream) and downloads (GET /files, identity) vs the same bytes to/from a trivial endpoint
on the same server, and a raw copy of the file on the same disk.
Transfers use curl as the client. The gateway runs in its own process (so client and server
do not share a GIL), serving a
stand-in sandbox rooted in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyqwest
from benchlib import percentile, timed_calls

from coppice_envd.http.asgi import Receive, Scope, Send, send_json
from coppice_envd.server import build_gateway, run_servers, serve_gateway
from coppice_envd.testing import StaticLookup, make_sandbox

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1024 * 1024


def serve(root: Path, port_file: Path) -> None:
    """Child process: the gateway plus a trivial floor endpoint on one hypercorn listener."""
    gateway = build_gateway(StaticLookup([make_sandbox(root, "bench")]), process=None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/floor":
            while (await receive()).get("more_body"):
                pass
            await send_json(send, 200, {"ok": True})
        elif scope["type"] == "http" and scope["path"] == "/floor/bytes":
            # hypercorn's own ceiling for a large response body, no file I/O.
            size = int(scope["query_string"] or 0)
            block = bytes(CHUNK)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for offset in range(0, size, CHUNK):
                await send(
                    {
                        "type": "http.response.body",
                        "body": block,
                        "more_body": offset + CHUNK < size,
                    }
                )
        else:
            await gateway(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port_file.write_text(str(sock.getsockname()[1]))
    run_servers(serve_gateway(app, sockets=[sock]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--transfers", type=int, default=5, help="of each kind; medians shown")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        root, port_file = work / "root", work / "port"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root), str(port_file)], cwd=REPO
        )
        try:
            for _ in range(200):
                if port_file.exists() and port_file.read_text():
                    break
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text()}"
            run(url, root, work, args.calls, args.mb, args.transfers)
        finally:
            server.terminate()
            server.wait(30)


def run(url: str, root: Path, work: Path, calls: int, mb: int, transfers: int) -> None:
    (root / "home/user/stat-me.txt").write_text("x")
    rows: list[tuple[str, str, str]] = []
    with httpx.Client(timeout=120) as client:
        for _ in range(100):
            try:
                client.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        # The SDK's own HTTP stack (pyqwest) for the unary calls, floor and Stat alike.
        rpc = pyqwest.SyncClient()
        headers = {"content-type": "application/json"}
        floor, stat = timed_calls(
            calls,
            lambda: rpc.post(f"{url}/floor", headers, b"{}"),
            lambda: rpc.post(
                f"{url}/filesystem.Filesystem/Stat",
                headers,
                b'{"path":"/home/user/stat-me.txt"}',
            ),
        )
        assert rpc.post(f"{url}/filesystem.Filesystem/Stat", headers, b'{"path":"/"}').status == 200
        rows.append(("floor: trivial ASGI POST", _ms(floor), ""))
        rows.append(("Connect unary Stat", _ms(stat), "target p50 <= 1.5 ms"))

        os.environ.update(E2B_DEBUG="true", E2B_SANDBOX_URL=url, E2B_API_KEY="bench")
        from e2b import Sandbox

        sbx = Sandbox.create()
        [sdk] = timed_calls(min(calls, 500), lambda: sbx.files.get_info("stat-me.txt"))
        rows.append(("SDK files.get_info (reference)", _ms(sdk), ""))

        size = mb * CHUNK
        data = os.urandom(size)
        source = work / "source.bin"
        source.write_bytes(data)
        started = time.perf_counter()
        shutil.copyfile(source, work / "copy.bin")
        copy_s = time.perf_counter() - started
        rows.append((f"floor: raw copy {mb} MB (same disk)", _rate(size, copy_s), ""))

        # Transfers go through curl (C), so the client is not what is measured; `-T` streams the
        # file (`--data-binary @file` would first read all of it into memory).
        def curl(*args: str) -> float:
            started = time.perf_counter()
            subprocess.run(["curl", "-sSf", "-o", "/dev/null", *args], check=True)
            return time.perf_counter() - started

        upload = f"{url}/files?path=/home/user/big.bin"
        octets = ("-H", "content-type: application/octet-stream")
        timings: dict[str, list[float]] = {"up": [], "up floor": [], "down": [], "down floor": []}
        for _ in range(transfers):
            timings["up"].append(curl("-T", str(source), "-X", "POST", *octets, upload))
            assert (root / "home/user/big.bin").stat().st_size == size
            timings["up floor"].append(curl("-T", str(source), "-X", "POST", f"{url}/floor"))
            timings["down"].append(curl("-H", "accept-encoding: identity", upload))
            timings["down floor"].append(curl(f"{url}/floor/bytes?{size}"))
            (root / "home/user/big.bin").unlink()
        median = {name: statistics.median(seconds) for name, seconds in timings.items()}
        rows.append(
            (f"upload {mb} MB (POST /files)", _rate(size, median["up"]), "target >= 300 MB/s")
        )
        rows.append(
            (f"floor: POST {mb} MB to a trivial endpoint", _rate(size, median["up floor"]), "")
        )
        rows.append(
            (f"download {mb} MB (GET /files)", _rate(size, median["down"]), "target >= 300 MB/s")
        )
        rows.append(
            (f"floor: GET {mb} MB from a trivial endpoint", _rate(size, median["down floor"]), "")
        )

    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'result':<34}  note")
    for name, result, note in rows:
        print(f"{name:<{width}}  {result:<34}  {note}")


def _ms(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples):.2f} ms  p99 {percentile(samples, 0.99):.2f} ms"


def _rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e6:.0f} MB/s ({seconds:.2f} s)"


if __name__ == "__main__":
    main()
