"""One HTTP request through the proxy: the ASGI request (HTTP/1.1 or h2) to an HTTP/1.1
upstream on a pooled connection, both bodies streamed as they come (h11 frames the upstream
side, hypercorn the client's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h11

from coppice_envd.http.asgi import Receive, Scope, Send
from coppice_envd.proxy.headers import RawHeaders, end_to_end, request_target
from coppice_envd.proxy.pool import Connection, ConnectionPool, Target, UpstreamUnreachable

log = logging.getLogger(__name__)

# Methods whose request carries a body even when it is empty (Content-Length: 0 is sent).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The client's hypercorn writes its own Date; a 100-continue is the client hop's business.
_REQUEST_DROP = frozenset({b"expect"})
_RESPONSE_DROP = frozenset({b"date"})


class _Failed(Exception):
    """The upstream exchange broke (closed, reset, not HTTP)."""


def _request_headers(scope: Scope, target: Target, body: bytes, more: bool) -> RawHeaders:
    headers = end_to_end(scope.get("headers", ()), _REQUEST_DROP)
    names = {name.lower() for name, _ in headers}
    if b"host" not in names:
        headers.insert(0, (b"host", f"{target.host}:{target.port}".encode()))
    if b"content-length" not in names:
        if more:
            headers.append((b"transfer-encoding", b"chunked"))
        elif body or scope["method"] in _BODY_METHODS:
            headers.append((b"content-length", str(len(body)).encode()))
    return headers


async def _next_event(conn: Connection, client: _ClientSide) -> object:
    """The next event of the response head, reading as needed; _Failed if it cannot come."""
    while True:
        try:
            event = conn.http.next_event()
        except h11.RemoteProtocolError as e:
            raise _Failed(str(e)) from e
        if event is not h11.NEED_DATA:
            return event
        client.before_read()
        data = await conn.read()
        try:
            conn.http.receive_data(data)
        except h11.RemoteProtocolError as e:
            raise _Failed(str(e)) from e


async def _response_head(conn: Connection, client: _ClientSide) -> h11.Response:
    while True:
        event = await _next_event(conn, client)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            continue  # 100 Continue, 103 Early Hints: not passed on
        raise _Failed(f"no response ({event!r})")


class _ClientSide:
    """The rest of the request body, streamed to the upstream while its response comes back;
    then the wait for the client to leave, which drops the upstream connection (so a response
    that never ends, server-sent events, stops when nobody reads it)."""

    def __init__(self, receive: Receive, conn: Connection, more: bool) -> None:
        self._receive = receive
        self._conn = conn
        self._more = more
        self.finished = False  # the response has ended: a disconnect now is the normal one
        self._task: asyncio.Task[None] | None = None
        self._reads = 0
        if more:  # the body must flow while the response is awaited
            self.start()

    def start(self) -> None:
        """Run from now on (a request without more body needs it only once a response is
        slow to come: a small exchange then costs no task)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(self._more))

    async def _run(self, more: bool) -> None:
        conn = self._conn
        try:
            while more:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    conn.abort()
                    return
                chunk = message.get("body", b"")
                more = bool(message.get("more_body", False))
                if chunk:
                    conn.write(conn.http.send(h11.Data(data=chunk)))
                    await conn.drain()
                if not more:
                    conn.write(conn.http.send(h11.EndOfMessage()))
            while (await self._receive())["type"] != "http.disconnect":
                pass
            if not self.finished:
                conn.abort()
        except (OSError, h11.LocalProtocolError):
            conn.abort()  # the upstream went away or answered early: the response tells

    def before_read(self) -> None:
        """Called before each read of the response: from the second on, the client is watched
        (one read is a small exchange's whole response)."""
        if self._reads:
            self.start()
        self._reads += 1

    def stop(self) -> None:
        self.finished = True
        if self._task is not None:
            self._task.cancel()


async def forward_http(
    pool: ConnectionPool, target: Target, scope: Scope, receive: Receive, send: Send
) -> None:
    """Forward one request; UpstreamUnreachable (nothing sent yet) when the target does not
    answer. A break after the response began ends it short (the client sees the cut)."""
    first = await receive()
    if first["type"] == "http.disconnect":
        return
    body = bytes(first.get("body", b""))
    more = bool(first.get("more_body", False))
    request = h11.Request(
        method=scope["method"],
        target=request_target(scope),
        headers=_request_headers(scope, target, body, more),
    )
    while True:
        conn = await pool.acquire(target)
        client: _ClientSide | None = None
        try:
            conn.write(conn.http.send(request))
            if body:
                conn.write(conn.http.send(h11.Data(data=body)))
            if not more:
                conn.write(conn.http.send(h11.EndOfMessage()))
            client = _ClientSide(receive, conn, more)
            response = await _response_head(conn, client)
        except (_Failed, OSError, h11.LocalProtocolError) as e:
            if client is not None:
                client.stop()
            conn.abort()
            if conn.reused and not more:
                continue  # a kept-alive connection the server had closed: once more, afresh
            raise UpstreamUnreachable(f"{target.host}:{target.port}: {e}") from e
        break
    try:
        await _send_response(conn, response, client, send)
    finally:
        client.stop()
        pool.release(target, conn)


async def _send_response(
    conn: Connection, response: h11.Response, client: _ClientSide, send: Send
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": end_to_end(response.headers, _RESPONSE_DROP),
        }
    )
    while True:
        # What the server has already sent goes out as one message; the last with its end.
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                event = conn.http.next_event()
            except h11.RemoteProtocolError:
                event = None
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
                continue
            ended = isinstance(event, h11.EndOfMessage)
            break
        if ended:
            client.finished = True
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": False})
            return
        if chunks:
            await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
        if event is not h11.NEED_DATA:
            log.debug("upstream response cut short (%r)", event)
            conn.abort()
            return
        client.start()
        with contextlib.suppress(h11.RemoteProtocolError):
            # at EOF h11 ends a read-until-close body; any other body is then cut short
            conn.http.receive_data(await conn.read())
