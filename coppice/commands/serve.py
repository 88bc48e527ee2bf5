"""`coppice serve`: runs the service (coppice.serve) and prints how to reach it once it is up."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging

from coppice.commands.console import progress
from coppice.commands.env import client_env
from coppice.serve import serve
from coppice_api.auth import ApiKeys
from coppice_envd.app import run_servers


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    with contextlib.suppress(KeyboardInterrupt):
        run_servers(serve(args, progress, functools.partial(print_ready, args)))
    return 0


def print_ready(args: argparse.Namespace, keys: ApiKeys) -> None:
    key = keys.keys[0]
    address = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    env = client_env(key, address, args.api_port, args.gateway_ports[0], args.domain)
    note = "a new API key was created" if keys.created is not None else "API key"
    print(
        f"\ncoppice is serving: API on :{args.api_port}, gateway on "
        f"{', '.join(f':{p}' for p in args.gateway_ports)}\n"
        f"{note} (stored in {keys.source}): {key}\n"
        "Point an E2B SDK here with:\n\n"
        f"{env}\n",
        flush=True,
    )
