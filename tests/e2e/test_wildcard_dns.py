"""`coppice dns` as real programs meet it: the C library's resolver (getent, Python's
getaddrinfo) reading a resolv.conf that names it, in a private mount namespace
(tests/fixtures/dns.py) — the machine's own /etc/resolv.conf is never touched."""

from __future__ import annotations

import sys
from pathlib import Path

from fixtures import REPO
from fixtures.dns import WildcardDns, run_with_wildcard_dns, serving_wildcard_dns

GETADDRINFO = """
import socket, sys
for name in sys.argv[1:]:
    infos = socket.getaddrinfo(name, 49983, type=socket.SOCK_STREAM)
    print(name, sorted({info[4][0] for info in infos}))
"""


def test_getent_and_getaddrinfo_resolve_sandbox_names(wildcard_dns: WildcardDns) -> None:
    machine_resolv_conf = Path("/etc/resolv.conf").read_text()
    getent = wildcard_dns.run(
        ["getent", "hosts", "49983-abc.coppice.lan", "api.coppice.lan", "coppice.lan"]
    )
    assert getent.returncode == 0, getent.stderr
    assert [line.split() for line in getent.stdout.splitlines()] == [
        ["127.0.0.1", "49983-abc.coppice.lan"],
        ["127.0.0.1", "api.coppice.lan"],
        ["127.0.0.1", "coppice.lan"],
    ]
    # AF_UNSPEC, as HTTP clients ask: AAAA is empty (not ::1), so only the IPv4 address.
    python = wildcard_dns.run(
        [sys.executable, "-c", GETADDRINFO, "49999-x.coppice.lan", "API.Coppice.LAN"]
    )
    assert python.returncode == 0, python.stderr
    assert python.stdout.splitlines() == [
        "49999-x.coppice.lan ['127.0.0.1']",
        "API.Coppice.LAN ['127.0.0.1']",
    ]
    seen_inside = wildcard_dns.run(["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {wildcard_dns.nameserver}" in seen_inside
    assert Path("/etc/resolv.conf").read_text() == machine_resolv_conf


def test_names_outside_the_domain_fall_through_to_the_next_nameserver() -> None:
    """REFUSED sends the resolver on to the next `nameserver` line (NXDOMAIN would stop it):
    ours can sit first in a resolv.conf, before the machine's own servers."""
    with (
        serving_wildcard_dns("coppice.lan", "127.0.0.1") as ours,
        serving_wildcard_dns("other.test", "127.0.0.2") as next_one,
    ):
        out = ours.run(
            ["getent", "hosts", "api.coppice.lan", "x.other.test"],
            nameservers=[next_one.nameserver],
        )
        assert out.returncode == 0, out.stderr
        assert [line.split()[0] for line in out.stdout.splitlines()] == ["127.0.0.1", "127.0.0.2"]
        alone = ours.run(["getent", "hosts", "x.other.test"])
        assert (alone.returncode, alone.stdout) == (2, "")  # not found, and at once


def test_the_domain_may_carry_the_gateway_port() -> None:
    out = run_with_wildcard_dns(
        ["getent", "hosts", "49983-abc.coppice.lan"], "coppice.lan:49983", "127.0.0.7"
    )
    assert out.stdout.split() == ["127.0.0.7", "49983-abc.coppice.lan"]


def test_example_02_stops_when_the_domain_does_not_resolve(wildcard_dns: WildcardDns) -> None:
    """Its DNS preflight: a domain our resolver does not serve → a pointer to README's recipe and
    to `coppice dns`, a non-zero exit, and no sandbox asked for."""
    out = wildcard_dns.run(
        [sys.executable, "examples/02-persistent-kernel.py"],
        env={"PATH": "/usr/bin:/bin", "E2B_DOMAIN": "elsewhere.lan:49983", "E2B_API_KEY": "k"},
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode != 0
    assert out.stdout == ""
    assert "dns: api.elsewhere.lan does not resolve" in out.stderr
    assert '"Wildcard DNS"' in out.stderr
    assert "`coppice dns`" in out.stderr
    assert "Traceback" not in out.stderr
