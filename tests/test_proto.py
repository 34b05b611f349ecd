"""The committed CSI stubs are exactly what grpcio-tools generates from proto/csi.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from weightcache.proto import generate


def _diff(committed_dir: Path, fresh_dir: Path) -> list[str]:
    return [
        name
        for name in generate.GENERATED
        if (committed_dir / name).read_bytes() != (fresh_dir / name).read_bytes()
    ]


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    assert _diff(generate.PROTO_DIR, tmp_path) == [], (
        "stale CSI stubs: run `python -m weightcache.proto.generate` and commit the result"
    )


def test_an_edited_stub_is_detected(tmp_path: Path) -> None:
    committed = tmp_path / "committed"
    committed.mkdir()
    for name in generate.GENERATED:
        (committed / name).write_bytes((generate.PROTO_DIR / name).read_bytes())
    with (committed / "csi_pb2_grpc.py").open("a") as f:
        f.write("# a hand edit\n")
    fresh = tmp_path / "fresh"
    generate.generate(fresh)
    assert _diff(committed, fresh) == ["csi_pb2_grpc.py"]


def test_proto_is_csi_v1_with_all_three_services() -> None:
    from weightcache.proto import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    services = set(csi_pb2.DESCRIPTOR.services_by_name)
    assert {"Identity", "Controller", "Node"} <= services
    node = csi_pb2.DESCRIPTOR.services_by_name["Node"]
    assert {"NodePublishVolume", "NodeUnpublishVolume", "NodeGetInfo"} <= {
        m.name for m in node.methods
    }
    # Secrets are marked in the descriptor, which is how logging strips them.
    field = csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True


def test_generated_code_imports_under_the_namespace() -> None:
    code = (generate.PROTO_DIR / "csi_pb2_grpc.py").read_text()
    assert "from weightcache.proto import csi_pb2" in code
    out = subprocess.run(
        [sys.executable, "-c", "import weightcache.proto.csi_pb2_grpc"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
