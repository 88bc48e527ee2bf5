"""The gateway's reverse proxy: requests for a sandbox's other ports (and for the lifecycle API)
forwarded to a server over TCP, HTTP/1.1 on pooled keep-alive connections and WebSocket,
bodies streamed both ways. It connects only to the `Target` its caller names."""

from __future__ import annotations

import typing

from coppice_envd.proxy.http import forward_http as _forward_http
from coppice_envd.proxy.pool import ConnectionPool, Target, UpstreamUnreachable
from coppice_envd.proxy.websocket import forward_websocket as _forward_websocket

if typing.TYPE_CHECKING:
    from coppice_envd.http.asgi import Receive, Scope, Send

__all__ = ["ConnectionPool", "Proxy", "Target", "UpstreamUnreachable"]


class Proxy:
    """Forwards ASGI requests (http and websocket scopes) to targets, over one pool."""

    def __init__(self, pool: ConnectionPool | None = None) -> None:
        self.pool = pool or ConnectionPool()

    async def forward(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward the request to `target`; UpstreamUnreachable when nothing answers there
        (nothing has been sent to the client then: the caller answers it)."""
        if scope["type"] == "websocket":
            await _forward_websocket(self.pool, target, scope, receive, send)
        else:
            await _forward_http(self.pool, target, scope, receive, send)

    def forget(self, group: str) -> None:
        """Close the pooled connections of a group (a sandbox that has stopped)."""
        self.pool.forget(group)

    def close(self) -> None:
        self.pool.close()
