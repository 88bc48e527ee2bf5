"""Field-by-field comparison of protobuf file descriptors, for the wire-compatibility proof.

Compares what decides the bytes and JSON on the wire and the RPC paths and shapes: names, numbers,
types, labels, oneof membership, proto3 `optional`, map entries, JSON names, enum values and
service methods. Source order, comments and language options are not compared.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from google.protobuf import descriptor_pb2

FileDescriptorProto = descriptor_pb2.FileDescriptorProto
DescriptorProto = descriptor_pb2.DescriptorProto
FieldDescriptorProto = descriptor_pb2.FieldDescriptorProto
EnumDescriptorProto = descriptor_pb2.EnumDescriptorProto
ServiceDescriptorProto = descriptor_pb2.ServiceDescriptorProto
MethodDescriptorProto = descriptor_pb2.MethodDescriptorProto

Facts = dict[str, object]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


Named = TypeVar("Named", bound=_Named)


def compile_protos(
    proto_root: Path, files: Sequence[str], out_dir: Path
) -> dict[str, FileDescriptorProto]:
    """Compile `files` (relative to `proto_root`) with grpcio-tools' protoc; descriptors by name."""
    descriptor_set = out_dir / "descriptors.binpb"
    protoc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--descriptor_set_out={descriptor_set}",
            *files,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if protoc.returncode != 0:
        raise RuntimeError(f"protoc failed on {proto_root}:\n{protoc.stderr}")
    parsed = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {file.name: file for file in parsed.file}


def compare_files(expected: FileDescriptorProto, actual: FileDescriptorProto) -> list[str]:
    """Every wire-relevant difference between two files, as `where: what: expected X, got Y`."""
    where = expected.package or expected.name
    differences = _compare_facts(where, _file_facts(expected), _file_facts(actual))
    differences += _compare_named(
        where, "message", expected.message_type, actual.message_type, _compare_messages
    )
    differences += _compare_named(
        where, "enum", expected.enum_type, actual.enum_type, _compare_enums
    )
    differences += _compare_named(
        where, "service", expected.service, actual.service, _compare_services
    )
    return differences


def _file_facts(file: FileDescriptorProto) -> Facts:
    return {
        "name": file.name,
        "package": file.package,
        "syntax": file.syntax,
        "imports": sorted(file.dependency),
    }


def _compare_messages(where: str, expected: DescriptorProto, actual: DescriptorProto) -> list[str]:
    differences = _compare_facts(
        where,
        {"map_entry": expected.options.map_entry},
        {"map_entry": actual.options.map_entry},
    )
    differences += _compare_named(where, "oneof", expected.oneof_decl, actual.oneof_decl, None)
    differences += _compare_named(
        where,
        "field",
        expected.field,
        actual.field,
        lambda at, e, a: _compare_facts(at, _field_facts(expected, e), _field_facts(actual, a)),
    )
    differences += _compare_named(
        where, "message", expected.nested_type, actual.nested_type, _compare_messages
    )
    differences += _compare_named(
        where, "enum", expected.enum_type, actual.enum_type, _compare_enums
    )
    return differences


def _field_facts(message: DescriptorProto, field: FieldDescriptorProto) -> Facts:
    return {
        "number": field.number,
        "type": FieldDescriptorProto.Type.Name(field.type),
        "type_name": field.type_name,
        "label": FieldDescriptorProto.Label.Name(field.label),
        "oneof": (
            message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        ),
        "proto3_optional": field.proto3_optional,
        "json_name": field.json_name,
        "default_value": field.default_value,
        "packed": field.options.packed if field.options.HasField("packed") else None,
    }


def _compare_enums(
    where: str, expected: EnumDescriptorProto, actual: EnumDescriptorProto
) -> list[str]:
    return _compare_named(
        where,
        "value",
        expected.value,
        actual.value,
        lambda at, e, a: _compare_facts(at, {"number": e.number}, {"number": a.number}),
    )


def _compare_services(
    where: str, expected: ServiceDescriptorProto, actual: ServiceDescriptorProto
) -> list[str]:
    return _compare_named(
        where,
        "method",
        expected.method,
        actual.method,
        lambda at, e, a: _compare_facts(at, _method_facts(e), _method_facts(a)),
    )


def _method_facts(method: MethodDescriptorProto) -> Facts:
    return {
        "input_type": method.input_type,
        "output_type": method.output_type,
        "client_streaming": method.client_streaming,
        "server_streaming": method.server_streaming,
        # Connect clients may use GET for NO_SIDE_EFFECTS methods.
        "idempotency_level": descriptor_pb2.MethodOptions.IdempotencyLevel.Name(
            method.options.idempotency_level
        ),
    }


def _compare_named(
    where: str,
    kind: str,
    expected: Iterable[Named],
    actual: Iterable[Named],
    compare: Callable[[str, Named, Named], list[str]] | None,
) -> list[str]:
    """Pair items by name: report missing and unexpected ones, and compare the pairs."""
    expected_by_name = {item.name: item for item in expected}
    actual_by_name = {item.name: item for item in actual}
    differences = [
        f"{where}: {kind} {name} missing" for name in expected_by_name if name not in actual_by_name
    ]
    differences += [
        f"{where}: unexpected {kind} {name}"
        for name in actual_by_name
        if name not in expected_by_name
    ]
    if compare is not None:
        for name, item in expected_by_name.items():
            if name in actual_by_name:
                differences += compare(f"{where}.{name}", item, actual_by_name[name])
    return differences


def _compare_facts(where: str, expected: Facts, actual: Facts) -> list[str]:
    return [
        f"{where}: {key}: expected {expected[key]!r}, got {actual[key]!r}"
        for key in expected
        if expected[key] != actual[key]
    ]
