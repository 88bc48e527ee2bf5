"""`coppice dns` (coppice/dns.py, coppice/commands/dns.py): the answers, and the listeners on a
random loopback port over UDP and TCP, which outlive whatever a client sends them."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator

import pytest
from dnslib import EDNS0, OPCODE, QTYPE, RCODE, DNSRecord

from coppice.cli import build_parser
from coppice.commands.dns import banner
from coppice.dns import DnsServer, WildcardZone, dns_name, start_dns_server

ZONE = WildcardZone.of("coppice.lan:49443", "127.0.0.1")


def ask(zone: WildcardZone, name: str, qtype: str = "A") -> DNSRecord:
    response = zone.answer(DNSRecord.question(name, qtype).pack())
    assert response is not None
    return DNSRecord.parse(response)


@pytest.mark.parametrize(
    ("domain", "name"),
    [
        ("coppice.lan", "coppice.lan"),
        ("coppice.lan:49443", "coppice.lan"),
        ("Coppice.LAN.", "coppice.lan"),
        ("sandboxes.example.org:443", "sandboxes.example.org"),
    ],
)
def test_the_dns_name_is_the_domain_without_its_port(domain: str, name: str) -> None:
    assert dns_name(domain) == name


@pytest.mark.parametrize("domain", ["", ":49443", "a..b", "x" * 64 + ".lan"])
def test_a_domain_that_is_no_dns_name_is_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="not a DNS domain"):
        dns_name(domain)


@pytest.mark.parametrize(
    "name", ["coppice.lan", "api.coppice.lan", "49983-abc.coppice.lan", "a.b.c.coppice.lan"]
)
def test_the_domain_and_every_name_below_it_is_the_gateway(name: str) -> None:
    reply = ask(ZONE, name)
    assert reply.header.rcode == RCODE.NOERROR
    assert reply.header.aa == 1
    assert reply.header.ra == 0  # no recursion here
    assert [(str(r.rname), r.rtype, str(r.rdata), r.ttl) for r in reply.rr] == [
        (name + ".", QTYPE.A, "127.0.0.1", 60)
    ]


def test_the_answer_keeps_the_case_of_the_question() -> None:
    # Resolvers randomise the case of the name (0x20) and check it comes back as sent.
    reply = ask(ZONE, "49999-AbC.CoPPice.lan")
    assert str(reply.rr[0].rname) == "49999-AbC.CoPPice.lan."
    assert str(reply.q.qname) == "49999-AbC.CoPPice.lan."


def test_aaaa_of_an_ipv4_gateway_is_no_data_with_the_soa() -> None:
    reply = ask(ZONE, "49983-abc.coppice.lan", "AAAA")
    assert reply.header.rcode == RCODE.NOERROR  # the name exists: not NXDOMAIN
    assert reply.rr == []
    assert [(r.rtype, str(r.rname), r.ttl) for r in reply.auth] == [(QTYPE.SOA, "coppice.lan.", 60)]


def test_an_ipv6_gateway_is_answered_by_aaaa_and_a_is_no_data() -> None:
    zone = WildcardZone.of("coppice.lan", "::1")
    assert [str(r.rdata) for r in ask(zone, "api.coppice.lan", "AAAA").rr] == ["::1"]
    a = ask(zone, "api.coppice.lan", "A")
    assert (a.header.rcode, a.rr) == (RCODE.NOERROR, [])


def test_soa_and_any_at_the_apex() -> None:
    assert [r.rtype for r in ask(ZONE, "coppice.lan", "SOA").rr] == [QTYPE.SOA]
    assert [r.rtype for r in ask(ZONE, "coppice.lan", "ANY").rr] == [QTYPE.A, QTYPE.SOA]
    assert [r.rtype for r in ask(ZONE, "x.coppice.lan", "ANY").rr] == [QTYPE.A]
    mx = ask(ZONE, "x.coppice.lan", "MX")
    assert (mx.header.rcode, mx.rr, len(mx.auth)) == (RCODE.NOERROR, [], 1)


@pytest.mark.parametrize(
    "name", ["example.com", "lan", "notcoppice.lan", "coppice.lan.example.com", "localhost"]
)
def test_names_outside_the_domain_are_refused(name: str) -> None:
    # REFUSED, not NXDOMAIN: a stub resolver then asks its next nameserver.
    reply = ask(ZONE, name)
    assert reply.header.rcode == RCODE.REFUSED
    assert (reply.header.aa, reply.rr, reply.auth) == (0, [], [])
    assert str(reply.q.qname) == name + "."


def test_another_class_is_refused() -> None:
    query = DNSRecord.question("version.coppice.lan", "TXT", "CH")
    response = ZONE.answer(query.pack())
    assert response is not None
    assert DNSRecord.parse(response).header.rcode == RCODE.REFUSED


def test_edns_is_answered_with_edns() -> None:
    query = DNSRecord.question("api.coppice.lan")
    query.add_ar(EDNS0(udp_len=4096))
    response = ZONE.answer(query.pack())
    assert response is not None
    opt = [r for r in DNSRecord.parse(response).ar if r.rtype == QTYPE.OPT]
    assert [r.rclass for r in opt] == [1232]
    plain = ask(ZONE, "api.coppice.lan")
    assert plain.ar == []


def test_the_longest_answer_fits_a_classic_udp_message() -> None:
    name = ".".join(["x" * 63] * 3) + ".coppice.lan"  # 204 bytes: near the 253 limit
    query = DNSRecord.question(name, "AAAA")
    query.add_ar(EDNS0(udp_len=4096))
    response = ZONE.answer(query.pack())
    assert response is not None
    assert len(response) < 512
    assert DNSRecord.parse(response).header.tc == 0


def test_malformed_messages() -> None:
    assert ZONE.answer(b"") is None
    assert ZONE.answer(b"\x12\x34\x01") is None  # shorter than a header
    # A header promising a question that is not there: FORMERR with the same id.
    broken = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x07coppi"
    response = ZONE.answer(broken)
    assert response is not None
    header = DNSRecord.parse(response).header
    assert (header.id, header.qr, header.rcode, header.rd) == (0xBEEF, 1, RCODE.FORMERR, 1)
    # A response is never answered (no loops between two servers).
    answer = ask(ZONE, "api.coppice.lan").pack()
    assert ZONE.answer(answer) is None
    # No question at all, and an opcode we do not serve.
    empty = struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0)
    assert DNSRecord.parse(ZONE.answer(empty) or b"").header.rcode == RCODE.FORMERR
    notify = DNSRecord.question("coppice.lan", "SOA")
    notify.header.opcode = OPCODE.NOTIFY
    assert DNSRecord.parse(ZONE.answer(notify.pack()) or b"").header.rcode == RCODE.NOTIMP


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    dns = await start_dns_server(ZONE, "127.0.0.1", 0)
    try:
        yield dns
    finally:
        await dns.close()


async def query(server: DnsServer, name: str, qtype: str = "A", *, tcp: bool = False) -> DNSRecord:
    packet = await asyncio.to_thread(
        DNSRecord.question(name, qtype).send, server.host, server.port, tcp=tcp, timeout=5
    )
    return DNSRecord.parse(packet)


async def test_udp_and_tcp_on_one_port(server: DnsServer) -> None:
    assert server.port != 0
    for tcp in (False, True):
        reply = await query(server, "49983-abc.coppice.lan", tcp=tcp)
        assert [str(r.rdata) for r in reply.rr] == ["127.0.0.1"]
        assert (await query(server, "example.com", tcp=tcp)).header.rcode == RCODE.REFUSED


async def test_tcp_answers_several_queries_on_one_connection(server: DnsServer) -> None:
    def two_queries() -> list[DNSRecord]:
        with socket.create_connection((server.host, server.port), timeout=5) as conn:
            replies = []
            for name in ("a.coppice.lan", "b.coppice.lan"):
                packet = DNSRecord.question(name).pack()
                conn.sendall(struct.pack("!H", len(packet)) + packet)
                (length,) = struct.unpack("!H", _read(conn, 2))
                replies.append(DNSRecord.parse(_read(conn, length)))
            return replies

    replies = await asyncio.to_thread(two_queries)
    assert [str(r.rr[0].rname) for r in replies] == ["a.coppice.lan.", "b.coppice.lan."]


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "closed"
        data += chunk
    return data


async def test_the_server_stays_up_on_malformed_packets(server: DnsServer) -> None:
    garbage = [b"", b"\x00", b"\xff" * 11, b"\xff" * 12, b"\x00" * 12 + b"\xc0\x0c" * 40]
    garbage += [bytes(range(256)), b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f" * 300]

    def send_garbage() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for packet in garbage:
                udp.sendto(packet, (server.host, server.port))
        for packet in garbage:  # over TCP: framed, cut short, or a length and nothing
            with socket.create_connection((server.host, server.port), timeout=5) as tcp:
                tcp.sendall(struct.pack("!H", len(packet)) + packet)
            with socket.create_connection((server.host, server.port), timeout=5) as tcp:
                tcp.sendall(struct.pack("!H", 500) + packet[:10])

    await asyncio.to_thread(send_garbage)
    for tcp in (False, True):
        reply = await query(server, "api.coppice.lan", tcp=tcp)
        assert [str(r.rdata) for r in reply.rr] == ["127.0.0.1"]


def test_the_banner_names_the_resolver_lines() -> None:
    zone = WildcardZone.of("coppice.lan:49443", "127.0.0.1")
    text = banner(zone, "127.0.0.53", 53)
    assert "coppice.lan and *.coppice.lan -> 127.0.0.1 (A), on 127.0.0.53:53" in text
    assert "nameserver 127.0.0.53" in text
    assert "DNS=127.0.0.53:53 Domains=~coppice.lan" in text
    assert "server=/coppice.lan/127.0.0.53#53" in text
    assert "Wildcard DNS" in text  # README's section
    other_port = banner(zone, "127.0.0.1", 5353)
    assert "resolv.conf knows only port 53" in other_port
    assert "server=/coppice.lan/127.0.0.1#5353" in other_port


def test_cli_defaults() -> None:
    args = build_parser().parse_args(["dns"])
    assert (args.domain, args.address, args.listen, args.port) == (
        "coppice.lan",
        "127.0.0.1",
        "127.0.0.1",
        53,
    )
    assert ipaddress.ip_address(args.address).is_loopback
