"""Real read-only bind mounts (the tests run as root), checked through /proc/self/mountinfo."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from weightcache.csi.mounter import (
    FakeMounter,
    Mounter,
    MountError,
    SystemMounter,
    parse_mountinfo,
)


@pytest.fixture(params=["system", "fake"])
def mounter(request: pytest.FixtureRequest) -> Iterator[Mounter]:
    m: Mounter = SystemMounter() if request.param == "system" else FakeMounter()
    before = set(m.mounts())
    yield m
    for target in set(m.mounts()) - before:
        m.unmount(Path(target))


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "models" / "abc"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "w.bin").write_bytes(b"weights")
    return src


def test_bind_read_only_and_unmount_idempotently(tmp_path: Path, mounter: Mounter) -> None:
    src, target = _tree(tmp_path), tmp_path / "pod" / "volume"
    target.mkdir(parents=True)
    mounter.bind_read_only(src, target)
    entry = mounter.mounts()[str(target)]
    assert {"ro", "nosuid", "nodev"} <= entry.options
    if isinstance(mounter, SystemMounter):
        assert entry.root.endswith("/models/abc")
        assert (target / "sub" / "w.bin").read_bytes() == b"weights"
        with pytest.raises(OSError) as exc:
            (target / "new.bin").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
        assert not os.access(target / "sub", os.W_OK)
    mounter.unmount(target)
    assert str(target) not in mounter.mounts()
    mounter.unmount(target)  # already gone: not an error
    assert (src / "sub" / "w.bin").exists()  # the store's tree is untouched


def test_bind_of_a_missing_source_fails_and_leaves_nothing(
    tmp_path: Path, mounter: Mounter
) -> None:
    target = tmp_path / "pod" / "volume"
    target.mkdir(parents=True)
    with pytest.raises(MountError):
        mounter.bind_read_only(tmp_path / "missing", target)
    assert str(target) not in mounter.mounts()


def test_mountinfo_parsing_unescapes_paths() -> None:
    text = (
        "36 35 98:0 /models/a\\040b /var/lib/kubelet/pods/p/vol\\040x rw,nosuid,nodev,relatime "
        "shared:1 - ext4 /dev/vda rw\n"
        "37 35 98:0 / / ro,relatime - ext4 /dev/vda rw\n"
    )
    table = parse_mountinfo(text)
    entry = table["/var/lib/kubelet/pods/p/vol x"]
    assert entry.root == "/models/a b"
    assert {"nosuid", "nodev"} <= entry.options
    assert table["/"].options >= {"ro"}
