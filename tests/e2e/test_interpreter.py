"""The code interpreter end to end: the official `e2b-code-interpreter` SDK → the real gateway →
Interpreter → ipykernel (and the bash kernel) inside real Linux jails on the built
`code-interpreter-v1` template.

The SDK object is made the way its own `connect` makes one, pointed at the gateway with
`sandbox_url` (so it sends `E2b-Sandbox-Id` and `E2b-Sandbox-Port: 49999`); the lifecycle API is
not involved here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from e2b import ConnectionConfig
from e2b_code_interpreter import Sandbox
from fixtures import REPO
from fixtures.gateway import RunningGateway, start_gateway
from packaging.version import Version

from coppice_envd.interpreter.contexts import result_item
from coppice_envd.interpreter.service import KEEPALIVE_SECONDS, Interpreter
from coppice_envd.sandboxes import SandboxView
from coppice_envd.testing import StaticLookup
from coppice_jails.runtime.base import Jail, Limits
from coppice_jails.runtime.linux import LinuxRuntime
from coppice_jails.testing import built_template_root

pytestmark = pytest.mark.slow

TEMPLATE = "code-interpreter-v1"
MiB = 1024 * 1024


@dataclass
class Jails:
    """Real jails on overlay clones of the template, and the lookup the gateway routes with."""

    base: Path
    template_root: Path
    runtime: LinuxRuntime
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    lookup: StaticLookup = field(default_factory=StaticLookup)
    jails: list[Jail] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def start(
        self,
        *,
        memory_bytes: int = 1024 * MiB,
        env_vars: dict[str, str] | None = None,
        access_token: str | None = None,
    ) -> SandboxView:
        sandbox_id = "it" + uuid.uuid4().hex[:12]
        dirs = self.base / sandbox_id
        upper, work, merged = dirs / "upper", dirs / "work", dirs / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        options = f"lowerdir={self.template_root},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, merged], check=True)
        self.mounts.append(merged)
        # One core: a busy kernel (`while True`) must not starve the gateway on a 2-core machine.
        limits = Limits(memory_bytes=memory_bytes, cpu_millicores=1000, pids=1024)
        jail = self.loop.run_until_complete(self.runtime.start(sandbox_id, merged, limits))
        self.jails.append(jail)
        view = SandboxView(
            sandbox_id=sandbox_id,
            jail=jail,
            access_token=access_token,
            env_vars=env_vars or {},
        )
        self.lookup.sandboxes.append(view)
        return view

    def close(self) -> None:
        for jail in self.jails:
            self.loop.run_until_complete(jail.stop())
        for merged in self.mounts:
            subprocess.run(["umount", "--lazy", merged], check=True)
        self.loop.close()


@pytest.fixture(scope="session")
def template_root() -> Path:
    return built_template_root(TEMPLATE)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coppice-data")  # coppice-init is compiled once per session


@pytest.fixture
def jails(tmp_path: Path, template_root: Path, data_dir: Path) -> Iterator[Jails]:
    jails = Jails(base=tmp_path, template_root=template_root, runtime=LinuxRuntime(data_dir))
    try:
        yield jails
    finally:
        jails.close()


@pytest.fixture
def gateway(jails: Jails) -> Iterator[RunningGateway]:
    # Stopping the gateway runs the interpreter's lifespan shutdown: kernels stop before jails.
    with start_gateway(jails.lookup, interpreter=Interpreter()) as gw:
        yield gw


def sdk(gateway: RunningGateway, view: SandboxView) -> Sandbox:
    """The SDK's sandbox object for `view`, as `Sandbox.connect` would build it."""
    config = ConnectionConfig(sandbox_url=gateway.url, api_key="e2b_" + "0" * 40)
    return Sandbox(
        sandbox_id=view.sandbox_id,
        sandbox_domain=None,
        envd_version=Version("0.4.0"),
        envd_access_token=view.access_token,
        traffic_access_token=None,
        connection_config=config,
    )


@pytest.fixture
def sandbox(jails: Jails, gateway: RunningGateway) -> Sandbox:
    return sdk(gateway, jails.start())


# -- the seed's flow ---------------------------------------------------------------------------


def test_state_numpy_and_restart(sandbox: Sandbox) -> None:
    first = sandbox.run_code("x = 42")
    assert first.error is None
    assert first.logs.stdout == []
    assert first.results == []
    assert sandbox.run_code("print(x)").logs.stdout == ["42\n"]
    numpy = sandbox.run_code("import numpy as np\nnp.array([1, 2, 3])")
    assert numpy.text == "array([1, 2, 3])"
    assert sandbox.run_code("int(np.array([10, 20, 30]).sum())").text == "60"

    python = [c for c in sandbox.list_code_contexts() if c.language == "python"]
    assert len(python) == 1
    sandbox.restart_code_context(python[0])
    after = sandbox.run_code("print(x)")
    assert after.error is not None
    assert after.error.name == "NameError"


def test_results_mime_mapping(sandbox: Sandbox) -> None:
    figure = sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
    )
    assert figure.error is None
    pngs = [r.png for r in figure.results if r.png]
    assert len(pngs) == 1
    assert pngs[0].startswith("iVBORw0KGgo")  # base64 of the PNG signature

    frame = sandbox.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    assert frame.error is None
    (main,) = [r for r in frame.results if r.is_main_result]
    assert main.html is not None
    assert "<table" in main.html
    assert main.text is not None

    string = sandbox.run_code("'/home/user'")
    assert string.text == "/home/user"  # the quote stripping the upstream tests rely on


def test_error_has_name_value_traceback(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert execution.error is not None
    assert execution.error.name == "ValueError"
    assert execution.error.value == "bad value"
    assert "ValueError" in execution.error.traceback
    assert "f()" in execution.error.traceback
    # The next call is not aborted by the kernel's error handling.
    assert sandbox.run_code("print('after')").logs.stdout == ["after\n"]


def test_stdout_stderr_and_callbacks(sandbox: Sandbox) -> None:
    seen: list[tuple[str, str]] = []
    execution = sandbox.run_code(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)",
        on_stdout=lambda m: seen.append(("out", m.line)),
        on_stderr=lambda m: seen.append(("err", m.line)),
    )
    assert execution.logs.stdout == ["out\n"]
    assert execution.logs.stderr == ["err\n"]
    assert ("out", "out\n") in seen
    assert ("err", "err\n") in seen


def test_kernels_reply_without_idle_flushes_and_sleep(sandbox: Sandbox) -> None:
    """The kernel is launched without ipykernel's per-reply sleep and with a flush that skips
    its IOPub round trip when nothing is buffered, while output from C, subprocesses and
    threads still arrives before the call ends."""
    probe = sandbox.run_code(
        "import ipykernel.iostream\n"
        "print(get_ipython().kernel._execute_sleep, ipykernel.iostream.OutStream.flush.__name__)"
    )
    assert probe.logs.stdout == ["0.0 _flush_unless_idle\n"]
    execution = sandbox.run_code(
        "import os, subprocess, threading\n"
        "os.write(1, b'from C\\n')\n"
        "subprocess.run(['echo', 'from a child'])\n"
        "t = threading.Thread(target=print, args=('from a thread',)); t.start(); t.join()\n"
        "x = 1"
    )
    # Captured fds and Python's sys.stdout reach the kernel's stream separately: order may vary.
    assert sorted("".join(execution.logs.stdout).splitlines()) == [
        "from C", "from a child", "from a thread"
    ]  # fmt: skip
    bash = sandbox.create_code_context(language="bash")
    assert sandbox.run_code("echo $((6 * 7))", context=bash).logs.stdout == ["42\n"]


def test_timeout_interrupts_and_next_call_works(sandbox: Sandbox) -> None:
    sandbox.run_code("kept = 'still here'")
    with pytest.raises(Exception, match="timed out"):
        sandbox.run_code("while True:\n    pass", timeout=2)
    # The interrupt stopped the loop without losing the kernel's state.
    assert sandbox.run_code("print(kept)", timeout=60).logs.stdout == ["still here\n"]


def test_kernel_that_ignores_interrupts_is_replaced(sandbox: Sandbox) -> None:
    stubborn = (
        "import time\nwhile True:\n    try:\n        time.sleep(1)\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    with pytest.raises(Exception, match="timed out"):
        sandbox.run_code(stubborn, timeout=2)
    # Not stuck behind it: the kernel was replaced (so its state is gone).
    after = sandbox.run_code("print('alive'); time", timeout=120)
    assert after.logs.stdout == ["alive\n"]
    assert after.error is not None
    assert after.error.name == "NameError"


def test_calls_on_one_context_run_one_at_a_time(sandbox: Sandbox) -> None:
    sandbox.run_code("order = []")
    running = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(
            sandbox.run_code,
            "print('running', flush=True); import time; time.sleep(1); order.append('slow')",
            on_stdout=lambda _: running.set(),
        )
        assert running.wait(120)
        quick = pool.submit(sandbox.run_code, "order.append('quick')")
        assert slow.result(timeout=120).error is None
        assert quick.result(timeout=120).error is None
    assert sandbox.run_code("order").text == "['slow', 'quick']"


def test_restart_ends_a_running_call(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context()
    running = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            sandbox.run_code,
            "print('running', flush=True); import time; time.sleep(60)",
            context=context,
            on_stdout=lambda _: running.set(),
        )
        assert running.wait(120)
        sandbox.restart_code_context(context)
        execution = call.result(timeout=120)
    assert execution.error is not None
    assert execution.error.name == "ContextRestarting"
    assert execution.error.value == "Context was restarted"
    assert sandbox.run_code("print('fresh')", context=context).logs.stdout == ["fresh\n"]


def test_contexts_do_not_share_state(sandbox: Sandbox) -> None:
    one = sandbox.create_code_context()
    two = sandbox.create_code_context(cwd="/tmp")
    assert two.cwd == "/tmp"
    sandbox.run_code("y = 'one'", context=one)
    assert sandbox.run_code("print(y)", context=one).logs.stdout == ["one\n"]
    other = sandbox.run_code("print(y)", context=two)
    assert other.error is not None
    assert other.error.name == "NameError"
    assert sandbox.run_code("import os; print(os.getcwd())", context=two).logs.stdout == ["/tmp\n"]
    ids = [c.id for c in sandbox.list_code_contexts()]
    assert ids[-2:] == [one.id, two.id]  # creation order

    sandbox.remove_code_context(one)
    assert one.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(Exception, match="not found"):
        sandbox.run_code("print(1)", context=one)


def test_sandboxes_do_not_share_state(jails: Jails, gateway: RunningGateway) -> None:
    first = sdk(gateway, jails.start())
    second = sdk(gateway, jails.start())
    first.run_code("secret = 'first'")
    execution = second.run_code("print(secret)")
    assert execution.error is not None
    assert execution.error.name == "NameError"
    hostname = "import socket; print(socket.gethostname())"
    assert first.run_code(hostname).logs.stdout != second.run_code(hostname).logs.stdout


def test_kernel_killed_by_memory_limit_is_reported_and_replaced(
    jails: Jails, gateway: RunningGateway
) -> None:
    sandbox = sdk(gateway, jails.start(memory_bytes=256 * MiB))
    sandbox.run_code("before = 1")
    killed = sandbox.run_code("hog = b'x' * (1024 * 1024 * 1024)")
    assert killed.error is not None
    assert killed.error.name == "ContextRestarting"
    assert "signal 9" in killed.error.value
    fresh = sandbox.run_code("print('fresh'); print(before)")
    assert fresh.logs.stdout == ["fresh\n"]
    assert fresh.error is not None
    assert fresh.error.name == "NameError"  # a new kernel: the old state is gone


def test_bash_context(sandbox: Sandbox) -> None:
    bash = sandbox.create_code_context(language="bash")
    assert bash.language == "bash"
    assert sandbox.run_code("x=5; echo $x", context=bash).logs.stdout == ["5\n"]
    kept = sandbox.run_code('cd /tmp; echo "$x $(pwd)"', context=bash)
    assert kept.logs.stdout == ["5 /tmp\n"]
    failed = sandbox.run_code("ls /nonexistent", context=bash)
    assert failed.error is not None
    assert failed.error.value == "2"
    assert "No such file or directory" in "".join(failed.logs.stderr)
    assert sandbox.run_code("pwd", language="bash").logs.stdout == ["/home/user\n"]
    with pytest.raises(Exception, match="timed out"):
        sandbox.run_code("while true; do :; done", context=bash, timeout=2)
    assert sandbox.run_code("echo $x", context=bash, timeout=60).logs.stdout == ["5\n"]


def test_env_vars_apply_to_one_call(jails: Jails, gateway: RunningGateway) -> None:
    sandbox = sdk(gateway, jails.start(env_vars={"GLOBAL": "sandbox"}))
    read = "import os; print(os.environ.get('GLOBAL'), os.environ.get('CALL'))"
    assert sandbox.run_code(read).logs.stdout == ["sandbox None\n"]
    during = sandbox.run_code(read, envs={"GLOBAL": "call's", "CALL": 'x "y" 😀'})
    assert during.logs.stdout == ['call\'s x "y" 😀\n']
    assert sandbox.run_code(read).logs.stdout == ["sandbox None\n"]
    bash = sandbox.run_code('echo "$CALL"', language="bash", envs={"CALL": "in bash"})
    assert bash.logs.stdout == ["in bash\n"]
    assert sandbox.run_code('echo "[$CALL]"', language="bash").logs.stdout == ["[]\n"]


def test_unsupported_language_is_a_clear_error(sandbox: Sandbox) -> None:
    with pytest.raises(Exception, match="no cobol kernel"):
        sandbox.run_code("1", language="cobol")


def test_sandbox_without_ipykernel_answers_clearly(jails: Jails, gateway: RunningGateway) -> None:
    jails.template_root = built_template_root("base")  # Debian with python3 but no ipykernel
    sandbox = sdk(gateway, jails.start())
    with pytest.raises(Exception, match=r"(?s)500.*python kernel did not start.*ipykernel"):
        sandbox.run_code("1")


# -- the wire, below the SDK -------------------------------------------------------------------


def test_execute_stream_format(jails: Jails, gateway: RunningGateway) -> None:
    view = jails.start(access_token="secret-token")
    headers = {"E2b-Sandbox-Id": view.sandbox_id, "E2b-Sandbox-Port": "49999"}
    body = {"code": "print('a')\n1 + 1", "context_id": None, "language": None, "env_vars": None}
    response = httpx.post(
        gateway.url + "/execute",
        json=body,
        headers={**headers, "X-Access-Token": "secret-token"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.text.endswith('{"type": "end_of_execution"}\n')
    lines = [json.loads(line) for line in response.text.split("\n")[:-1]]  # no blank lines
    types = [line["type"] for line in lines]
    assert types == ["number_of_executions", "stdout", "result", "end_of_execution"]
    assert lines[1]["text"] == "a\n"
    assert "+00:00" in lines[1]["timestamp"]
    assert lines[2] == {"type": "result", "text": "2", "extra": {}, "is_main_result": True}

    unauthorized = httpx.post(gateway.url + "/execute", json=body, headers=headers, timeout=60)
    assert unauthorized.status_code == 401
    both = httpx.post(
        gateway.url + "/execute",
        json={**body, "context_id": "x", "language": "python"},
        headers={**headers, "X-Access-Token": "secret-token"},
    )
    assert both.status_code == 400
    invalid = httpx.post(
        gateway.url + "/execute",
        json={"context_id": None},
        headers={**headers, "X-Access-Token": "secret-token"},
    )
    assert invalid.status_code == 422
    assert "detail" in invalid.json()
    health = httpx.get(gateway.url + "/health", headers=headers)
    assert health.json() == "OK"


def test_keepalive_lines_during_silence(jails: Jails, gateway: RunningGateway) -> None:
    view = jails.start()
    headers = {"E2b-Sandbox-Id": view.sandbox_id, "E2b-Sandbox-Port": "49999"}
    silent = f"import time; time.sleep({KEEPALIVE_SECONDS + 1.5}); print('done')"
    response = httpx.post(
        gateway.url + "/execute", json={"code": silent}, headers=headers, timeout=120
    )
    types = [json.loads(line)["type"] for line in response.text.splitlines()]
    assert types[0] == "number_of_executions"
    assert set(types[1:-2]) == {"keepalive"}
    assert types[-2:] == ["stdout", "end_of_execution"]


def test_result_mapping_quirks() -> None:
    item = result_item(
        {"text/plain": '"quoted"', "image/png": "AAA", "application/x-custom": {"k": 1}},
        is_main_result=False,
    )
    assert item == {
        "type": "result",
        "text": "quoted",
        "png": "AAA",
        "extra": {"application/x-custom": {"k": 1}},
        "is_main_result": False,
    }
    assert result_item({"text/plain": "'"}, is_main_result=True)["text"] == "'"


# -- the official Node SDK ---------------------------------------------------------------------

NODE_DIR = REPO / "tests" / "node"
NODE_SCRIPT = """
import { Sandbox } from '@e2b/code-interpreter'
const [sandboxUrl, sandboxId] = process.argv.slice(1)
const apiKey = 'e2b_' + '0'.repeat(40)
const sandbox = new Sandbox({ sandboxId, sandboxUrl, envdVersion: '0.4.0', apiKey })
const out = {}
await sandbox.runCode('x = 42')
out.text = (await sandbox.runCode('x')).text
out.stdout = (await sandbox.runCode('print(x)')).logs.stdout
out.error = (await sandbox.runCode('1/0')).error?.name
out.env = (await sandbox.runCode("import os; os.environ['E']", { envs: { E: 'node' } })).text
const bash = await sandbox.createCodeContext({ language: 'bash' })
out.bash = (await sandbox.runCode('echo $((6 * 7))', { context: bash })).logs.stdout
out.contexts = (await sandbox.listCodeContexts()).map((c) => c.language)
try {
  await sandbox.runCode('import time; time.sleep(30)', { timeoutMs: 1500 })
  out.timedOut = false
} catch (e) {
  out.timedOut = true
}
out.after = (await sandbox.runCode('x + 1')).text
console.log(JSON.stringify(out))
"""


def test_node_sdk(jails: Jails, gateway: RunningGateway) -> None:
    view = jails.start()
    proc = subprocess.run(
        ["node", "--input-type=module", "-e", NODE_SCRIPT, gateway.url, view.sandbox_id],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "text": "42",
        "stdout": ["42\n"],
        "error": "ZeroDivisionError",
        "env": "node",
        "bash": ["42\n"],
        # the default context of each installed language, then the one it created
        "contexts": ["python", "bash", "javascript", "typescript", "r", "java", "bash"],
        "timedOut": True,
        "after": "43",
    }


def test_kernels_run_as_root_in_the_default_user_s_home(sandbox: Sandbox) -> None:
    """As upstream's Jupyter server (root, no User= in its unit): root's kernels, the default
    context's cwd the sandbox user's home, and a context may start where only root can go."""
    execution = sandbox.run_code("import getpass, os; (getpass.getuser(), os.getcwd())")
    assert execution.error is None, execution.error
    assert execution.text == "('root', '/home/user')"
    context = sandbox.create_code_context(language="python", cwd="/root")
    assert context.cwd == "/root"
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == "/root"
