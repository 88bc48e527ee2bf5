"""Speed of the code interpreter through the official SDK, against the kernel's own floor.

    .venv/bin/python bench/bench_interpreter.py [--template-root DIR] [--runs N] [--starts N]

Real Linux jails on overlay clones of the built `code-interpreter-v1` template (by default the
tests' cached build), served by the real gateway (hypercorn) with the Interpreter; the sync
`e2b-code-interpreter` SDK runs in a child process, as a real client would. Measures:
  * floor: the kernel's own round trip with jupyter_client (`execute` + `execute_reply`, a
    second client on the same kernel, in its own process), and the interpreter's kernel path
    (reply + idle);
  * floor: an SDK call that reaches the interpreter but no kernel (`list_code_contexts`);
  * `sandbox.run_code("x = 1")`, p50/p95 over N sequential calls (target p50 <= 10 ms);
  * the first `run_code` after a sandbox's jail is up (target <= 1.5 s): cold (the first request
    starts the kernel), pre-started (`Interpreter.sandbox_started` right after the jail starts,
    as the composition root does) and pre-started with the kernel already ready.
With --idle-memory instead: an idle sandbox's host memory (its memory cgroup's charge, as
bench_runtime.py reads it, and its processes' RSS/PSS) with only the python kernel started, then
with every default context's kernel started (one per language present), and the difference against
the added kernels' own RSS (issue 12: pre-started kernels may raise it by no more than that). The
jail gets 2 GiB for it: a JVM next to Deno's two kernels does not fit in the default 512 MiB.
Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import mount_overlay, percentile

from coppice_envd.interpreter.contexts import SandboxContexts
from coppice_envd.interpreter.service import Interpreter
from coppice_envd.sandboxes import SandboxView
from coppice_envd.server import build_gateway, run_servers, serve_gateway
from coppice_envd.testing import StaticLookup
from coppice_jails.runtime.base import Jail, Limits
from coppice_jails.runtime.linux import LinuxJail, LinuxRuntime

REPO = Path(__file__).resolve().parent.parent

# The SDK client: reads "<call> <sandbox id> <runs>" lines (call: run_code or list_code_contexts),
# answers each with a JSON list of seconds.
CLIENT = r"""
import json, sys, time
from e2b import ConnectionConfig
from e2b_code_interpreter import Sandbox
from packaging.version import Version
url = sys.argv[1]
config = ConnectionConfig(sandbox_url=url, api_key="e2b_" + "0" * 40)
print("ready", flush=True)
for line in sys.stdin:
    call, sandbox_id, runs = line.split()
    sandbox = Sandbox(sandbox_id=sandbox_id, sandbox_domain=None, envd_version=Version("0.4.0"),
                      envd_access_token=None, traffic_access_token=None, connection_config=config)
    times = []
    for _ in range(int(runs)):
        start = time.perf_counter()
        if call == "run_code":
            execution = sandbox.run_code("x = 1")
            assert execution.error is None, execution.error
        else:
            sandbox.list_code_contexts()
        times.append(time.perf_counter() - start)
    print(json.dumps(times), flush=True)
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


class Bench:
    def __init__(self, template_root: Path, work: Path) -> None:
        self.template_root = template_root
        self.work = work
        self.runtime = LinuxRuntime(work / "data")
        self.lookup = StaticLookup()
        self.interpreter = Interpreter()
        self.jails: list[Jail] = []
        self.mounts: list[Path] = []

    async def start_jail(self, limits: Limits | None = None) -> SandboxView:
        sandbox_id = "bench" + uuid.uuid4().hex[:10]
        merged = await mount_overlay(self.template_root, self.work / sandbox_id)
        self.mounts.append(merged)
        jail = await self.runtime.start(sandbox_id, merged, limits or Limits())
        self.jails.append(jail)
        view = SandboxView(sandbox_id=sandbox_id, jail=jail, access_token=None)
        self.lookup.sandboxes.append(view)
        return view

    async def contexts(self, sandbox_id: str) -> SandboxContexts:
        view = self.lookup.get(sandbox_id)
        assert view is not None
        return await self.interpreter.contexts(view)

    async def close(self) -> None:
        await self.interpreter.close()
        for jail in self.jails:
            await jail.stop()
        for merged in self.mounts:
            umount = await asyncio.create_subprocess_exec("umount", "--lazy", str(merged))
            await umount.wait()


class Client:
    """The SDK in a child process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str) -> Client:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            url,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        client = cls(process)
        assert await client._line() == "ready"
        return client

    async def _line(self) -> str:
        assert self.process.stdout is not None
        return (await self.process.stdout.readline()).decode().strip()

    async def run(self, sandbox_id: str, runs: int, call: str = "run_code") -> list[float]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{call} {sandbox_id} {runs}\n".encode())
        await self.process.stdin.drain()
        line = await self._line()
        if not line:
            raise SystemExit("the SDK client failed")
        times: list[float] = json.loads(line)
        return times

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


# The floor client: jupyter_client's own execute + execute_reply, in a process of its own.
FLOOR_CLIENT = r"""
import json, sys, time
from jupyter_client import BlockingKernelClient
client = BlockingKernelClient()
client.load_connection_info(json.loads(sys.argv[1]))
client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
client.execute("x = 1", reply=True, timeout=30)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    client.execute("x = 1", reply=True, timeout=30)
    times.append(time.perf_counter() - start)
client.stop_channels()
print(json.dumps(times))
"""


async def kernel_floor(bench: Bench, sandbox_id: str, runs: int) -> tuple[list[float], list[float]]:
    """(jupyter_client execute+reply from another process, the interpreter's reply+idle path)."""
    contexts = await bench.contexts(sandbox_id)
    kernel = contexts.defaults["python"].kernel
    assert kernel is not None
    info = {
        k: v.decode() if isinstance(v, bytes) else v
        for k, v in kernel.client.get_connection_info().items()
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOR_CLIENT, json.dumps(info), str(runs), stdout=subprocess.PIPE
    )
    out, _ = await child.communicate()
    raw: list[float] = json.loads(out)
    ours: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        async for _msg in kernel.execute("x = 1").messages():
            pass
        ours.append(time.perf_counter() - start)
    return raw, ours


async def wait_kernel_ready(bench: Bench, sandbox_id: str) -> None:
    context = (await bench.contexts(sandbox_id)).defaults["python"]
    await context.ensure_started()


async def first_run(bench: Bench, client: Client, mode: str) -> tuple[float, float]:
    """(jail start seconds, first run_code seconds measured by the SDK)."""
    start = time.perf_counter()
    view = await bench.start_jail()
    jail_seconds = time.perf_counter() - start
    if mode != "cold":
        await bench.interpreter.sandbox_started(view)
    if mode == "ready":
        await wait_kernel_ready(bench, view.sandbox_id)
    (first,) = await client.run(view.sandbox_id, 1)
    return jail_seconds, first


MIB = 1024 * 1024
SETTLE_SECONDS = 3.0  # kernels finish their start-up imports and go idle


def _kib_field(text: str, name: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(name))


def sandbox_memory(jail: LinuxJail) -> tuple[int, dict[int, tuple[str, int, int]]]:
    """(memory cgroup charge, {host pid: (command, RSS, PSS)} of each process but init)."""
    group = Path(f"/sys/fs/cgroup/memory/coppice/{jail.sandbox_id}")
    charged = int((group / "memory.usage_in_bytes").read_text())
    processes: dict[int, tuple[str, int, int]] = {}
    for pid in map(int, (group / "cgroup.procs").read_text().split()):
        if pid == jail.init_pid:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            rss = _kib_field(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
            pss = _kib_field(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:")
        except (OSError, StopIteration):  # gone meanwhile, or a zombie
            continue
        command = " ".join(a.decode(errors="replace") for a in argv[:3] if a)
        processes[pid] = (" ".join(command.split())[:60], rss, pss)
    return charged, processes


def _print_memory(title: str, charged: int, processes: dict[int, tuple[str, int, int]]) -> None:
    rss = sum(p[1] for p in processes.values())
    pss = sum(p[2] for p in processes.values())
    print(
        f"{title}: cgroup {charged / MIB:.1f} MiB;"
        f" processes RSS {rss / MIB:.1f}, PSS {pss / MIB:.1f}"
    )
    for pid, (command, p_rss, p_pss) in sorted(processes.items()):
        print(f"  {pid:>8} RSS {p_rss / MIB:7.1f} PSS {p_pss / MIB:7.1f}  {command}")


async def idle_memory(bench: Bench, samples: int) -> None:
    """Idle host memory: python's kernel alone, then a default kernel per present language."""
    for _ in range(samples):
        view = await bench.start_jail(Limits(memory_bytes=2048 * MIB))
        jail = view.jail
        assert isinstance(jail, LinuxJail)
        await bench.interpreter.sandbox_started(view, wait=True)
        await asyncio.sleep(SETTLE_SECONDS)
        charged_python, python_only = await asyncio.to_thread(sandbox_memory, jail)
        contexts = await bench.contexts(view.sandbox_id)
        languages = sorted(contexts.defaults)
        for language in languages:
            await contexts.defaults[language].ensure_started()
        await asyncio.sleep(SETTLE_SECONDS)
        charged_all, everything = await asyncio.to_thread(sandbox_memory, jail)
        added = {pid: p for pid, p in everything.items() if pid not in python_only}
        added_rss = sum(p[1] for p in added.values())
        added_pss = sum(p[2] for p in added.values())
        _print_memory("python kernel only", charged_python, python_only)
        _print_memory(f"default kernels ({', '.join(languages)})", charged_all, everything)
        raised = charged_all - charged_python
        print(
            f"cgroup charge raised {raised / MIB:.1f} MiB; the added kernels' own RSS"
            f" {added_rss / MIB:.1f} MiB (PSS {added_pss / MIB:.1f}):"
            f" {'within' if raised <= added_rss else 'ABOVE'} their RSS"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--template-root", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument(
        "--idle-memory", type=int, default=0, metavar="N", help="N idle-memory samples instead"
    )
    args = parser.parse_args()
    template_root = args.template_root
    if template_root is None:
        from coppice_jails.testing import built_template_root

        template_root = await asyncio.to_thread(built_template_root, "code-interpreter-v1")

    with tempfile.TemporaryDirectory(prefix="coppice-bench-interp-") as tmp:
        bench = Bench(template_root, Path(tmp))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        stop = asyncio.Event()
        app = build_gateway(bench.lookup, process=None, interpreter=bench.interpreter)

        async def stopped() -> None:
            await stop.wait()

        server = asyncio.create_task(serve_gateway(app, sockets=[sock], shutdown_trigger=stopped))
        if args.idle_memory:
            try:
                await idle_memory(bench, args.idle_memory)
            finally:
                await bench.close()
                stop.set()
                await server
                sock.close()
            return
        client = await Client.start(url)
        try:
            rows: list[tuple[str, list[float]]] = []
            view = await bench.start_jail()
            await bench.interpreter.sandbox_started(view)
            await wait_kernel_ready(bench, view.sandbox_id)
            await client.run(view.sandbox_id, 20)  # warm both ends
            raw, ours = await kernel_floor(bench, view.sandbox_id, args.runs)
            rows.append(("floor: jupyter_client execute+reply", raw))
            rows.append(("interpreter kernel path (reply+idle)", ours))
            http = await client.run(view.sandbox_id, args.runs, "list_code_contexts")
            rows.append(("floor: SDK list_code_contexts (HTTP)", http))
            rows.append(('SDK run_code("x = 1")', await client.run(view.sandbox_id, args.runs)))

            firsts: dict[str, list[float]] = {"cold": [], "prestart": [], "ready": []}
            jail_starts: list[float] = []
            for _ in range(args.starts):
                for mode, samples in firsts.items():
                    jail_seconds, first = await first_run(bench, client, mode)
                    jail_starts.append(jail_seconds)
                    samples.append(first)
            rows.append(("jail start (Sandbox.create's floor)", jail_starts))
            rows.append(("first run_code, cold kernel", firsts["cold"]))
            rows.append(("first run_code, pre-started at create", firsts["prestart"]))
            rows.append(("first run_code, pre-started and ready", firsts["ready"]))

            print(f"{'measurement':42} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
            for name, samples in rows:
                if not samples:
                    continue
                print(
                    f"{name:42} {len(samples):4d} {ms(statistics.median(samples))}"
                    f" {ms(percentile(samples, 0.95))} {ms(statistics.fmean(samples))}"
                )
        finally:
            await client.close()
            await bench.close()
            stop.set()
            await server
            sock.close()


if __name__ == "__main__":
    run_servers(main())
