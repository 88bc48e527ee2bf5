"""`coppice env`: the environment that points an unmodified E2B SDK at this Coppice."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from coppice.settings import domain_with_port
from coppice.tls import TlsFiles, tls_files
from coppice_api.auth import read_api_keys

NO_KEY = "<no key yet: run coppice serve once>"


def run_env(
    data_dir: Path,
    address: str,
    api_port: int,
    gateway_port: int,
    domain: str,
    *,
    tls_port: int | None = None,
    as_json: bool = False,
) -> int:
    tls = None
    if tls_port is not None:
        files = tls_files(data_dir)
        if not (files.ca_cert.is_file() and files.bundle.is_file()):
            print(
                f"coppice env: no CA in {files.directory} yet: run `coppice serve --tls` once",
                file=sys.stderr,
            )
            return 1
        tls = (tls_port, files)
    env = client_env(configured_api_key(data_dir), address, api_port, gateway_port, domain, tls)
    print(json.dumps(env, indent=2) if as_json else export_lines(env))
    return 0


def configured_api_key(data_dir: Path) -> str | None:
    """The first configured API key, if any (creates none)."""
    return next(iter(read_api_keys(data_dir)), None)


def client_env(
    key: str | None,
    address: str,
    api_port: int,
    gateway_port: int,
    domain: str,
    tls: tuple[int, TlsFiles] | None = None,
) -> dict[str, str]:
    """The variables an unmodified E2B SDK needs to reach this Coppice. With `tls` (the TLS
    port and the CA files) that is the domain — carrying the port unless it is 443, as the
    SDKs dial https://api.<domain> and https://<port>-<id>.<domain> (wildcard DNS, README) —
    and how to trust our CA. Without TLS the SDKs would still dial https, so they are sent to
    plain-HTTP origins instead: the API's, and one for every sandbox, which routes on the
    E2b-Sandbox-Id/-Port headers."""
    if tls is None:
        return {
            "E2B_DOMAIN": domain,
            "E2B_API_KEY": key or NO_KEY,
            "E2B_API_URL": f"http://{address}:{api_port}",
            "E2B_SANDBOX_URL": f"http://{address}:{gateway_port}",
        }
    tls_port, files = tls
    return {
        "E2B_DOMAIN": domain_with_port(domain, tls_port),
        "E2B_API_KEY": key or NO_KEY,
        # Python (OpenSSL, and rustls via its native roots) reads one file *instead of* the
        # system's roots, hence a bundle; Node adds this file to its own roots.
        "SSL_CERT_FILE": str(files.bundle),
        "NODE_EXTRA_CA_CERTS": str(files.ca_cert),
    }


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())
