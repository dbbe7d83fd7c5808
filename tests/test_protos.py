"""The committed gRPC stubs are what grpcio-tools 1.84.0 makes of ``kvserve.proto``."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_stubs_regenerate_without_diff(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    assert len(generate.STUBS) == 6
    for name in generate.STUBS:
        assert (tmp_path / "protos" / name).read_text() == (generate.HERE / name).read_text(), name


def test_stubs_declare_grpcio_184() -> None:
    text = (generate.HERE / "kvserve_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in text
