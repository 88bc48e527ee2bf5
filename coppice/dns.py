"""`coppice dns`: a small authoritative resolver for the sandbox domain, so that the names an
unmodified SDK dials — `api.<domain>`, `<port>-<id>.<domain>` — reach the gateway.

Every name in the zone (the domain itself and any name below it) exists and has one address,
the gateway's. The answers, chosen for what stub resolvers do with them:

- A (or AAAA, when the gateway's address is IPv6): that address, TTL 60 s.
- Any other type in the zone (AAAA for an IPv4 gateway above all): NOERROR with no answer and
  the zone's SOA (negative caching). Not `::1` for a loopback gateway: clients try AAAA first,
  and a gateway listening on IPv4 only would then cost each connection a refused attempt.
- Names outside the zone: REFUSED, as an authoritative server without recursion answers. A stub
  resolver (glibc) takes REFUSED as "this server cannot help" and asks its next `nameserver`;
  NXDOMAIN would be final, so REFUSED lets the machine's own servers follow ours in
  resolv.conf. musl, which asks all servers at once, ignores REFUSED answers the same way.
- Unparseable queries: FORMERR when the header can be read, else nothing; responses (QR set)
  are dropped. Nothing a client sends stops the server.

UDP and TCP listeners on one address and port, on the asyncio loop; a query is answered
synchronously (no I/O), so no callback blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import cast

from dnslib import (
    AAAA,
    EDNS0,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

log = logging.getLogger(__name__)

TTL_SECONDS = 60
_EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation
_HEADER = struct.Struct("!HH")  # id, flags (the first four bytes of the 12-byte header)
_QR = 0x8000
_TCP_IDLE_SECONDS = 10.0
_CLASS_IN, _CLASS_ANY = 1, 255

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def dns_name(domain: str) -> str:
    """The DNS name of a sandbox domain, which may carry the gateway's port
    (`coppice.lan:49443` → `coppice.lan`); lower case, no trailing dot."""
    host = domain.rsplit(":", 1)[0] if domain.count(":") == 1 else domain
    name = host.strip().rstrip(".").lower()
    if not name or ".." in name or any(len(label) > 63 for label in name.split(".")):
        raise ValueError(f"not a DNS domain: {domain!r}")
    return name


@dataclass(frozen=True)
class WildcardZone:
    """`<domain>` and every `*.<domain>` → one address."""

    domain: str  # a DNS name, as dns_name() makes it
    address: IPAddress

    @classmethod
    def of(cls, domain: str, address: str) -> WildcardZone:
        return cls(dns_name(domain), ipaddress.ip_address(address))

    def contains(self, name: str) -> bool:
        name = name.rstrip(".").lower()
        return name == self.domain or name.endswith("." + self.domain)

    def answer(self, packet: bytes) -> bytes | None:
        """The response to one DNS message, or None when it gets none (not a query, or too
        broken to answer)."""
        if len(packet) < 12:
            return None
        query_id, flags = _HEADER.unpack_from(packet)
        if flags & _QR:
            return None
        try:
            query = DNSRecord.parse(packet)
        except Exception:  # dnslib raises DNSError, and sometimes what it met underneath
            return _error(query_id, flags, RCODE.FORMERR)
        # One record (or the SOA) after a question of at most 255 bytes: always < 512 bytes,
        # the classic UDP limit, so never truncated.
        return bytes(self._reply(query).pack())

    def _reply(self, query: DNSRecord) -> DNSRecord:
        reply = DNSRecord(
            DNSHeader(id=query.header.id, qr=1, aa=0, ra=0, rd=query.header.rd),
            questions=query.questions[:1],
        )
        if any(r.rtype == QTYPE.OPT for r in query.ar):
            reply.add_ar(EDNS0(udp_len=_EDNS_PAYLOAD))
        if query.header.opcode != OPCODE.QUERY:
            reply.header.rcode = RCODE.NOTIMP
            return reply
        if len(query.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply
        question: DNSQuestion = query.questions[0]
        name = str(question.qname)
        if question.qclass not in (_CLASS_IN, _CLASS_ANY) or not self.contains(name):
            reply.header.rcode = RCODE.REFUSED
            return reply
        reply.header.aa = 1
        for record in self._records(name, question.qtype):
            reply.add_answer(record)
        if not reply.rr:
            reply.add_auth(self._soa())
        return reply

    def _records(self, name: str, qtype: int) -> list[RR]:
        records = []
        own_type = QTYPE.A if self.address.version == 4 else QTYPE.AAAA
        if qtype in (own_type, QTYPE.ANY):
            rdata = A(str(self.address)) if own_type == QTYPE.A else AAAA(str(self.address))
            records.append(RR(name, own_type, rdata=rdata, ttl=TTL_SECONDS))
        if qtype in (QTYPE.SOA, QTYPE.ANY) and name.rstrip(".").lower() == self.domain:
            records.append(self._soa())
        return records

    def _soa(self) -> RR:
        times = (1, 3600, 600, 86400, TTL_SECONDS)  # serial, refresh, retry, expire, negative TTL
        soa = SOA(f"{self.domain}.", f"hostmaster.{self.domain}.", times)
        return RR(f"{self.domain}.", QTYPE.SOA, rdata=soa, ttl=TTL_SECONDS)


def _error(query_id: int, flags: int, rcode: int) -> bytes:
    """A bare response (no question) with `rcode`, keeping the query's opcode and RD bit."""
    opcode_rd = flags & 0x7900
    return struct.pack("!HHHHHH", query_id, _QR | opcode_rd | rcode, 0, 0, 0, 0)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: WildcardZone) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        response = _safe_answer(self.zone, data)
        if response is not None and self.transport is not None:
            self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: udp error %s", exc)  # e.g. ICMP port unreachable from a gone client


def _safe_answer(zone: WildcardZone, data: bytes) -> bytes | None:
    try:
        return zone.answer(data)
    except Exception:  # a bug in an answer must not take the listener down
        log.exception("dns: no answer for a %d-byte message", len(data))
        return None


async def _serve_tcp_client(
    zone: WildcardZone, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            async with asyncio.timeout(_TCP_IDLE_SECONDS):
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                message = await reader.readexactly(length)
            response = _safe_answer(zone, message)
            if response is None:
                break
            writer.write(struct.pack("!H", len(response)) + response)
            await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass
class DnsServer:
    """The zone's listeners: UDP and TCP on `host`:`port`."""

    zone: WildcardZone
    host: str
    port: int
    _udp: asyncio.DatagramTransport
    _tcp: asyncio.Server

    async def close(self) -> None:
        self._udp.close()
        self._tcp.close()
        await self._tcp.wait_closed()


async def start_dns_server(zone: WildcardZone, host: str, port: int) -> DnsServer:
    """Listen on `host`:`port` over UDP and TCP (port 0: a free port, the same for both)."""
    loop = asyncio.get_running_loop()
    for _ in range(20 if port == 0 else 1):
        udp, _protocol = await loop.create_datagram_endpoint(
            lambda: _Udp(zone), local_addr=(host, port)
        )
        bound = int(udp.get_extra_info("sockname")[1])
        try:
            tcp = await asyncio.start_server(
                lambda r, w: _serve_tcp_client(zone, r, w), host, bound
            )
        except OSError:
            udp.close()
            if port != 0:
                raise
            continue  # that UDP port's TCP twin is taken: another free port
        return DnsServer(zone, host, bound, udp, tcp)
    raise OSError(f"no port free for both UDP and TCP on {host}")
