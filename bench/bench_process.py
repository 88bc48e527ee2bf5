"""Speed of envd's Process service through the official SDK, against the floor of the same run.

    .venv/bin/python bench/bench_process.py [--rootfs DIR] [--runs N] [--streams N]

One real Linux jail on an overlay of the built base template, served by the real gateway
(hypercorn); the SDK runs in a child process, as a real client would. Measures, p50/p95 over
N sequential runs:
  * floor: a plain host spawn of /bin/true, and a raw `Jail.exec` of /bin/true;
  * a raw `Jail.exec` of what `commands.run("true")` really runs (`/bin/bash -l -c true` as
    `user`) — the floor of the SDK number;
  * the same Start called on the ProcessService object (no HTTP, no SDK);
  * `sandbox.commands.run("true")` with the sync Python SDK (target p50 <= 8 ms);
  * the same over TLS (h2 by ALPN, as the SDK picks; the certificate of `coppice serve
    --tls`), on a second listener of the same gateway (target: TLS adds <= 1 ms p50);
  * the same against a stand-in jail whose processes take no time: the cost of SDK, HTTP,
    gateway and service alone (plain HTTP/1.1, TLS with h2, TLS with HTTP/1.1);
and then S concurrent `commands.run` streams with the async SDK, checking none is lost.
Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchlib import mount_overlay, percentile
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import Headers, RequestContext
from e2b import AsyncSandbox, Sandbox
from process import process_pb2 as pb

from coppice.tls import ensure_tls
from coppice_envd.process.service import ProcessService
from coppice_envd.request import RequestScope, enter_request
from coppice_envd.sandboxes import SandboxView
from coppice_envd.server import GatewayTls, build_gateway, run_servers, serve_gateway
from coppice_envd.testing import StaticLookup
from coppice_jails.envd_facts import DEFAULT_PATH
from coppice_jails.runtime.base import (
    ExecSpec,
    Jail,
    JailProcess,
    Limits,
    User,
)
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.testing import FakeJail

ROOT = User("root", 0, 0, "/root", (0,))
USER = User("user", 1000, 1000, "/home/user", (1000,))


def close_fds(process: JailProcess) -> None:
    for fd in (process.stdin_fd, process.stdout_fd, process.stderr_fd, process.pty_fd):
        if fd is not None:
            os.close(fd)


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await action()
    return (time.perf_counter() - start) * 1000


async def host_true() -> None:
    # As coppice_api spawns commands: subprocess (vfork) from a thread, never uvloop's fork.
    await asyncio.to_thread(subprocess.run, ["/bin/true"], check=True)


async def jail_run(jail: Jail, spec: ExecSpec) -> None:
    process = await jail.exec(spec)
    await process.wait()
    close_fds(process)


async def service_run(service: ProcessService, view: SandboxView, request: pb.StartRequest) -> None:
    """One Start called on the service object itself: no HTTP, no SDK."""
    enter_request(RequestScope(sandbox=view, basic_user=None))
    method = MethodInfo(
        name="Start",
        service_name="process.Process",
        input=pb.StartRequest,
        output=pb.StartResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )
    ctx = RequestContext(
        method=method,
        http_method="POST",
        request_headers=Headers({"keepalive-ping-interval": "50"}),
        timeout_ms=60_000,
    )
    async for response in service.start(request, ctx):
        if response.event.HasField("end") and response.event.end.exit_code != 0:
            raise SystemExit("the command failed")


def sdk_sequential(url: str, sandbox_id: str, runs: int) -> list[float]:
    sandbox = Sandbox.connect(sandbox_id, debug=True, sandbox_url=url)
    for _ in range(20):
        sandbox.commands.run("true")
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        sandbox.commands.run("true")
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def sdk_concurrent(url: str, sandbox_id: str, streams: int) -> dict[str, Any]:
    """How many of `streams` concurrent runs came back complete and correct, and the wall time."""
    sandbox = await AsyncSandbox.connect(sandbox_id, debug=True, sandbox_url=url)

    async def one(index: int) -> bool:
        result = await sandbox.commands.run(f"echo {index}; echo e{index} >&2", timeout=120)
        return (result.stdout, result.stderr, result.exit_code) == (f"{index}\n", f"e{index}\n", 0)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)), return_exceptions=True)
    elapsed = (time.perf_counter() - start) * 1000
    errors = sorted({repr(r)[:200] for r in results if r is not True})
    return {"complete": sum(1 for r in results if r is True), "wall_ms": elapsed, "errors": errors}


def client_main(mode: str, url: str, sandbox_id: str, count: int) -> None:
    """The SDK side, in a process of its own (so it never shares a GIL with the gateway)."""
    if mode == "sequential":
        print(json.dumps(sdk_sequential(url, sandbox_id, count)))
    else:
        print(json.dumps(asyncio.run(sdk_concurrent(url, sandbox_id, count))))


async def run_client(
    mode: str, url: str, sandbox_id: str, count: int, env: dict[str, str] | None = None
) -> Any:
    """The SDK in a child process, its environment this one's plus `env`."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", mode, url, sandbox_id, str(count),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"the SDK client ({mode}) failed")
    return json.loads(out)


def row(name: str, samples: list[float], target: str) -> str:
    p50, p95 = statistics.median(samples), percentile(samples, 0.95)
    return f"{name:<44} {p50:>8.2f} {p95:>8.2f}   {target}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rootfs", type=Path, help="default: the built base template")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=200)
    args = parser.parse_args()
    if args.rootfs is None:
        from coppice_jails.testing import built_template_root

        args.rootfs = await asyncio.to_thread(built_template_root, "base")
    work = Path(tempfile.mkdtemp(prefix="coppice-bench-process-"))
    root = await mount_overlay(args.rootfs, work / "sandbox")
    runtime = LinuxRuntime(work / "data")
    sandbox_id = f"bench{uuid.uuid4().hex[:12]}"
    jail = await runtime.start(sandbox_id, root, Limits())
    try:
        raw_true = ExecSpec(["/bin/true"], ROOT, "/", {"PATH": DEFAULT_PATH})
        login_env = {"PATH": DEFAULT_PATH, "HOME": USER.home, "USER": "user", "LOGNAME": "user"}
        raw_login = ExecSpec(
            ["/bin/bash", "-l", "-c", "true"],
            USER,
            USER.home,
            login_env,
        )
        view = SandboxView(sandbox_id=sandbox_id, jail=jail, access_token=None)
        instant_jail = FakeJail("instant", jail.root, instant_processes=True)
        instant = SandboxView(sandbox_id="instant", jail=instant_jail, access_token=None)
        service = ProcessService()
        sdk_request = pb.StartRequest(
            process=pb.ProcessConfig(cmd="/bin/bash", args=["-l", "-c", "true"]), stdin=False
        )
        measures: dict[str, Callable[[], Awaitable[object]]] = {
            "host": host_true,
            "jail": lambda: jail_run(jail, raw_true),
            "login": lambda: jail_run(jail, raw_login),
            "direct": lambda: service_run(service, view, sdk_request),
        }
        samples: dict[str, list[float]] = {
            name: [] for name in [*measures, "sdk", "tls", "stack", "stack_tls", "stack_tls_h1"]
        }
        for measure in measures.values():
            for _ in range(20):
                await measure()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        tls_listener = socket.socket()
        tls_listener.bind(("127.0.0.1", 0))
        tls_listener.listen(1024)
        tls_url = f"https://127.0.0.1:{tls_listener.getsockname()[1]}"
        certs = await asyncio.to_thread(ensure_tls, work / "data", "coppice.lan")
        tls = GatewayTls(certs.cert, certs.key, sockets=[tls_listener])
        # The SDK (rustls with the native roots) trusts what SSL_CERT_FILE names, as a client of
        # `coppice serve --tls` is told by `coppice env`. Over TLS it picks h2 by ALPN (plain:
        # HTTP/1.1); E2B_HTTP_VERSION=1.1 keeps HTTP/1.1, to tell TLS's cost from h2's.
        trust = {"SSL_CERT_FILE": str(certs.bundle)}
        trust_h1 = {**trust, "E2B_HTTP_VERSION": "1.1"}
        stopping = asyncio.Event()
        app = build_gateway(StaticLookup([instant, view]), process=service)
        server = asyncio.create_task(
            serve_gateway(app, sockets=[listener], tls=tls, shutdown_trigger=stopping.wait)
        )
        try:
            # Rounds, so that the load of this shared machine drifting affects every row alike.
            per_round = max(1, args.runs // args.rounds)
            for _ in range(args.rounds):
                for name, measure in measures.items():
                    samples[name] += [await timed(measure) for _ in range(per_round)]
                samples["sdk"] += await run_client("sequential", url, sandbox_id, per_round)
                samples["tls"] += await run_client(
                    "sequential", tls_url, sandbox_id, per_round, trust
                )
                samples["stack"] += await run_client("sequential", url, "instant", per_round)
                samples["stack_tls"] += await run_client(
                    "sequential", tls_url, "instant", per_round, trust
                )
                samples["stack_tls_h1"] += await run_client(
                    "sequential", tls_url, "instant", per_round, trust_h1
                )
            concurrent = await run_client("concurrent", url, sandbox_id, args.streams)
        finally:
            stopping.set()
            await server
            listener.detach()  # hypercorn closed them
            tls_listener.detach()
        host, in_jail, login, direct, sdk, over_tls, stack, stack_tls, stack_h1 = samples.values()

        print(f"{'ms (n)':<44} {'p50':>8} {'p95':>8}   target")
        print(row(f"host spawn /bin/true ({len(host)})", host, "floor"))
        print(row(f"Jail.exec /bin/true ({len(in_jail)})", in_jail, "floor"))
        print(row(f"Jail.exec bash -l -c true as user ({len(login)})", login, "SDK's floor"))
        print(row(f"ProcessService.start, same command ({len(direct)})", direct, "no HTTP/SDK"))
        print(row(f"SDK commands.run('true') ({len(sdk)})", sdk, "p50 <= 8 ms"))
        overhead = statistics.median(sdk) - statistics.median(login)
        print(f"{'  SDK p50 - its floor p50':<44} {overhead:>8.2f}")
        print(row(f"SDK commands.run('true') over TLS ({len(over_tls)})", over_tls, "+<= 1 ms"))
        tls_cost = statistics.median(over_tls) - statistics.median(sdk)
        print(f"{'  TLS p50 - plain p50':<44} {tls_cost:>8.2f}")
        print(row(f"SDK commands.run, a process taking 0 s ({len(stack)})", stack, "our stack"))
        print(row(f"  the same over TLS, h2 ({len(stack_tls)})", stack_tls, "our stack, TLS"))
        print(row(f"  the same over TLS, HTTP/1.1 ({len(stack_h1)})", stack_h1, "TLS alone"))
        complete = int(concurrent["complete"])
        print(
            f"{args.streams} concurrent commands.run streams (async SDK): {complete} complete, "
            f"{args.streams - complete} lost, {concurrent['wall_ms']:.0f} ms wall"
        )
        for error in concurrent["errors"]:
            print(f"  lost: {error}")
    finally:
        await jail.stop()
        umount = await asyncio.create_subprocess_exec("umount", "--lazy", str(root))
        await umount.wait()
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        run_servers(main())
