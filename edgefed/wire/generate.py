"""Regenerate the protobuf and gRPC modules in edgefed/wire/v1 from proto/ (commit the result).

    python -m edgefed.wire.generate [--out DIR]

A test regenerates into a temporary folder and fails when the committed modules differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["edgefed/wire/v1/federation.proto"]


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        status = protoc.main(
            ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}", proto]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto} with status {status}")
    stems = [out / proto.removesuffix(".proto") for proto in PROTO_FILES]
    return [Path(f"{stem}{suffix}.py") for stem in stems for suffix in ("_pb2", "_pb2_grpc")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
