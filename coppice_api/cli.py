"""`coppice`: the command line, and the composition root that picks the backends."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coppice",
        description="Self-hosted E2B-compatible sandboxes on jails and copy-on-write clones.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("serve", help="run the lifecycle API and the envd gateway")
    sub.add_parser("template", help="build, import and list sandbox templates")
    sub.add_parser("sandbox", help="list, inspect and kill sandboxes")
    sub.add_parser("env", help="print the environment variables an E2B SDK client needs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"coppice {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
