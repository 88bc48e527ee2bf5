"""One WebSocket through the proxy: the client's ASGI websocket (hypercorn did its handshake)
to a WebSocket client connection to the upstream (wsproto frames it), messages both ways until
either side closes."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from coppice_envd.http.asgi import Receive, Scope, Send
from coppice_envd.proxy.headers import WEBSOCKET_HANDSHAKE, end_to_end, request_target
from coppice_envd.proxy.pool import ConnectionPool, Target, UpstreamUnreachable

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# Close codes that name a state, not a frame (RFC 6455 §7.4.1): never sent on the wire.
_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}
_REQUEST_DROP = WEBSOCKET_HANDSHAKE | {b"host"}


class _Upstream:
    """The upstream WebSocket: a TCP connection and its wsproto client state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.fragments: list[str | bytes] = []  # of a message not yet finished

    def send(self, event: Event) -> None:
        self.writer.write(self.ws.send(event))

    async def events(self) -> list[Event]:
        """The next events from the server; [] at its end of stream."""
        while True:
            try:
                data = await self.reader.read(_READ_SIZE)
            except OSError:
                data = b""
            self.ws.receive_data(data or None)
            events = list(self.ws.events())
            if events or not data:
                return events


async def forward_websocket(
    pool: ConnectionPool, target: Target, scope: Scope, receive: Receive, send: Send
) -> None:
    """Forward one WebSocket; UpstreamUnreachable (the client's handshake still open) when the
    target does not answer or does not speak WebSocket."""
    if (await receive())["type"] != "websocket.connect":
        return
    upstream = _Upstream(*await pool.connect(target))
    try:
        if await _handshake(upstream, target, scope, send):
            await _relay(upstream, receive, send)
    finally:
        upstream.writer.close()


async def _handshake(upstream: _Upstream, target: Target, scope: Scope, send: Send) -> bool:
    """The upstream's handshake, its answer passed on; True once both sides are open."""
    headers = dict(scope.get("headers", ()))
    host = headers.get(b"host", f"{target.host}:{target.port}".encode()).decode("latin-1")
    try:
        upstream.send(
            Request(
                host=host,
                target=request_target(scope).decode("latin-1"),
                subprotocols=list(scope.get("subprotocols", ())),
                extra_headers=end_to_end(scope.get("headers", ()), _REQUEST_DROP),
            )
        )
        events = await upstream.events()
    except (OSError, LocalProtocolError, RemoteProtocolError) as e:
        raise UpstreamUnreachable(f"{target.host}:{target.port}: {e}") from e
    if not events:
        raise UpstreamUnreachable(f"{target.host}:{target.port}: closed during the handshake")
    first = events[0]
    if isinstance(first, AcceptConnection):
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": first.subprotocol,
                "headers": end_to_end(first.extra_headers, WEBSOCKET_HANDSHAKE),
            }
        )
        await _to_client(upstream, events[1:], send)
        return True
    if isinstance(first, RejectConnection):
        await _reject(upstream, first, events[1:], scope, send)
        return False
    raise UpstreamUnreachable(f"{target.host}:{target.port}: no WebSocket handshake ({first!r})")


async def _reject(
    upstream: _Upstream, rejection: RejectConnection, events: list[Event], scope: Scope, send: Send
) -> None:
    """The upstream refused the upgrade: its HTTP answer reaches the client as it is, where the
    server offers that (hypercorn's websocket.http.response), else a close."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "websocket.http.response.start",
            "status": rejection.status_code,
            "headers": end_to_end(rejection.headers),
        }
    )
    finished = not rejection.has_body
    while not finished:
        for event in events:
            if isinstance(event, RejectData):
                finished = event.body_finished
                await send(
                    {"type": "websocket.http.response.body", "body": event.data, "more_body": True}
                )
        if not finished:
            events = await upstream.events()
            finished = not events
    await send({"type": "websocket.http.response.body", "body": b"", "more_body": False})


async def _relay(upstream: _Upstream, receive: Receive, send: Send) -> None:
    """Messages both ways until one side closes; then the other is closed too."""
    to_upstream = asyncio.ensure_future(_from_client(upstream, receive))
    to_client = asyncio.ensure_future(_from_upstream(upstream, send))
    try:
        await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        for task in (to_upstream, to_client):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if to_client.done() and not to_client.cancelled() and (error := to_client.exception()):
        log.debug("websocket to the client ended: %r", error)


async def _from_client(upstream: _Upstream, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            upstream.send(
                TextMessage(data=text)
                if text is not None
                else BytesMessage(data=bytes(message.get("bytes") or b""))
            )
            await upstream.writer.drain()
        elif message["type"] == "websocket.disconnect":
            if upstream.ws.state is ConnectionState.OPEN:
                code = int(message.get("code", 1000))
                with contextlib.suppress(LocalProtocolError, OSError):
                    upstream.send(
                        CloseConnection(
                            code=_UNSENDABLE.get(code, code), reason=message.get("reason")
                        )
                    )
                    await upstream.writer.drain()
            return


async def _from_upstream(upstream: _Upstream, send: Send) -> None:
    while True:
        events = await upstream.events()
        if not events:
            await send({"type": "websocket.close", "code": 1011})
            return
        if not await _to_client(upstream, events, send):
            return


async def _to_client(upstream: _Upstream, events: list[Event], send: Send) -> bool:
    """Pass the server's events on (a message sent in fragments goes on whole, as ASGI carries
    messages); False once it has closed."""
    parts = upstream.fragments
    for event in events:
        if isinstance(event, Message):
            parts.append(event.data)
            if not event.message_finished:
                continue
            if isinstance(event, TextMessage):
                await send({"type": "websocket.send", "text": "".join(map(str, parts))})
            else:
                joined = b"".join(p for p in parts if isinstance(p, bytes))
                await send({"type": "websocket.send", "bytes": joined})
            parts.clear()
        elif isinstance(event, Ping):
            upstream.send(event.response())
        elif isinstance(event, CloseConnection):
            with contextlib.suppress(LocalProtocolError):
                upstream.send(event.response())
            code = _UNSENDABLE.get(event.code, event.code)
            await send({"type": "websocket.close", "code": code, "reason": event.reason or ""})
            return False
    return True
