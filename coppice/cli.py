"""`coppice`: the command line, and the composition root that picks the backends."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.environ.get("COPPICE_DATA_DIR", "/var/lib/coppice"))
DEFAULT_API_PORT = 3000
DEFAULT_GATEWAY_PORTS = (49983, 49999)
DEFAULT_DOMAIN = "coppice.lan"
DATA_DIR_HELP = f"state, templates and keys (default: {DEFAULT_DATA_DIR}, or $COPPICE_DATA_DIR)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coppice",
        description="Self-hosted E2B-compatible sandboxes on jails and copy-on-write clones.",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=DATA_DIR_HELP)
    # Every subcommand takes --data-dir too (`coppice serve --data-dir DIR`, as `scripts/serve
    # ARGS` passes it); SUPPRESS leaves the global value alone unless it is given there.
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help=DATA_DIR_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
    ) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=summary, parents=[data_dir])

    serve = add_parser(sub, "serve", "run the lifecycle API and the envd gateway")
    serve.add_argument("--host", default="0.0.0.0", help="listen address (default: %(default)s)")
    serve.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    serve.add_argument(
        "--gateway-ports",
        type=_ports,
        default=DEFAULT_GATEWAY_PORTS,
        help="comma-separated gateway ports (default: 49983,49999)",
    )
    serve.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        help="sandbox domain returned to SDKs: hosts are <port>-<id>.<domain>",
    )
    serve.add_argument("--storage", choices=("auto", "zfs", "overlay"), default="auto")
    serve.add_argument("--zfs-dataset", help="parent dataset for --storage zfs, e.g. POOL/coppice")
    serve.add_argument(
        "--templates",
        default="base,code-interpreter-v1",
        help="templates to build (once) before serving; empty for none",
    )

    template = add_parser(sub, "template", "build, import and list sandbox templates")
    template.add_argument("--storage", choices=("auto", "zfs", "overlay"), default="auto")
    template.add_argument("--zfs-dataset")
    tsub = template.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    build = add_parser(tsub, "build", "build a template (base, code-interpreter-v1)")
    build.add_argument("name")
    imp = add_parser(tsub, "import", "import a root filesystem tarball as a template")
    imp.add_argument("name")
    imp.add_argument("tarball", type=Path)
    add_parser(tsub, "list", "list templates: name, size, created, backend")

    sandbox = add_parser(sub, "sandbox", "list, inspect and kill sandboxes (via the API)")
    sandbox.add_argument("--api-url", default=None, help="default: $E2B_API_URL or localhost")
    ssub = sandbox.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)
    add_parser(ssub, "list", "list sandboxes")
    info = add_parser(ssub, "info", "show one sandbox")
    info.add_argument("sandbox_id")
    kill = add_parser(ssub, "kill", "kill a sandbox")
    kill.add_argument("sandbox_id")

    env = add_parser(sub, "env", "print the environment variables an E2B SDK client needs")
    env.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    env.add_argument("--gateway-port", type=int, default=DEFAULT_GATEWAY_PORTS[0])
    env.add_argument("--address", default="127.0.0.1")
    env.add_argument("--domain", default=DEFAULT_DOMAIN)
    return parser


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated port list: {text!r}") from None
    if not ports:
        raise argparse.ArgumentTypeError("at least one port")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from coppice.serve import run_serve

        return run_serve(args)
    if args.command == "template":
        from coppice.serve import run_template

        return run_template(args)
    if args.command == "sandbox":
        return _sandbox_command(args)
    if args.command == "env":
        key = configured_api_key(args.data_dir)
        print(client_env(key, args.address, args.api_port, args.gateway_port, args.domain))
        return 0
    raise AssertionError(args.command)


def configured_api_key(data_dir: Path) -> str | None:
    """The first configured API key, if any (creates none)."""
    from coppice_api.auth import read_api_keys

    return next(iter(read_api_keys(data_dir)), None)


def client_env(key: str | None, address: str, api_port: int, gateway_port: int, domain: str) -> str:
    """Shell `export` lines that point an unmodified E2B SDK at this Coppice."""
    key = key or "<no key yet: run coppice serve once>"
    return "\n".join(
        [
            f"export E2B_API_KEY={key}",
            f"export E2B_API_URL=http://{address}:{api_port}",
            # One origin for every sandbox; the gateway routes on E2b-Sandbox-Id/-Port.
            f"export E2B_SANDBOX_URL=http://{address}:{gateway_port}",
            f"export E2B_DOMAIN={domain}",
        ]
    )


def _sandbox_command(args: argparse.Namespace) -> int:
    api_url = (args.api_url or os.environ.get("E2B_API_URL") or "http://127.0.0.1:3000").rstrip("/")
    key = os.environ.get("E2B_API_KEY") or configured_api_key(args.data_dir) or ""
    if args.sandbox_command == "list":
        status, body = _api_call("GET", f"{api_url}/v2/sandboxes", key)
        if status == 200:
            _print_sandbox_table(body)
            return 0
    elif args.sandbox_command == "info":
        status, body = _api_call("GET", f"{api_url}/sandboxes/{args.sandbox_id}", key)
        if status == 200:
            print(json.dumps(body, indent=2))
            return 0
    else:
        status, body = _api_call("DELETE", f"{api_url}/sandboxes/{args.sandbox_id}", key)
        if status == 204:
            print(f"killed {args.sandbox_id}")
            return 0
    message = body.get("message") if isinstance(body, dict) else body
    print(f"error {status}: {message}", file=sys.stderr)
    return 1


def _print_sandbox_table(sandboxes: list[dict[str, Any]]) -> None:
    print(f"{'SANDBOX ID':<24} {'TEMPLATE':<22} {'STATE':<8} {'STARTED':<26} END")
    for s in sandboxes:
        print(
            f"{s['sandboxID']:<24} {s['templateID']:<22} {s['state']:<8} "
            f"{s['startedAt']:<26} {s['endAt']}"
        )


def _api_call(method: str, url: str, key: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")
    except urllib.error.URLError as error:
        return 0, f"cannot reach {url}: {error.reason}"


if __name__ == "__main__":
    raise SystemExit(main())
