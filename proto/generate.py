"""Generate the Python stubs for ``csi.proto`` with grpcio-tools.

``python -m weightcache.proto.generate`` rewrites the committed stubs in place;
``generate(out_dir)`` writes them elsewhere so a test can compare the two.

The proto is compiled under the path ``weightcache/proto/csi.proto`` so the
generated ``csi_pb2_grpc`` imports ``weightcache.proto.csi_pb2`` rather than a
bare top-level ``csi_pb2``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "csi.proto"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile csi.proto into ``out_dir``; return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include_root = Path(tmp) / "include"
        package_dir = include_root / "weightcache" / "proto"
        package_dir.mkdir(parents=True)
        (package_dir / PROTO_NAME).write_bytes((PROTO_DIR / PROTO_NAME).read_bytes())
        build_root = Path(tmp) / "out"
        build_root.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"--proto_path={include_root}",
            f"--proto_path={well_known}",
            f"--python_out={build_root}",
            f"--pyi_out={build_root}",
            f"--grpc_python_out={build_root}",
            f"weightcache/proto/{PROTO_NAME}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {PROTO_DIR / PROTO_NAME}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            target = out_dir / name
            target.write_bytes((build_root / "weightcache" / "proto" / name).read_bytes())
            written.append(target)
        return written


def main() -> int:
    for path in generate(PROTO_DIR):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
