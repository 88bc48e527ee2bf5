"""A persistent Jupyter kernel in a Coppice sandbox, through the official `e2b-code-interpreter`
Python SDK: state survives between `run_code` calls until the context is restarted.

Run it against `coppice serve` with the environment `coppice env` prints
(E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN):

    eval "$(coppice env)" && .venv/bin/python examples/02-persistent-kernel.py

`Sandbox.create()` uses the SDK's default template, `code-interpreter-v1`.
"""

from __future__ import annotations

import e2b_code_interpreter


class Sandbox(e2b_code_interpreter.Sandbox):  # type: ignore[misc]  # the SDK ships untyped
    # The gateway serves plain HTTP; the SDK assumes TLS for port 49999 outside debug mode.
    @property
    def _jupyter_url(self) -> str:
        return str(super()._jupyter_url).replace("https://", "http://", 1)


def main() -> None:
    sandbox = Sandbox.create()
    try:
        print("sandbox id:", sandbox.sandbox_id)

        first = sandbox.run_code("x = 42")
        print(f"[1] x = 42 stdout={first.logs.stdout} results={len(first.results)}")

        printed = sandbox.run_code("print(x)")
        print(f"[2] print(x) stdout={''.join(printed.logs.stdout).strip()!r}")

        numpy = sandbox.run_code("import numpy as np\nnp.array([1, 2, 3])")
        print(f"[3] numpy result text={numpy.text!r}")

        still = sandbox.run_code("int(np.array([x, 18]).sum())")
        print(f"[4] np still there text={still.text!r}")

        context = next(c for c in sandbox.list_code_contexts() if c.language == "python")
        sandbox.restart_code_context(context)
        print(f"[5] kernel restarted via Sandbox.restart_code_context({context.id})")

        after = sandbox.run_code("print(x)")
        assert after.error is not None, "the restart kept the kernel's state"
        print(f"[6] print(x) after restart error.name={after.error.name!r}")
    finally:
        sandbox.kill()
    print("ok")


if __name__ == "__main__":
    main()
