"""Each Linux jail's own network: a network namespace joined to the host by a veth pair.

A namespace holds `lo` and `eth0` (the jail's address); the host side of the pair, named
`cpj<slot>`, holds the gateway address of the jail's /30 and routes to it, so the host (the
gateway, the kernels' ZeroMQ client) reaches any port a jail listens on at `jail_address`.
nftables (table `inet coppice`, shared by every Coppice on the host) keeps jails from the host's
own services and from each other's ports, and masquerades what they send out. The slot is
claimed by creating the host link: link names are unique on the host, so two Coppice services
never hand out one address twice.

A namespace is made ready ahead of time (a small pool: about 7 ms of netlink each, which a
create then does not wait for), kept alive by a bind mount under `<run_dir>/netns/` until the
jail's init has entered it; then the mount goes, and the namespace — and with it the veth pair —
ends with the jail's last process. What is left in that directory after a crash is unused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coppice_jails._libc import MNT_DETACH, libc
from coppice_jails.runtime.base import JailError

log = logging.getLogger(__name__)

SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
LINK_PREFIX = "cpj"
NFT_TABLE = "coppice"
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_EEXIST = 17
_T = TypeVar("_T")


@dataclass(frozen=True)
class Netns:
    """A ready namespace: its bind mount, and the /30 it was given."""

    path: Path
    slot: int
    subnet: ipaddress.IPv4Network

    @property
    def link(self) -> str:
        return f"{LINK_PREFIX}{self.slot}"

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def jail_address(self) -> str:
        return str(self.subnet.network_address + 2)


def nft_ruleset(subnet: ipaddress.IPv4Network = SUBNET) -> str:
    """The rules every jail network lives under (one atomic `nft -f`, replacing older ones)."""
    jails = f'"{LINK_PREFIX}*"'
    return f"""\
add table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {jails} ct state established,related accept
        iifname {jails} drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {jails} oifname {jails} drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} oifname != {jails} masquerade
    }}
}}
"""


class NetnsPool:
    """Hands out ready network namespaces, one per jail start."""

    def __init__(self, run_dir: Path, *, size: int = 2, subnet: ipaddress.IPv4Network = SUBNET):
        self.dir = run_dir / "netns"
        self.subnet = subnet
        self._size = size
        self._ready: list[Netns] = []
        self._refill: asyncio.Task[None] | None = None
        self._slots = list(subnet.subnets(new_prefix=30))
        self._cursor = 0
        self._started = False
        self._lock = asyncio.Lock()  # one start(); refills one at a time

    async def start(self) -> None:
        """Rules in place, forwarding on, leftovers of a previous run gone; then fill the pool."""
        async with self._lock:
            if self._started:
                return
            await asyncio.to_thread(self._prepare_host)
            self._started = True
        self._schedule_refill()

    def _prepare_host(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.dir.iterdir():
            _unbind(leftover)
        result = subprocess.run(
            ["nft", "-f", "-"], input=nft_ruleset(self.subnet), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise JailError(f"cannot install the jail network rules: {result.stderr.strip()}")
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        if forward.read_text().strip() != "1":
            log.info("enabling net.ipv4.ip_forward: jails reach the outside through NAT")
            forward.write_text("1\n")

    async def acquire(self) -> Netns:
        """A ready namespace (made now if the pool is empty); the caller owns it."""
        await self.start()
        if self._ready:
            netns = self._ready.pop()
        else:
            netns = await asyncio.to_thread(self._make)
        self._schedule_refill()
        return netns

    async def entered(self, netns: Netns) -> None:
        """The jail's init is in `netns` and keeps it alive: drop the bind mount."""
        await asyncio.to_thread(_unbind, netns.path)

    async def discard(self, netns: Netns) -> None:
        """An unused namespace: gone, with its veth pair."""
        await asyncio.to_thread(_unbind, netns.path)

    async def close(self) -> None:
        # Not cancelled: a namespace being made in a thread would be lost, bind mount and all.
        self._size = 0
        if self._refill is not None:
            await self._refill
        ready, self._ready = self._ready, []
        for netns in ready:
            await self.discard(netns)

    def _schedule_refill(self) -> None:
        if len(self._ready) < self._size and (self._refill is None or self._refill.done()):
            self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        while len(self._ready) < self._size:
            try:
                self._ready.append(await asyncio.to_thread(self._make))
            except JailError as err:
                log.warning("jail network pool: %s", err)
                return

    def _make(self) -> Netns:
        """A new namespace with lo up, eth0 addressed and routed, the host side up. Blocking."""
        for _ in range(len(self._slots)):
            slot = self._cursor
            self._cursor = (self._cursor + 1) % len(self._slots)
            netns = Netns(self.dir / str(slot), slot, self._slots[slot])
            if netns.path.exists():
                continue
            try:
                if _in_new_netns(functools.partial(_configure, netns)):
                    return netns
            except BaseException:
                _unbind(netns.path)
                raise
        raise JailError(f"no free jail network in {self.subnet}")


def _in_new_netns(work: Callable[[], _T]) -> _T:
    """Run `work` on a thread of its own that has left for a new network namespace (setns and
    unshare act on the calling thread only; this one ends with the work, never reused)."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name="coppice-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _configure(netns: Netns) -> bool:
    """On a fresh thread: make the namespace, bind it to `netns.path` and wire it up; False if
    another Coppice holds the slot's host link."""
    with IPRoute() as host:  # opened before unshare: this socket stays in the host's namespace
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise JailError(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        os.close(os.open(netns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        here = b"/proc/thread-self/ns/net"
        if libc.mount(here, os.fsencode(netns.path), None, _MS_BIND, None) != 0:
            error = ctypes.get_errno()
            netns.path.unlink()
            raise JailError(f"cannot keep a network namespace: {os.strerror(error)}")
        try:
            host.link(
                "add",
                ifname=netns.link,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": str(netns.path)},
            )
        except NetlinkError as err:
            _unbind(netns.path)
            if err.code == _EEXIST:
                return False
            raise JailError(f"cannot create {netns.link}: {err}") from err
        try:
            (index,) = host.link_lookup(ifname=netns.link)
            host.addr("add", index=index, address=netns.host_address, prefixlen=30)
            host.link("set", index=index, state="up")
            with IPRoute() as inside:  # opened after unshare: the jail's namespace
                (lo,) = inside.link_lookup(ifname="lo")
                inside.link("set", index=lo, state="up")
                (eth0,) = inside.link_lookup(ifname="eth0")
                inside.addr("add", index=eth0, address=netns.jail_address, prefixlen=30)
                inside.link("set", index=eth0, state="up")
                inside.route("add", dst="0.0.0.0/0", gateway=netns.host_address)
        except (NetlinkError, ValueError) as err:
            raise JailError(f"cannot set up the network of {netns.link}: {err}") from err
    return True


def _unbind(path: Path) -> None:
    libc.umount2(os.fsencode(path), MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
