"""Regenerates ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` from ``kvserve.proto``
and ``health.proto`` (the standard ``grpc.health.v1``) with grpcio-tools (pinned to 1.84.0, the GPU image's grpcio, so the
stubs import there). ``python -m protos.generate [--out DIR]``; a test regenerates them
into a temporary folder and compares. Generated files are never edited by hand."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("kvserve.proto", "health.proto")
STUBS = tuple(f"{p.removesuffix('.proto')}{suffix}" for p in PROTOS
              for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))  # fmt: skip


def generate(out: Path) -> None:
    """Writes the stubs into ``out/protos/``. The proto is compiled as
    ``protos/kvserve.proto`` from the repository root, so its messages belong to the
    module ``protos.kvserve_pb2`` (they pickle, e.g. through Serve's gRPC proxy)."""
    from grpc_tools import protoc

    (out / "protos").mkdir(parents=True, exist_ok=True)
    root = HERE.parent
    args = ["protoc", f"-I{root}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *(str(HERE / p) for p in PROTOS)]  # fmt: skip
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m protos.generate")
    p.add_argument("--out", type=Path, default=HERE.parent, help="writes OUT/protos/")
    generate(p.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
