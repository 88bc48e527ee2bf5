"""The code interpreter's other languages through the official `e2b-code-interpreter` SDK against
a real `coppice serve` on the built `code-interpreter-v1` template: javascript and typescript
(Deno's Jupyter kernel), r (IRkernel) and java (Coppice's kernel over jshell), each with its
state, output, errors, working directory and environment variables, and the default contexts
`list_code_contexts` shows.

One sandbox (with sandbox-wide variables) serves the module, but java gets its own: a JVM with
jshell's compiler (about 100 MB) does not fit in 512 MB next to Deno's two kernels (about 180 MB
each) and ipykernel. Each test keeps to its own names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from e2b_code_interpreter import Sandbox
from fixtures.stack import Stack

pytestmark = pytest.mark.slow

FIRST_RUN_BUDGET = 5.0  # seconds; about 0.5-1 s on an idle machine, the bound leaves room for CI


def _create(stack: Stack, envs: dict[str, str] | None = None) -> Sandbox:
    return Sandbox.create(
        "code-interpreter-v1",
        **stack.sdk_options(),
        timeout=300,
        envs=envs,
    )


@pytest.fixture(scope="module")
def sandbox(coppice_stack: Stack) -> Iterator[Sandbox]:
    sandbox = _create(coppice_stack, {"SANDBOX_WIDE": "from the sandbox"})
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture(scope="module")
def java_sandbox(coppice_stack: Stack) -> Iterator[Sandbox]:
    sandbox = _create(coppice_stack, {"SANDBOX_WIDE": "from the sandbox"})
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _timed_first_run(sandbox: Sandbox, code: str, language: str) -> float:
    started = time.monotonic()
    execution = sandbox.run_code(code, language=language)
    took = time.monotonic() - started
    assert execution.error is None, execution.error
    print(f"first {language} run_code: {took:.2f} s")
    return took


def test_default_contexts_per_installed_language(sandbox: Sandbox) -> None:
    languages = [context.language for context in sandbox.list_code_contexts()]
    assert languages[0] == "python"
    assert {"python", "javascript", "typescript", "r", "bash", "java"} <= set(languages)
    assert len(languages) == len(set(languages))  # one default each
    assert {context.cwd for context in sandbox.list_code_contexts()} == {"/home/user"}


# -- javascript and typescript -----------------------------------------------------------------


def test_javascript_default_context(sandbox: Sandbox) -> None:
    assert _timed_first_run(sandbox, "1", "js") < FIRST_RUN_BUDGET
    hello = sandbox.run_code("console.log('Hello, World!')", language="js")
    assert hello.logs.stdout == ["Hello, World!\n"]
    assert sandbox.run_code("console.error('oops')", language="js").logs.stderr == ["oops\n"]
    assert sandbox.run_code("process.cwd()", language="javascript").text == "/home/user"
    sandbox.run_code("let counter = 41", language="js")
    assert sandbox.run_code("counter + 1", language="js").text == "42"
    awaited = sandbox.run_code("console.log(await Promise.resolve('later'))", language="js")
    assert awaited.logs.stdout == ["later\n"]  # top-level await
    assert sandbox.run_code("'a string'", language="js").text == "a string"  # without quotes
    # Deno publishes some results just after its idle status: none may go missing or astray.
    for n in range(20):
        assert sandbox.run_code(f"{n} * 2", language="js").text == str(n * 2)
    esm = sandbox.run_code(
        "import { readFileSync } from 'node:fs'\nconsole.log(typeof readFileSync)", language="js"
    )
    assert esm.logs.stdout == ["function\n"]
    failed = sandbox.run_code("throw new TypeError('bad thing')", language="js")
    assert failed.error is not None
    assert (failed.error.name, failed.error.value) == ("TypeError", "bad thing")
    assert sandbox.run_code("counter", language="js").text == "41"  # state survived the error


def test_typescript_has_its_own_context(sandbox: Sandbox) -> None:
    typed = sandbox.run_code("const message: string = 'typed'; console.log(message)", language="ts")
    assert typed.logs.stdout == ["typed\n"]
    assert sandbox.run_code("process.cwd()", language="typescript").text == "/home/user"
    sandbox.run_code("const onlyInTs: number = 1", language="ts")
    missing = sandbox.run_code("onlyInTs", language="js")
    assert missing.error is not None
    assert missing.error.name == "ReferenceError"


def test_javascript_env_vars(sandbox: Sandbox) -> None:
    assert sandbox.run_code("process.env.SANDBOX_WIDE", language="js").text == "from the sandbox"
    value = 'it\'s "quoted" \\ 😀\nline'
    check = "process.env.SANDBOX_WIDE === 'overwritten' && process.env.JS_CALL === " + repr(value)
    during = sandbox.run_code(
        f"console.log({check})",
        language="js",
        envs={"SANDBOX_WIDE": "overwritten", "JS_CALL": value},
    )
    assert during.logs.stdout == ["true\n"]
    after = sandbox.run_code(
        "console.log(process.env.SANDBOX_WIDE, process.env.JS_CALL ?? 'unset')", language="js"
    )
    assert after.logs.stdout == ["from the sandbox unset\n"]


def test_created_javascript_context_honours_cwd(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context(language="ts", cwd="/tmp")
    assert (context.language, context.cwd) == ("typescript", "/tmp")
    assert sandbox.run_code("process.cwd()", context=context).text == "/tmp"
    listed = sandbox.list_code_contexts()[-1]
    assert (listed.id, listed.language, listed.cwd) == (context.id, "typescript", "/tmp")


# -- r -----------------------------------------------------------------------------------------


def test_r_default_context(sandbox: Sandbox) -> None:
    assert _timed_first_run(sandbox, "1", "r") < FIRST_RUN_BUDGET
    hello = sandbox.run_code('print("Hello, World!")', language="r")
    assert hello.logs.stdout == ['[1] "Hello, World!"\n']
    assert sandbox.run_code("getwd()", language="r").results[0].text.strip() == '[1] "/home/user"'
    sandbox.run_code("counter <- 41", language="r")
    assert sandbox.run_code("counter + 1", language="r").results[0].text.strip() == "[1] 42"
    failed = sandbox.run_code('stop("bad thing")', language="r")
    assert failed.error is not None
    assert "bad thing" in failed.error.value


def test_r_env_vars(sandbox: Sandbox) -> None:
    read = "Sys.getenv('SANDBOX_WIDE')"
    assert sandbox.run_code(read, language="r").results[0].text.strip() == '[1] "from the sandbox"'
    value = 'it\'s "quoted" \\ 😀'
    during = sandbox.run_code(
        f"cat(Sys.getenv('SANDBOX_WIDE'), Sys.getenv('R_CALL') == {value!r})",
        language="r",
        envs={"SANDBOX_WIDE": "overwritten", "R_CALL": value},
    )
    assert during.logs.stdout == ["overwritten TRUE"]
    after = sandbox.run_code(
        "cat(Sys.getenv('SANDBOX_WIDE'), Sys.getenv('R_CALL', unset = 'unset'))", language="r"
    )
    assert after.logs.stdout == ["from the sandbox unset"]


def test_created_r_context_honours_cwd(sandbox: Sandbox) -> None:
    context = sandbox.create_code_context(language="r", cwd="/tmp")
    assert sandbox.run_code("getwd()", context=context).results[0].text.strip() == '[1] "/tmp"'


# -- java ----------------------------------------------------------------------------------------


def test_java_default_context(java_sandbox: Sandbox) -> None:
    assert _timed_first_run(java_sandbox, "1", "java") < FIRST_RUN_BUDGET
    hello = java_sandbox.run_code('System.out.println("Hello, World!")', language="java")
    assert hello.logs.stdout == ["Hello, World!", "\n"]  # as IJava: text and line break apart
    oops = java_sandbox.run_code('System.err.print("oops")', language="java")
    assert oops.logs.stderr == ["oops"]
    cwd = java_sandbox.run_code('System.getProperty("user.dir")', language="java")
    assert cwd.results[0].text == "/home/user"
    java_sandbox.run_code("int counter = 41;", language="java")
    assert java_sandbox.run_code("counter + 1", language="java").text == "42"
    assert java_sandbox.run_code('"a string"', language="java").text == "a string"  # toString
    # Several snippets in one cell, a method declared and used later: the last value is the result.
    java_sandbox.run_code("int twice(int n) { return 2 * n; }", language="java")
    several = java_sandbox.run_code(
        'String s = "x"; System.out.print(s); twice(counter)', language="java"
    )
    assert (several.logs.stdout, several.text) == (["x"], "82")
    assert java_sandbox.run_code("new int[] {1, 2}", language="java").text == "int[2] { 1, 2 }"
    assert java_sandbox.run_code("int nothing = 0;", language="java").results == []

    thrown = java_sandbox.run_code('throw new IllegalStateException("bad thing")', language="java")
    assert thrown.error is not None
    assert (thrown.error.name, thrown.error.value) == (
        "java.lang.IllegalStateException",
        "bad thing",
    )
    uncompiled = java_sandbox.run_code("int broken = ;", language="java")
    assert uncompiled.error is not None
    assert uncompiled.error.name == "CompilationException"
    stopped = java_sandbox.run_code(
        'System.out.print("before"); int n = ; counter', language="java"
    )
    assert stopped.logs.stdout == ["before"]  # what ran before the failing snippet
    assert stopped.error is not None
    assert stopped.results == []
    # State survived the errors.
    assert java_sandbox.run_code("counter", language="java").text == "41"


def test_java_env_vars(java_sandbox: Sandbox) -> None:
    # As upstream, Java code reads environment variables as system properties.
    read = 'System.getProperty("SANDBOX_WIDE")'
    assert java_sandbox.run_code(read, language="java").text == "from the sandbox"
    value = 'it\'s "quoted" \\ \\u0041 😀'
    during = java_sandbox.run_code(
        'System.getProperty("SANDBOX_WIDE") + " " + System.getProperty("JAVA_CALL").equals('
        + json.dumps(value)
        + ")",
        language="java",
        envs={"SANDBOX_WIDE": "overwritten", "JAVA_CALL": value},
    )
    assert during.text == "overwritten true"
    after = java_sandbox.run_code(
        'System.getProperty("SANDBOX_WIDE") + " " + System.getProperty("JAVA_CALL", "unset")',
        language="java",
    )
    assert after.text == "from the sandbox unset"


def test_created_java_context_honours_cwd(java_sandbox: Sandbox) -> None:
    context = java_sandbox.create_code_context(language="java", cwd="/tmp")
    assert java_sandbox.run_code('System.getProperty("user.dir")', context=context).text == "/tmp"


def test_a_template_without_kernels_lists_none_and_warms_none(coppice_stack: Stack) -> None:
    base = Sandbox.create(
        "base",
        **coppice_stack.sdk_options(),
        timeout=120,
    )
    try:
        assert base.list_code_contexts() == []
        time.sleep(1)  # a warm-up would have started (and failed) by now
        assert f"no warm python kernel for {base.sandbox_id}" not in (
            coppice_stack.log_path.read_text()
        )
    finally:
        base.kill()
