"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from weightcache.daemon.config import (
    Config,
    CsiConfig,
    FetchConfig,
    PolicyConfig,
    RegistryConfig,
    StoreConfig,
    WarmConfig,
)

PART = 1024 * 1024
"""Tests use 1 MiB parts and fingerprint chunks so multi-chunk files stay small."""


def make_config(
    root: Path,
    *,
    store: dict[str, object] | None = None,
    registry: RegistryConfig | None = None,
    policy: PolicyConfig | None = None,
    warm: WarmConfig | None = None,
    **fetch: object,
) -> Config:
    """A test configuration: 1 MiB parts, no retry delays, the given overrides. The folder
    holding the store stands for the node: it is the one ``file://`` root (unless ``policy``
    says otherwise), and its ``kubelet/`` folder is the kubelet's directory, where targets
    live."""
    settings: dict[str, object] = {"part_bytes": PART, "retry_delays": (0.0, 0.0, 0.0)}
    settings.update(fetch)
    node = root.parent
    if policy is None:
        policy = PolicyConfig(file_roots=(node,))
    elif not policy.file_roots:
        policy = dataclasses.replace(policy, file_roots=(node,))
    return Config(
        # No free-space reserve unless a test asks for one: the machine's disk is shared by
        # every test, and a GPU node's reserve is not what most of them check.
        store=StoreConfig(root=root, **{"reserve_fraction": 0.0, **(store or {})}),  # type: ignore[arg-type]
        fetch=FetchConfig(**settings),  # type: ignore[arg-type]
        registry=registry or RegistryConfig(),
        policy=policy,
        warm=warm or WarmConfig(),
        csi=CsiConfig(kubelet_dir=node / "kubelet"),
    )


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by relative path; fails on anything else."""
    out: dict[str, bytes] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            assert stat.S_ISREG(os.lstat(p).st_mode), f"{p} is not a regular file"
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def tree_modes(root: Path) -> set[tuple[str, int]]:
    """(kind, mode) pairs present in a tree: kind is 'dir' or 'file'."""
    modes = set()
    for dirpath, _, filenames in os.walk(root):
        modes.add(("dir", stat.S_IMODE(os.stat(dirpath).st_mode)))
        for name in filenames:
            modes.add(("file", stat.S_IMODE(os.stat(Path(dirpath) / name).st_mode)))
    return modes


def models_dir_entries(store_root: Path) -> list[str]:
    """What is visible under models/: must stay empty after any failed fetch."""
    return sorted(p.name for p in (store_root / "models").iterdir())


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``weightcache ARGS`` as a separate process, the way an operator does."""
    return subprocess.run(
        [sys.executable, "-m", "weightcache.app", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


class Hold:
    """A proxy ``before`` hook that parks a request until released and says when one arrived."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.arrived.set()
        self.release.wait(60)


def dockerconfig(host: str, user: str, password: str) -> dict[str, str]:
    """A ``kubernetes.io/dockerconfigjson`` secret's data for one registry."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {".dockerconfigjson": json.dumps({"auths": {host: {"auth": auth}}})}


class _Summary:
    """Lines printed in their own section at the end of the pytest run."""

    def __init__(self) -> None:
        self.sections: dict[str, list[str]] = {}

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        for title, lines in self.sections.items():
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)


def report(config: pytest.Config, section: str, line: str) -> None:
    """Print ``line`` under ``section`` in the run's closing summary (figures a test measured)."""
    plugin = config.pluginmanager.get_plugin("weightcache-summary")
    if plugin is None:
        plugin = _Summary()
        config.pluginmanager.register(plugin, "weightcache-summary")
    plugin.sections.setdefault(section, []).append(line)


def flip_byte(path: Path, offset: int) -> None:
    """Bit rot: one byte changes; inode, size and mtime do not."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([byte ^ 0x5A]), offset)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``12m``) mounted at ``path`` for the block: a disk of its own whose
    size and free space the test knows (the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
