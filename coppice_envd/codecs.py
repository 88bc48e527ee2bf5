"""The message codecs the gateway's Connect services speak: protobuf binary and proto3 JSON.

Like connect-go, undecodable input is `invalid_argument` (not an internal error), and JSON output
is compact.
"""

from __future__ import annotations

import json
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.codec import Codec
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
