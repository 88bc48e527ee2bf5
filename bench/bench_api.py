"""Lifecycle API speed against the floor, in one run.

    .venv/bin/python bench/bench_api.py [--calls 2000] [--creates 50] [--backend real|fake]

Control-plane calls that do no jail work (GET /sandboxes/{id}, GET /health) vs a trivial aiohttp
handler (the floor), sequential and interleaved over one keep-alive aiohttp client; the official
Python SDK's `Sandbox.get_info` for reference. Then 10 creates one at a time, `--creates`
concurrent `POST /v2/sandboxes` (all must succeed: p50/p95), and as many concurrent kills.
The service runs in its own process (client and server do not share a GIL) on the real
backends (overlay storage + linux jails, the dev rootfs as template `base`; needs root) or on
in-memory fakes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from benchlib import percentile

from coppice_api.app import bound_port, build_app, start_api
from coppice_envd.server import run_servers
from coppice_jails.manager import SandboxManager
from coppice_jails.registry import Registry
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.storage.overlay import OverlayStorage
from coppice_jails.templates import TemplateStore
from coppice_jails.testing import Backends, install_dev_rootfs_template

KEY = "e2b_" + "be" * 20


# The service (child process) ------------------------------------------------------------------
async def serve(backend: str, data_dir: Path, ports_file: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def floor(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    floor_app = web.Application()
    floor_app.router.add_get("/floor", floor)
    floor_runner = await start_api(floor_app, "127.0.0.1", 0)

    async def run(manager: SandboxManager) -> None:
        await manager.start()
        api_runner = await start_api(build_app(manager, [KEY], "coppice.lan"), "127.0.0.1", 0)
        ports = f"{bound_port(api_runner)} {bound_port(floor_runner)}\n"
        await asyncio.to_thread(ports_file.write_text, ports)
        await stop.wait()
        await api_runner.cleanup()
        for record in await manager.registry.all_sandboxes():
            await manager.kill(record.id)
        await manager.close()

    if backend == "fake":
        backends = Backends(data_dir)
        async with backends.manager() as manager:
            await run(manager)
    else:
        storage = OverlayStorage(data_dir / "overlay")
        await install_dev_rootfs_template(data_dir, storage)
        registry = await Registry.open(data_dir)
        manager = SandboxManager(
            registry, storage, LinuxRuntime(data_dir), TemplateStore(data_dir, storage)
        )
        await run(manager)
        await registry.close()
    await floor_runner.cleanup()


# The client ------------------------------------------------------------------------------------
async def timed(calls: int, **targets: Callable[[], Awaitable[None]]) -> dict[str, list[float]]:
    """Latencies of each target, interleaved call by call so all see the same machine load."""
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(min(100, calls) + calls):
        for name, call in targets.items():
            start = time.perf_counter()
            await call()
            if i >= min(100, calls):  # the first rounds warm up
                samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def row(name: str, samples: list[float], floor: float | None = None) -> str:
    p50 = statistics.median(samples)
    ratio = f"{p50 / floor:5.2f}x" if floor else "     "
    return f"{name:<44} {p50:8.3f} {percentile(samples, 0.95):8.3f} {ratio}  n={len(samples)}"


async def measure(api: str, floor_url: str, calls: int, creates: int) -> None:
    headers = {"X-API-Key": KEY}
    async with aiohttp.ClientSession(headers=headers) as client:
        async with client.post(f"{api}/v2/sandboxes", json={"templateID": "base"}) as r:
            assert r.status == 201, await r.text()
            sandbox_id = (await r.json())["sandboxID"]

        def getter(url: str) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                async with client.get(url) as response:
                    await response.read()
                    assert response.status == 200, response.status

            return call

        samples = await timed(
            calls,
            floor=getter(floor_url),
            health=getter(f"{api}/health"),
            detail=getter(f"{api}/sandboxes/{sandbox_id}"),
        )
        floor, health, detail = samples["floor"], samples["health"], samples["detail"]

        os.environ.update({"E2B_API_URL": api, "E2B_API_KEY": KEY})
        from e2b import Sandbox

        def sdk_calls() -> list[float]:
            samples = []
            for _ in range(min(calls, 300)):
                start = time.perf_counter()
                Sandbox.get_info(sandbox_id)
                samples.append((time.perf_counter() - start) * 1000)
            return samples

        sdk = await asyncio.to_thread(sdk_calls)

        async def create() -> tuple[float, int, str]:
            start = time.perf_counter()
            async with client.post(f"{api}/v2/sandboxes", json={"templateID": "base"}) as r:
                body = await r.json()
                return (time.perf_counter() - start) * 1000, r.status, body.get("sandboxID", "")

        one_by_one = [await create() for _ in range(10)]
        made = await asyncio.gather(*(create() for _ in range(creates)))
        ok = [m for m in made + one_by_one if m[1] == 201]

        async def kill(sandbox: str) -> float:
            start = time.perf_counter()
            async with client.delete(f"{api}/sandboxes/{sandbox}") as r:
                assert r.status == 204, await r.text()
            return (time.perf_counter() - start) * 1000

        kills = await asyncio.gather(*(kill(m[2]) for m in ok), kill(sandbox_id))

    floor_p50 = statistics.median(floor)
    print(f"{'call (ms)':<44} {'p50':>8} {'p95':>8} {'vs floor'}")
    print(row("floor: trivial aiohttp handler", floor))
    print(row("GET /health", health, floor_p50))
    print(row("GET /sandboxes/{id}", detail, floor_p50))
    print(row("SDK Sandbox.get_info (pyqwest, reference)", sdk, floor_p50))
    print(row("POST /v2/sandboxes, one at a time", [m[0] for m in one_by_one]))
    print(row(f"{creates} concurrent POST /v2/sandboxes", [m[0] for m in made]))
    print(row(f"{len(kills)} concurrent DELETE /sandboxes/{{id}}", kills))
    print(f"concurrent creates succeeded: {sum(m[1] == 201 for m in made)}/{creates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--creates", type=int, default=50)
    default_backend = "real" if os.geteuid() == 0 else "fake"
    parser.add_argument("--backend", choices=["real", "fake"], default=default_backend)
    parser.add_argument("--serve", nargs=2, metavar=("DATA_DIR", "PORTS_FILE"), help="internal")
    args = parser.parse_args()
    if args.serve:
        run_servers(serve(args.backend, Path(args.serve[0]), Path(args.serve[1])))
        return

    data_dir = Path(tempfile.mkdtemp(prefix="cpb-", dir="/tmp"))
    ports_file = data_dir / "ports"
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--backend",
            args.backend,
            "--serve",
            str(data_dir),
            str(ports_file),
        ]
    )
    try:
        while not ports_file.exists() or not ports_file.read_text().endswith("\n"):
            if child.poll() is not None:
                raise SystemExit("the service did not start")
            time.sleep(0.05)
        api_port, floor_port = ports_file.read_text().split()
        print(f"backend: {args.backend}; service in its own process; client: one aiohttp session")
        asyncio.run(
            measure(
                f"http://127.0.0.1:{api_port}",
                f"http://127.0.0.1:{floor_port}/floor",
                args.calls,
                args.creates,
            )
        )
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
