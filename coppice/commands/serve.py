"""`coppice serve`: runs the service (coppice.serve) and prints how to reach it once it is up."""

from __future__ import annotations

import contextlib
import functools
import logging

from coppice.commands.console import progress
from coppice.commands.env import client_env, export_lines
from coppice.serve import serve
from coppice.settings import Settings
from coppice.tls import tls_files
from coppice_api.auth import ApiKeys
from coppice_envd.server import run_servers


def run_serve(settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    with contextlib.suppress(KeyboardInterrupt):
        run_servers(serve(settings, progress, functools.partial(print_ready, settings)))
    return 0


def print_ready(settings: Settings, keys: ApiKeys) -> None:
    key = keys.keys[0]
    tls = (settings.tls_port, tls_files(settings.data_dir)) if settings.tls else None
    env = client_env(
        key,
        settings.client_address,
        settings.api_port,
        settings.gateway_ports[0],
        settings.domain,
        tls,
    )
    note = "a new API key was created" if keys.created is not None else "API key"
    listeners = ", ".join(f":{p}" for p in settings.gateway_ports)
    if tls is not None:
        listeners += f", TLS on :{settings.tls_port} (CA {tls[1].ca_cert})"
    print(
        f"\ncoppice is serving: API on :{settings.api_port}, gateway on {listeners}\n"
        f"{note} (stored in {keys.source}): {key}\n"
        "Point an E2B SDK here with:\n\n"
        f"{export_lines(env)}\n"
        + (
            f"\nand *.{settings.domain} resolving to this machine (README, Wildcard DNS; "
            f"or `coppice dns --domain {settings.domain}`)\n"
            if tls is not None
            else ""
        ),
        flush=True,
    )
