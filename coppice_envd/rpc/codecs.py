"""The message codecs (protobuf binary, proto3 JSON) and compression of the gateway's Connect
services.

Like connect-go, undecodable input is `invalid_argument` (not an internal error), and JSON output
is compact. JSON is read and written as `json_format` does, by code compiled once per message
type: json_format decides every field's treatment again on every message, which was a tenth of a
unary call. The reader takes only plainly canonical input and leaves anything else (unknown or
repeated keys, nulls, numbers as floats, bytes, timestamps...) to json_format itself, so accepted
input, results and errors stay json_format's.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import re
import zlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compression import Compression
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

_M = TypeVar("_M", bound=Message)
_ToJSON = Callable[[Any], Any]
_64_BIT_INTEGERS = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_FLOATS = frozenset({FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE})


def message_to_json(message: Message) -> Any:
    """proto3 canonical JSON of `message` as Python values, equal to `MessageToDict`'s."""
    return _encoder(cast(Descriptor, message.DESCRIPTOR))(message)


@functools.cache  # one encoder per message type, for the life of the process
def _encoder(descriptor: Descriptor) -> _ToJSON:
    if descriptor.full_name == "google.protobuf.Timestamp":
        return lambda message: message.ToJsonString()
    if descriptor.full_name.startswith("google.protobuf.") or any(
        field.type in _FLOATS for field in descriptor.fields
    ):
        return json_format.MessageToDict  # other well-known types, floats: json_format's rules
    emitters = [_field_emitter(field) for field in sorted(descriptor.fields, key=_number)]

    def encode(message: Message) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for emit in emitters:
            emit(message, out)
        return out

    return encode


def _number(field: FieldDescriptor) -> int:
    return field.number


def _field_emitter(field: FieldDescriptor) -> Callable[[Message, dict[str, Any]], None]:
    """Adds one field to a JSON object when json_format would: set repeated fields and maps,
    present fields that track presence, other scalars when not their default."""
    name, key = field.name, field.json_name
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_to_json = _map_key(entry.fields_by_name["key"])
        value_to_json = _value_encoder(entry.fields_by_name["value"])

        def emit_map(message: Message, out: dict[str, Any]) -> None:
            value = getattr(message, name)
            if value:
                out[key] = {key_to_json(k): value_to_json(v) for k, v in value.items()}

        return emit_map
    to_json = _value_encoder(field)
    if field.is_repeated:

        def emit_list(message: Message, out: dict[str, Any]) -> None:
            value = getattr(message, name)
            if value:
                out[key] = [to_json(item) for item in value]

        return emit_list
    if field.has_presence:

        def emit_present(message: Message, out: dict[str, Any]) -> None:
            if message.HasField(name):
                out[key] = to_json(getattr(message, name))

        return emit_present
    default = field.default_value

    def emit_scalar(message: Message, out: dict[str, Any]) -> None:
        value = getattr(message, name)
        if value != default:
            out[key] = to_json(value)

    return emit_scalar


def _value_encoder(field: FieldDescriptor) -> _ToJSON:
    if field.message_type is not None:
        message_type = field.message_type
        return lambda value: _encoder(message_type)(value)
    if field.type in _64_BIT_INTEGERS:
        return str
    if field.type == FieldDescriptor.TYPE_BYTES:
        return lambda value: base64.b64encode(value).decode()
    if field.enum_type is not None:
        names = {number: value.name for number, value in field.enum_type.values_by_number.items()}
        return lambda value: names.get(value, value)
    return _same


def _map_key(field: FieldDescriptor) -> _ToJSON:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return lambda value: "true" if value else "false"
    return str


def _same(value: Any) -> Any:
    return value


class _Unusual(Exception):
    """Input the fast reader leaves to json_format."""


_Reader = Callable[[Any, Any], None]  # (message, parsed JSON value): fills the message
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,20}")
_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Unusual  # json_format names the repeated key
    return obj


def _parse_json(data: bytes, message: Message) -> None:
    """Fill `message` from canonical JSON, or raise _Unusual."""
    _reader(cast(Descriptor, message.DESCRIPTOR))(
        # Decoded here as json_format does: json.loads alone would also take UTF-16 and -32.
        message,
        json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys),
    )


@functools.cache  # one reader per message type, for the life of the process
def _reader(descriptor: Descriptor) -> _Reader:
    setters: dict[str, tuple[FieldDescriptor, _Reader]] = {}
    for field in descriptor.fields:
        setters[field.json_name] = setters[field.name] = (field, _field_setter(field))

    def read(message: Message, obj: Any) -> None:
        if type(obj) is not dict:
            raise _Unusual
        seen: set[object] = set()
        for key, value in obj.items():
            found = setters.get(key)
            if found is None or value is None:
                raise _Unusual
            field, set_value = found
            group = field.containing_oneof or field
            if group in seen:
                raise _Unusual  # the same field twice (by both names), or two of one oneof
            seen.add(group)
            set_value(message, value)

    return read


def _field_setter(field: FieldDescriptor) -> _Reader:
    name = field.name
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        if (key_field.type, value_field.type) != (FieldDescriptor.TYPE_STRING,) * 2:
            return _unusual

        def set_string_map(message: Message, value: Any) -> None:
            if type(value) is not dict or any(type(item) is not str for item in value.values()):
                raise _Unusual
            getattr(message, name).update(value)

        return set_string_map
    if entry is not None:
        if entry.full_name.startswith("google.protobuf."):
            return _unusual

        def fill(target: Any, value: Any) -> None:
            _reader(entry)(target, value)

        if field.is_repeated:

            def add_messages(message: Message, value: Any) -> None:
                if type(value) is not list:
                    raise _Unusual
                items = getattr(message, name)
                for item in value:
                    fill(items.add(), item)

            return add_messages

        def set_message(message: Message, value: Any) -> None:
            target = getattr(message, name)
            target.SetInParent()
            fill(target, value)

        return set_message
    convert = _scalar_reader(field)
    if field.is_repeated:

        def add_scalars(message: Message, value: Any) -> None:
            if type(value) is not list:
                raise _Unusual
            getattr(message, name).extend([convert(item) for item in value])

        return add_scalars

    def set_scalar(message: Message, value: Any) -> None:
        setattr(message, name, convert(value))

    return set_scalar


def _scalar_reader(field: FieldDescriptor) -> Callable[[Any], Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _typed(str)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return _typed(bool)
    if field.enum_type is not None:
        numbers = {value.name: number for number, value in field.enum_type.values_by_number.items()}

        def enum(value: Any) -> int:
            if type(value) is not str or value not in numbers:
                raise _Unusual
            return numbers[value]

        return enum
    if field.type in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[field.type]
        as_text = field.type in _64_BIT_INTEGERS

        def integer(value: Any) -> int:
            if as_text and type(value) is str and _INTEGER_TEXT.fullmatch(value):
                value = int(value)
            if type(value) is not int or not low <= value <= high:
                raise _Unusual
            return value

        return integer
    return _unusual  # bytes and floats


def _typed(kind: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _Unusual
        return value

    return check


def _unusual(*_: Any) -> Any:
    raise _Unusual


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
            message_to_json(message), separators=(",", ":"), ensure_ascii=False
        ).encode()

    def decode(self, data: bytes | bytearray, message_class: type[_M]) -> _M:
        message = message_class()
        if not data:
            raise ConnectError(
                Code.INVALID_ARGUMENT, "zero-length payload is not a valid JSON object"
            )
        try:
            _parse_json(bytes(data), message)
            return message
        except Exception:  # anything unusual, even a bad value, is json_format's to judge
            message = message_class()
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
