"""gen/ is what scripts/gen makes from proto/ now; and the generated modules work together."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import ModuleType

import filesystem
import process
import pytest
from filesystem import filesystem_connect, filesystem_pb2, filesystem_pb2_grpc
from fixtures import REPO
from google.protobuf.message import Message
from process import process_connect, process_pb2, process_pb2_grpc

GEN = REPO / "gen"


def files_under(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_committed_gen_matches_a_fresh_scripts_gen(tmp_path: Path) -> None:
    fresh_dir = tmp_path / "gen"
    subprocess.run(
        [REPO / "scripts" / "gen", fresh_dir],
        check=True,
        env={**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")},
    )
    fresh, committed = files_under(fresh_dir), files_under(GEN)
    assert sorted(fresh) == sorted(committed), "gen/ has a different file set: run scripts/gen"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"gen/ is stale against proto/ (run scripts/gen): {stale}"


def test_generated_packages_are_the_committed_ones() -> None:
    for package in (process, filesystem):
        assert package.__file__ is not None
        assert Path(package.__file__).resolve().parent.parent == GEN


class _RecordingChannel:
    """Stands in for a grpc.Channel: records each stub method's response deserializer."""

    def __init__(self) -> None:
        self.response_classes: dict[str, type[Message]] = {}

    def _record(self, path: str, **kwargs: object) -> None:
        deserializer = kwargs["response_deserializer"]
        self.response_classes[path] = deserializer.__self__  # type: ignore[attr-defined]

    unary_unary = unary_stream = stream_unary = stream_stream = _record


@pytest.mark.parametrize(
    ("pb2", "connect", "grpc_stubs"),
    [
        (process_pb2, process_connect, process_pb2_grpc),
        (filesystem_pb2, filesystem_connect, filesystem_pb2_grpc),
    ],
    ids=["process", "filesystem"],
)
def test_connect_and_grpc_stubs_share_message_classes(
    pb2: ModuleType, connect: ModuleType, grpc_stubs: ModuleType
) -> None:
    for service in pb2.DESCRIPTOR.services_by_name.values():
        channel = _RecordingChannel()
        getattr(grpc_stubs, f"{service.name}Stub")(channel)
        for method in service.methods:
            request_class = getattr(pb2, method.input_type.name)
            response_class = getattr(pb2, method.output_type.name)
            assert getattr(connect, method.input_type.name) is request_class
            assert getattr(connect, method.output_type.name) is response_class
            path = f"/{service.full_name}/{method.name}"
            assert channel.response_classes[path] is response_class
