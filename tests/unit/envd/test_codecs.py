"""The gateway's JSON codec reads and writes exactly what google.protobuf's json_format does."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from connectrpc.errors import ConnectError
from filesystem import filesystem_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from process import process_pb2

from coppice_envd.rpc.codecs import JSONCodec, message_to_json

_MESSAGE_TYPES = sorted(
    {
        cls
        for module in (process_pb2, filesystem_pb2)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, Message)
    },
    key=lambda cls: cls.DESCRIPTOR.full_name,
)
_INTEGERS = [0, 1, -1, 7, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63)]
_STRINGS = ["", "a", "héllo wörld", "日本語", 'quote " and \\ backslash', "\n\t\x00", "😀"]


def _integer(rng: random.Random, field: FieldDescriptor) -> int:
    bits = (
        64
        if field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
        else 32
    )
    unsigned = field.cpp_type in (FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64)
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return rng.choice([n for n in _INTEGERS if low <= n <= high] + [rng.randint(low, high)])


def _scalar(rng: random.Random, field: FieldDescriptor) -> Any:
    if field.enum_type is not None:
        return rng.choice([*field.enum_type.values_by_number, 0])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 2, 3, 17]))
    return _integer(rng, field)


def _fill(rng: random.Random, message: Message, depth: int = 0) -> None:
    """Sets a random subset of `message`'s fields (one member per oneof), defaults included."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb or python
    for field in descriptor.fields:
        if rng.random() < 0.3 or (field.containing_oneof is not None and rng.random() < 0.5):
            continue
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for _ in range(rng.randint(0, 3)):
                key = _scalar(rng, key_field)
                if value_field.message_type is not None:
                    if depth < 3:
                        _fill(rng, value[key], depth + 1)
                else:
                    value[key] = _scalar(rng, value_field)
        elif field.is_repeated:
            for _ in range(rng.randint(0, 3)):
                if entry is not None:
                    if depth < 3:
                        _fill(rng, value.add(), depth + 1)
                else:
                    value.append(_scalar(rng, field))
        elif entry is not None:
            if entry.full_name == "google.protobuf.Timestamp":
                value.seconds = rng.randint(-62135596800, 253402300799)
                value.nanos = rng.choice(
                    [0, 1, 1000, 1_000_000, 999_999_999, rng.randint(0, 10**9 - 1)]
                )
            elif depth < 3:
                getattr(message, field.name).SetInParent()
                _fill(rng, value, depth + 1)
        else:
            setattr(message, field.name, _scalar(rng, field))


@pytest.mark.parametrize("message_type", _MESSAGE_TYPES, ids=lambda cls: cls.DESCRIPTOR.full_name)
def test_json_equals_json_format(message_type: type[Message]) -> None:
    rng = random.Random(message_type.DESCRIPTOR.full_name)
    codec: JSONCodec[Message] = JSONCodec()
    for _ in range(300):
        message = message_type()
        _fill(rng, message)
        expected = json_format.MessageToDict(message)
        assert message_to_json(message) == expected
        encoded = codec.encode(message)
        assert json.loads(encoded) == expected
        assert codec.decode(encoded, message_type) == message


def _decoded_by_json_format(data: bytes, message_type: type[Message]) -> Message | str:
    message = message_type()
    try:
        json_format.Parse(data, message, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as e:
        return f"unmarshal into {message_type.DESCRIPTOR.full_name}: {e}"
    return message


def _decoded(data: bytes, message_type: type[Message]) -> Message | str:
    try:
        decoded: Message = JSONCodec[Any]().decode(data, message_type)
        return decoded
    except ConnectError as e:
        return e.message


_ODD_VALUES: list[Any] = [
    None, True, 0, -1, 1.0, 1.5, 2**64, "", "x", "12", "-0", "1e3", " 7", [], {}, [None], {"": 1},
]  # fmt: skip


def _mutations(rng: random.Random, obj: Any) -> Any:
    """`obj` with one value somewhere swapped for an odd one, or a key renamed or duplicated."""
    if isinstance(obj, dict) and obj and rng.random() < 0.7:
        key = rng.choice(list(obj))
        choice = rng.random()
        if choice < 0.4:
            return {**obj, key: _mutations(rng, obj[key])}
        if choice < 0.6:
            return {**{k: v for k, v in obj.items() if k != key}, key + "x": obj[key]}
        return {**obj, key: rng.choice(_ODD_VALUES)}
    if isinstance(obj, list) and obj:
        index = rng.randrange(len(obj))
        return [*obj[:index], _mutations(rng, obj[index]), *obj[index + 1 :]]
    return rng.choice(_ODD_VALUES)


@pytest.mark.parametrize("message_type", _MESSAGE_TYPES, ids=lambda cls: cls.DESCRIPTOR.full_name)
def test_decoding_odd_json_is_json_formats(message_type: type[Message]) -> None:
    """Whatever the input, the codec accepts what json_format accepts, with the same result,
    and rejects the rest with json_format's message."""
    rng = random.Random("odd " + message_type.DESCRIPTOR.full_name)
    for _ in range(300):
        message = message_type()
        _fill(rng, message)
        text = json.dumps(_mutations(rng, json_format.MessageToDict(message)))
        data = text.encode()
        assert _decoded(data, message_type) == _decoded_by_json_format(data, message_type), text
    for data in (b"{", b"[]", b"null", b'{"a":1,"a":2}', "{}".encode("utf-16"), b"\xff", b"{}" * 2):
        assert _decoded(data, message_type) == _decoded_by_json_format(data, message_type), data


def test_both_field_names_and_duplicate_keys_are_json_formats() -> None:
    start = process_pb2.StartRequest
    for text in (
        '{"process":{"cmd":"a"},"process":{"cmd":"b"}}',
        '{"process":{"cmd":"a","cmd":"b"}}',
        '{"process":{"cmd":"a"},"stdin":true,"tag":"t"}',
        '{"pty":{"size":{"rows":1,"cols":2}},"process":{"cmd":"a","envs":{"A":"1"}}}',
    ):
        assert _decoded(text.encode(), start) == _decoded_by_json_format(text.encode(), start)
    events = filesystem_pb2.GetWatcherEventsRequest
    both_names = b'{"watcherId":"a","watcher_id":"b"}'
    assert _decoded(both_names, events) == _decoded_by_json_format(both_names, events)
    assert "watcher_id" in str(_decoded(both_names, events))
    signal = process_pb2.SendSignalRequest
    two_of_a_oneof = b'{"process":{"pid":1,"tag":"x"},"signal":"SIGNAL_SIGTERM"}'
    assert _decoded(two_of_a_oneof, signal) == _decoded_by_json_format(two_of_a_oneof, signal)
    assert "oneof" in str(_decoded(two_of_a_oneof, signal))


def test_output_is_compact_utf8() -> None:
    entry = filesystem_pb2.EntryInfo(name="日本", size=5, type=filesystem_pb2.FILE_TYPE_FILE)
    assert (
        JSONCodec().encode(entry) == '{"name":"日本","type":"FILE_TYPE_FILE","size":"5"}'.encode()
    )


def test_what_the_sdks_send_is_read_without_json_format(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_json_format(*_: object, **__: object) -> None:
        raise AssertionError("json_format was used")

    monkeypatch.setattr(json_format, "Parse", no_json_format)
    start = (
        b'{"process":{"cmd":"/bin/bash","args":["-l","-c","true"],"envs":{"A":"1"},"cwd":"/tmp"},'
        b'"pty":{"size":{"rows":24,"cols":80}},"tag":"t","stdin":false}'
    )
    request = JSONCodec[Any]().decode(start, process_pb2.StartRequest)
    assert request.process.args == ["-l", "-c", "true"]
    assert request.pty.size.cols == 80
    assert request.HasField("stdin")
    assert not request.stdin
    signal = b'{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}'
    assert JSONCodec[Any]().decode(signal, process_pb2.SendSignalRequest).signal == 9
    listing = b'{"path":"/home/user","depth":2}'
    assert JSONCodec[Any]().decode(listing, filesystem_pb2.ListDirRequest).depth == 2
