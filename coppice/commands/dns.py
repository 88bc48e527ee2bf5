"""`coppice dns`: runs the wildcard resolver (coppice.dns) until interrupted, and prints how to
point this machine's resolver at it."""

from __future__ import annotations

import asyncio
import signal
import sys

from coppice.dns import WildcardZone, start_dns_server


def run_dns(domain: str, address: str, listen: str, port: int) -> int:
    try:
        zone = WildcardZone.of(domain, address)
    except ValueError as error:
        print(f"coppice dns: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(zone, listen, port))
    except OSError as error:
        print(f"coppice dns: cannot listen on {listen}:{port}: {error}", file=sys.stderr)
        return 1
    return 0


async def _serve(zone: WildcardZone, listen: str, port: int) -> None:
    server = await start_dns_server(zone, listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(banner(zone, server.host, server.port), flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def banner(zone: WildcardZone, host: str, port: int) -> str:
    """What the user needs next: what is answered, and the line for each kind of resolver."""
    domain = zone.domain
    at = f"[{host}]" if ":" in host else host
    record = "A" if zone.address.version == 4 else "AAAA"
    resolv_conf = (
        f"nameserver {host}"
        if port == 53
        else f"(none: resolv.conf knows only port 53, not {port})"
    )
    return "\n".join(
        [
            f"coppice dns: {domain} and *.{domain} -> {zone.address} ({record}), "
            f"on {at}:{port} UDP and TCP; other names are REFUSED",
            "Point this machine's resolver at it (README, Wildcard DNS), one of:",
            f"  /etc/resolv.conf, first line:  {resolv_conf}",
            f"  systemd-resolved:              [Resolve] DNS={at}:{port} Domains=~{domain}"
            f"  (/etc/systemd/resolved.conf.d/coppice.conf)",
            f"  dnsmasq, NetworkManager's too: server=/{domain}/{host}#{port}",
            f"  macOS /etc/resolver/{domain}:  nameserver {host} and port {port}",
            f"Check: getent hosts api.{domain}    # -> {zone.address}",
        ]
    )
