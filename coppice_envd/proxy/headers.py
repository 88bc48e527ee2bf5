"""Which headers pass the proxy: everything end to end, nothing that describes one hop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1: hop-by-hop, and the framing each hop does itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)
# A WebSocket handshake's own headers: each side's handshake writes them anew.
WEBSOCKET_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


def end_to_end(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> RawHeaders:
    """`headers` less the hop-by-hop ones, those a `Connection` header names, and `drop`
    (names in lower case, as ASGI and h11 give them)."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [
        (name, value)
        for name, value in headers
        if (lowered := name.lower()) not in HOP_BY_HOP
        and lowered not in drop
        and lowered not in named
    ]


def request_target(scope: dict[str, Any]) -> bytes:
    """The request's target as the client sent it: the raw path and the query string."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return bytes(raw_path) + b"?" + bytes(query) if query else bytes(raw_path)
