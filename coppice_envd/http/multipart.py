"""A streaming multipart/form-data reader: parts come out in order, their bodies as chunks, and
nothing is held in memory beyond one chunk plus a boundary's length."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message

_HEADER_LIMIT = 16 * 1024


class MultipartError(ValueError):
    pass


@dataclass
class Part:
    headers: dict[str, str]  # lower-case names
    _reader: MultipartReader

    def _disposition(self, param: str) -> str | None:
        header = self.headers.get("content-disposition")
        if header is None:
            return None
        message = Message()
        message["content-disposition"] = header
        value = message.get_param(param, header="content-disposition")
        if isinstance(value, tuple):  # RFC 2231 encoded
            value = value[2].encode("latin-1", "replace").decode(value[0] or "utf-8", "replace")
        return value if isinstance(value, str) else None

    @property
    def form_name(self) -> str | None:
        return self._disposition("name")

    @property
    def filename(self) -> str | None:
        return self._disposition("filename")

    def data(self) -> AsyncIterator[bytes]:
        return self._reader._part_data()


class MultipartReader:
    def __init__(self, chunks: AsyncIterator[bytes], boundary: str) -> None:
        if not boundary:
            raise MultipartError("no multipart boundary")
        self._chunks = chunks
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")  # lets the first delimiter match like the others
        self._eof = False
        self._in_part = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buffer += chunk
        return True

    async def parts(self) -> AsyncIterator[Part]:
        # Preamble: everything up to the first delimiter.
        while (at := self._buffer.find(self._delimiter)) < 0:
            del self._buffer[: max(0, len(self._buffer) - len(self._delimiter))]
            if not await self._fill():
                raise MultipartError("multipart body has no boundary")
        del self._buffer[: at + len(self._delimiter)]
        while True:
            if not await self._after_delimiter():
                return
            part = Part(headers=await self._headers(), _reader=self)
            self._in_part = True
            yield part
            if self._in_part:  # the caller skipped (part of) the body
                async for _ in self._part_data():
                    pass

    async def _after_delimiter(self) -> bool:
        """True when another part follows, False at the closing delimiter."""
        while len(self._buffer) < 2:
            if not await self._fill():
                raise MultipartError("multipart body ends inside a delimiter")
        if self._buffer[:2] == b"--":
            return False
        end = self._buffer.find(b"\r\n")
        while end < 0:
            if len(self._buffer) > _HEADER_LIMIT or not await self._fill():
                raise MultipartError("malformed multipart delimiter")
            end = self._buffer.find(b"\r\n")
        if self._buffer[:end].strip(b" \t"):
            raise MultipartError("malformed multipart delimiter")
        del self._buffer[: end + 2]
        return True

    async def _headers(self) -> dict[str, str]:
        if self._buffer.startswith(b"\r\n"):
            del self._buffer[:2]
            return {}
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > _HEADER_LIMIT or not await self._fill():
                raise MultipartError("malformed multipart part headers")
        block = bytes(self._buffer[:end]).decode("utf-8", "replace")
        del self._buffer[: end + 4]
        headers: dict[str, str] = {}
        for line in block.split("\r\n"):
            name, colon, value = line.partition(":")
            if not colon:
                raise MultipartError("malformed multipart part header")
            headers.setdefault(name.strip().lower(), value.strip())
        return headers

    async def _part_data(self) -> AsyncIterator[bytes]:
        if not self._in_part:
            return
        keep = len(self._delimiter) - 1  # a delimiter may start in these last bytes
        while True:
            at = self._buffer.find(self._delimiter)
            if at >= 0:
                if at:
                    yield bytes(self._buffer[:at])
                del self._buffer[: at + len(self._delimiter)]
                self._in_part = False
                return
            if len(self._buffer) > keep:
                cut = len(self._buffer) - keep
                yield bytes(self._buffer[:cut])
                del self._buffer[:cut]
            if not await self._fill():
                raise MultipartError("multipart body ends inside a part")
