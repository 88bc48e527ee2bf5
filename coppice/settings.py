"""The service's settings and their defaults, defined once for the CLI and the service."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from coppice_jails.envd_facts import ENVD_PORT, INTERPRETER_PORT

DEFAULT_DATA_DIR = Path(os.environ.get("COPPICE_DATA_DIR", "/var/lib/coppice"))
DEFAULT_HOST = "0.0.0.0"
DEFAULT_API_PORT = 3000
# One listener per envd port label; SDKs not told E2B_SANDBOX_URL dial these.
DEFAULT_GATEWAY_PORTS = (ENVD_PORT, INTERPRETER_PORT)
# `--tls`: one TLS listener for every sandbox port, where SDKs dial `https://<port>-<id>.<domain>`
# (the Host names the port); the plain --gateway-ports stay as they are.
DEFAULT_TLS_PORT = 443
DEFAULT_DOMAIN = "coppice.lan"
# `coppice dns`: where the wildcard resolver listens (resolv.conf's nameservers are port 53 only).
DEFAULT_DNS_LISTEN = "127.0.0.1"
DEFAULT_DNS_PORT = 53
DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")
StorageKind = Literal["auto", "zfs", "overlay"]
STORAGE_KINDS: tuple[StorageKind, ...] = get_args(StorageKind)


@dataclass(frozen=True)
class Settings:
    """What `coppice serve` (and, of it, `coppice template`) runs with; made once by the CLI."""

    data_dir: Path = DEFAULT_DATA_DIR  # absolute
    host: str = DEFAULT_HOST
    api_port: int = DEFAULT_API_PORT
    gateway_ports: tuple[int, ...] = DEFAULT_GATEWAY_PORTS
    domain: str = DEFAULT_DOMAIN  # sandbox hosts are <port>-<id>.<domain>
    storage: StorageKind = "auto"  # auto: zfs when a dataset is given, else overlay
    zfs_dataset: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # built (once) before serving
    tls: bool = False  # also serve the gateway over TLS, with a local CA (coppice/tls.py)
    tls_port: int = DEFAULT_TLS_PORT
    # each jail in its own network namespace, reachable on any port through the gateway
    jail_network: bool = True

    @property
    def sandbox_domain(self) -> str:
        """The domain SDKs are given (create/connect `domain`): with TLS on another port than
        443, it carries the port, so that https://<port>-<id>.<domain> reaches that listener."""
        return domain_with_port(self.domain, self.tls_port) if self.tls else self.domain

    @property
    def client_address(self) -> str:
        """Where a client on this machine reaches the service."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host


def domain_with_port(domain: str, https_port: int) -> str:
    """`domain`, or `domain:port` when https is not on its default port."""
    return domain if https_port == 443 else f"{domain}:{https_port}"
