"""Restart under load: a reader streams a model's files through a pod's bind mount while the
node agent is SIGKILLed and started again, twice. Counted: bytes the reader read and the read
errors it saw (0); after each restart the agent reconciles its pins with the mount table."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import pytest
from helpers import PART, report, run_cli
from test_node_process import _identity, _publish, _start, _until_serving

from weightcache.csi.mounter import SystemMounter
from weightcache.daemon.config import StoreConfig
from weightcache.daemon.store.store import Store
from weightcache.testing.models import sample_model, write_files
from weightcache.testing.services import free_port

SECTION = "reliability"
RESTARTS = 2


class Reader(threading.Thread):
    """Reads every file of the mount, in a loop, until told to stop; counts bytes and errors."""

    def __init__(self, target: Path, files: dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.target, self.files = target, files
        self.bytes = self.errors = self.rounds = 0
        self.stop = threading.Event()
        self.round_done = threading.Condition()

    def run(self) -> None:
        while not self.stop.is_set():
            for rel, data in self.files.items():
                try:
                    with open(self.target / rel, "rb", buffering=0) as f:
                        got = b""
                        while chunk := f.read(PART // 4):
                            got += chunk
                    self.bytes += len(got)
                    self.errors += got != data
                except OSError:
                    self.errors += 1
            with self.round_done:
                self.rounds += 1
                self.round_done.notify_all()

    def wait_rounds(self, n: int, timeout: float = 60) -> bool:
        with self.round_done:
            goal = self.rounds + n
            return self.round_done.wait_for(lambda: self.rounds >= goal, timeout)


def test_a_reader_never_notices_the_agent_restarting(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    files = sample_model(91, shard_bytes=2 * PART, shards=3)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    store_dir = tmp_path / "store"
    assert run_cli("warm", ref, "--store", str(store_dir)).returncode == 0
    endpoint = f"unix://{tmp_path}/csi/csi.sock"
    target = tmp_path / "pods" / "p" / "model"
    port = free_port()
    proc = _start(store_dir, endpoint, port)
    reader = Reader(target, files)
    try:
        _until_serving(proc)
        asyncio.run(_publish(endpoint, ref, target))
        reader.start()
        assert reader.wait_rounds(1)
        for _ in range(RESTARTS):
            proc.send_signal(signal.SIGKILL)  # no shutdown at all
            proc.wait(30)
            assert reader.wait_rounds(2), "the reader stalled while the agent was down"
            proc = _start(store_dir, endpoint, port)
            _until_serving(proc)
            assert asyncio.run(_identity(endpoint))[1]
            assert reader.wait_rounds(2)
    finally:
        reader.stop.set()
        reader.join(60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    mounter = SystemMounter()
    try:
        assert str(target) in mounter.mounts()
        store = Store(StoreConfig(root=store_dir))
        try:
            assert [(k, h) for _, k, h in store.pins()] == [("mount", str(target))]
        finally:
            store.close()
    finally:
        mounter.unmount(target)
    report(
        request.config,
        SECTION,
        f"restart under load: {RESTARTS} SIGKILLs and restarts of the node agent while a reader "
        f"streamed the mount: {reader.bytes} bytes read in {reader.rounds} rounds, "
        f"{reader.errors} read errors, pins reconciled with the mount table",
    )
    assert reader.errors == 0 and reader.bytes > 0
