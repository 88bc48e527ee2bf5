"""The message codecs (protobuf binary, proto3 JSON) and compression of the gateway's Connect
services.

Like connect-go, undecodable input is `invalid_argument` (not an internal error), and JSON output
is compact.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compression import Compression
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

_M = TypeVar("_M", bound=Message)


class BinaryCodec(Codec[Message, _M]):
    def name(self) -> str:
        return "proto"

    def encode(self, message: Message) -> bytes:
        return message.SerializeToString()

    def decode(self, data: bytes | bytearray, message_class: type[_M]) -> _M:
        message = message_class()
        try:
            message.ParseFromString(bytes(data))
        except DecodeError as e:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"unmarshal into {message.DESCRIPTOR.full_name}: {e}"
            ) from e
        return message


class JSONCodec(Codec[Message, _M]):
    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return json.dumps(
            json_format.MessageToDict(message), separators=(",", ":"), ensure_ascii=False
        ).encode()

    def decode(self, data: bytes | bytearray, message_class: type[_M]) -> _M:
        message = message_class()
        if not data:
            raise ConnectError(
                Code.INVALID_ARGUMENT, "zero-length payload is not a valid JSON object"
            )
        try:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as e:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"unmarshal into {message.DESCRIPTOR.full_name}: {e}"
            ) from e
        return message


GATEWAY_CODECS: list[Codec[Message, Message]] = [BinaryCodec(), JSONCodec()]


class GatewayGzip(GzipCompression):
    """gzip whose corrupt input is the client's error (`invalid_argument`), not ours."""

    def decompress(
        self, data: bytes | bytearray | memoryview, read_max_bytes: int | None = None
    ) -> bytes:
        try:
            return super().decompress(data, read_max_bytes)
        except (zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"decompress: {e}") from e


GATEWAY_COMPRESSIONS: list[Compression] = [GatewayGzip()]
