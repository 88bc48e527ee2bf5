"""`coppice env`: the environment that points an unmodified E2B SDK at this Coppice."""

from __future__ import annotations

from pathlib import Path

from coppice_api.auth import read_api_keys


def run_env(data_dir: Path, address: str, api_port: int, gateway_port: int, domain: str) -> int:
    print(client_env(configured_api_key(data_dir), address, api_port, gateway_port, domain))
    return 0


def configured_api_key(data_dir: Path) -> str | None:
    """The first configured API key, if any (creates none)."""
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
