"""A persistent Jupyter kernel in a Coppice sandbox, through the official `e2b-code-interpreter`
Python SDK: state survives between `run_code` calls until the context is restarted.

Run it against `coppice serve` with the environment `coppice env` prints, and nothing else
(no E2B_DEBUG, no URL of our own):

    eval "$(coppice env)" && .venv/bin/python examples/02-persistent-kernel.py

The SDK dials `api.<domain>` and `<port>-<sandbox id>.<domain>`, so those names must resolve to
the gateway: the first thing it does is check that (README.md, "Wildcard DNS"; `coppice dns`).
`Sandbox.create()` uses the SDK's default template, `code-interpreter-v1`.
"""

from __future__ import annotations

import os
import socket
import sys

from e2b_code_interpreter import Sandbox


def dns_preflight() -> None:
    """Resolve the names the SDK is about to dial, or stop here saying how to make them resolve."""
    domain = os.environ.get("E2B_DOMAIN", "e2b.app").rsplit(":", 1)[0]  # a port may follow
    resolved = []
    for name in (f"api.{domain}", f"49999-preflight.{domain}"):
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            sys.exit(
                f"dns: {name} does not resolve ({error.strerror}); the SDK dials api.{domain} "
                f"and <port>-<sandbox id>.{domain}.\n"
                f"Make {domain} and *.{domain} resolve to the gateway: see README.md, "
                '"Wildcard DNS" (dnsmasq, systemd-resolved, macOS), or run `coppice dns` '
                "and point this machine's resolver at it."
            )
        resolved.append((name, infos[0][4][0]))
    name, address = resolved[0]
    print(f"dns: {name} -> {address}")


def main() -> None:
    dns_preflight()
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
