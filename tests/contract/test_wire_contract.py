"""Proof of wire compatibility: proto/ against the envd descriptors inside the official e2b SDK."""

from __future__ import annotations

import importlib
import re
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from fixtures import REPO
from fixtures.wire_compare import compare_files, compile_protos
from google.protobuf import descriptor_pb2

PROTO_ROOT = REPO / "proto"
# Each of our proto files, and the e2b SDK module that embeds envd's descriptor of the same file.
SDK_MODULES = {
    "process/process.proto": "e2b.envd.process.process_pb",
    "filesystem/filesystem.proto": "e2b.envd.filesystem.filesystem_pb",
}


def sdk_descriptor(proto_file: str) -> descriptor_pb2.FileDescriptorProto:
    module = importlib.import_module(SDK_MODULES[proto_file])
    embedded: bytes = module.desc().proto.to_binary()
    return descriptor_pb2.FileDescriptorProto.FromString(embedded)


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    return compile_protos(PROTO_ROOT, sorted(SDK_MODULES), tmp_path_factory.mktemp("ours"))


def test_sdk_is_the_pinned_version() -> None:
    assert version("e2b").startswith("2.63."), "the wire proof is pinned to e2b 2.63.x"


@pytest.mark.parametrize("proto_file", sorted(SDK_MODULES))
def test_proto_is_wire_identical_to_sdk(
    proto_file: str, ours: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    sdk = sdk_descriptor(proto_file)
    assert sdk.name == proto_file
    assert sdk.message_type, "the SDK's embedded descriptor is empty"
    differences = compare_files(sdk, ours[proto_file])
    assert not differences, f"proto/{proto_file} differs from the e2b SDK:\n" + "\n".join(
        differences
    )


@pytest.mark.parametrize(
    ("proto_file", "pattern", "replacement", "expected"),
    [
        pytest.param(
            "process/process.proto",
            r"uint32 rows = 2;",
            "uint32 rows = 7;",
            ["process.PTY.Size.rows: number: expected 2, got 7"],
            id="field-number",
        ),
        pytest.param(
            "process/process.proto",
            r"optional string cwd = 4;",
            "string cwd = 4;",
            [
                "process.ProcessConfig: oneof _cwd missing",
                "process.ProcessConfig.cwd: oneof: expected '_cwd', got None",
                "process.ProcessConfig.cwd: proto3_optional: expected True, got False",
            ],
            id="optional",
        ),
        pytest.param(
            "process/process.proto",
            r"map<string, string> envs = 3;",
            "repeated string envs = 3;",
            [
                "process.ProcessConfig.envs: type: expected 'TYPE_MESSAGE', got 'TYPE_STRING'",
                "process.ProcessConfig.envs: type_name: expected "
                "'.process.ProcessConfig.EnvsEntry', got ''",
                "process.ProcessConfig: message EnvsEntry missing",
            ],
            id="map",
        ),
        pytest.param(
            "process/process.proto",
            r"returns \(stream StartResponse\)",
            "returns (StartResponse)",
            ["process.Process.Start: server_streaming: expected True, got False"],
            id="stream",
        ),
        pytest.param(
            "process/process.proto",
            r"SIGNAL_SIGKILL = 9;",
            "SIGNAL_SIGKILL = 8;",
            ["process.Signal.SIGNAL_SIGKILL: number: expected 9, got 8"],
            id="enum-value",
        ),
    ],
)
def test_comparison_catches_an_altered_copy(
    tmp_path: Path, proto_file: str, pattern: str, replacement: str, expected: list[str]
) -> None:
    altered_root = tmp_path / "proto"
    shutil.copytree(PROTO_ROOT, altered_root)
    altered_file = altered_root / proto_file
    altered_text, count = re.subn(pattern, replacement, altered_file.read_text())
    assert count == 1, f"{pattern!r} must occur exactly once in proto/{proto_file}"
    altered_file.write_text(altered_text)
    altered = compile_protos(altered_root, [proto_file], tmp_path)
    assert compare_files(sdk_descriptor(proto_file), altered[proto_file]) == expected
