"""`coppice`: the command line. Parses the arguments, makes the Settings once, and hands them
to a subcommand of coppice/commands (which alone prints)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from coppice.settings import (
    DEFAULT_API_PORT,
    DEFAULT_DATA_DIR,
    DEFAULT_DNS_LISTEN,
    DEFAULT_DNS_PORT,
    DEFAULT_DOMAIN,
    DEFAULT_GATEWAY_PORTS,
    DEFAULT_HOST,
    DEFAULT_TEMPLATES,
    DEFAULT_TLS_PORT,
    STORAGE_KINDS,
    Settings,
)

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
    serve.add_argument("--host", default=DEFAULT_HOST, help="listen address (default: %(default)s)")
    serve.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    serve.add_argument(
        "--gateway-ports",
        type=_ports,
        default=DEFAULT_GATEWAY_PORTS,
        help=f"comma-separated gateway ports (default: {_port_list(DEFAULT_GATEWAY_PORTS)})",
    )
    serve.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        help="sandbox domain returned to SDKs: hosts are <port>-<id>.<domain>",
    )
    serve.add_argument(
        "--tls",
        action="store_true",
        help="also serve the gateway over TLS (h2 and HTTP/1.1) on --tls-port, with a local CA "
        "made in the data dir on the first start",
    )
    serve.add_argument(
        "--tls-port", type=int, default=DEFAULT_TLS_PORT, help="(default: %(default)s)"
    )
    serve.add_argument(
        "--no-jail-network",
        dest="jail_network",
        action="store_false",
        help="jails share the host's network instead of one namespace each (then their own "
        "listeners are not reachable through the gateway, nor kept apart)",
    )
    serve.add_argument("--storage", choices=STORAGE_KINDS, default="auto")
    serve.add_argument("--zfs-dataset", help="parent dataset for --storage zfs, e.g. POOL/coppice")
    serve.add_argument(
        "--templates",
        default=",".join(DEFAULT_TEMPLATES),
        help="templates to build (once) before serving; empty for none",
    )

    template = add_parser(sub, "template", "build, import and list sandbox templates")
    template.add_argument("--storage", choices=STORAGE_KINDS, default="auto")
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
    env.add_argument("--tls", action="store_true", help="the TLS gateway of `serve --tls`")
    env.add_argument("--tls-port", type=int, default=DEFAULT_TLS_PORT)
    env_format = env.add_mutually_exclusive_group()
    env_format.add_argument(
        "--shell", dest="format", action="store_const", const="shell", help="export lines (default)"
    )
    env_format.add_argument("--json", dest="format", action="store_const", const="json")

    dns = add_parser(sub, "dns", "answer <domain> and *.<domain> with the gateway's address")
    dns.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        help="the sandbox domain; a port after it is ignored (default: %(default)s)",
    )
    dns.add_argument(
        "--address",
        default=Settings().client_address,
        help="the gateway's address, the answer (default: %(default)s)",
    )
    dns.add_argument("--listen", default=DEFAULT_DNS_LISTEN, help="(default: %(default)s)")
    dns.add_argument("--port", type=int, default=DEFAULT_DNS_PORT, help="(default: %(default)s)")
    return parser


def _port_list(ports: tuple[int, ...]) -> str:
    return ",".join(map(str, ports))


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
    # Imported when chosen: `serve` and `template` load the whole service.
    if args.command == "serve":
        from coppice.commands.serve import run_serve

        return run_serve(settings_from(args))
    if args.command == "template":
        from coppice.commands import template

        settings = settings_from(args)
        if args.template_command == "build":
            return template.build_template(settings, args.name)
        if args.template_command == "import":
            return template.import_template(settings, args.name, args.tarball)
        return template.list_templates(settings)
    if args.command == "sandbox":
        from coppice.commands.sandbox import run_sandbox

        return run_sandbox(
            args.data_dir, args.api_url, args.sandbox_command, getattr(args, "sandbox_id", None)
        )
    if args.command == "env":
        from coppice.commands.env import run_env

        return run_env(
            args.data_dir,
            args.address,
            args.api_port,
            args.gateway_port,
            args.domain,
            tls_port=args.tls_port if args.tls else None,
            as_json=args.format == "json",
        )
    if args.command == "dns":
        from coppice.commands.dns import run_dns

        return run_dns(args.domain, args.address, args.listen, args.port)
    raise AssertionError(args.command)


def settings_from(args: argparse.Namespace) -> Settings:
    """The Settings of `serve`, or of `template` (which takes only the storage ones)."""
    storage = Settings(
        data_dir=args.data_dir.absolute(), storage=args.storage, zfs_dataset=args.zfs_dataset
    )
    if args.command != "serve":
        return storage
    return replace(
        storage,
        host=args.host,
        api_port=args.api_port,
        gateway_ports=args.gateway_ports,
        domain=args.domain,
        templates=tuple(filter(None, (n.strip() for n in args.templates.split(",")))),
        tls=args.tls,
        tls_port=args.tls_port,
        jail_network=args.jail_network,
    )


if __name__ == "__main__":
    raise SystemExit(main())
