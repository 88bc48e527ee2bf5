"""A short tour of a Coppice sandbox through the official, unmodified `e2b` Python SDK.

Run it against `coppice serve` with the environment `coppice env` prints
(E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN):

    eval "$(coppice env)" && .venv/bin/python examples/01-commands-and-files.py
"""

from __future__ import annotations

from e2b import CommandExitException, Sandbox


def main() -> None:
    with Sandbox.create(template="base", timeout=120, metadata={"example": "01"}) as sandbox:
        print("sandbox id:", sandbox.sandbox_id)

        result = sandbox.commands.run("echo hello from $(hostname) as $(whoami) in $(pwd)")
        print("[1] run:", result.stdout.strip())

        try:
            sandbox.commands.run("echo oops >&2; exit 3")
        except CommandExitException as failed:
            print(f"[2] exit code {failed.exit_code}, stderr={failed.stderr.strip()!r}")

        sandbox.files.write("/home/user/notes/hello.txt", "written through /files\n")
        print("[3] read back:", sandbox.files.read("/home/user/notes/hello.txt").strip())
        print("[4] list:", [entry.name for entry in sandbox.files.list("/home/user/notes")])

        background = sandbox.commands.run("sleep 30", background=True)
        print("[5] running:", [p.pid for p in sandbox.commands.list()])
        print("[6] killed:", background.kill())

        print("[7] as root:", sandbox.commands.run("id -un", user="root").stdout.strip())
    print("ok")


if __name__ == "__main__":
    main()
