"""Raw ASGI plumbing for every gateway handler: the types, the request's headers and body, the
response senders and the lifespan protocol. Handlers choose their bodies' wording; the framing
is done here once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Iterable[tuple[str, str]]


class ClientDisconnected(Exception):
    """The client went away before its request body ended."""


class BodyTooLarge(ValueError):
    """The request body is longer than the handler accepts."""


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers: lower-case names, the first value of repeated ones."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives; ClientDisconnected if it never ends."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge past `limit` bytes, ClientDisconnected."""
    chunks = []
    size = 0
    async for chunk in body_chunks(receive):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def start_response(send: Send, status: int, headers: Headers = ()) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})


async def send_body(send: Send, body: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def send_response(send: Send, status: int, body: bytes = b"", headers: Headers = ()) -> None:
    """A whole response; Content-Length is added unless the status has no body."""
    length = [("content-length", str(len(body)))] if body or status not in (204, 304) else []
    await start_response(send, status, [*headers, *length])
    await send_body(send, body, more=False)


async def send_json(send: Send, status: int, value: Any, headers: Headers = ()) -> None:
    """JSON as envd (Go's encoding/json) writes it: compact, newline-terminated."""
    body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    await send_response(
        send, status, body, [("content-type", "application/json; charset=utf-8"), *headers]
    )


async def send_error(send: Send, status: int, message: str) -> None:
    """envd's error body: `{"code": <status>, "message": ...}`."""
    await send_json(
        send,
        status,
        {"code": status, "message": message},
        [("x-content-type-options", "nosniff")],
    )


async def send_text(send: Send, status: int, text: str) -> None:
    await send_response(
        send,
        status,
        text.encode(),
        [("content-type", "text/plain; charset=utf-8"), ("x-content-type-options", "nosniff")],
    )


async def send_not_found(send: Send) -> None:
    """chi's answer to an unknown path."""
    await send_text(send, 404, "404 page not found\n")


async def serve_lifespan(
    receive: Receive,
    send: Send,
    *,
    shutdown: Callable[[], Awaitable[None]],
    startup: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """The ASGI lifespan protocol: `startup` (its failure message, or None) when the server
    starts, `shutdown` when it stops."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            failure = None if startup is None else await startup()
            if failure is not None:
                await send({"type": "lifespan.startup.failed", "message": failure})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
