"""The repairer's state machine, on a real store with a fake of the project's own refetch
interface: quarantine before repair, one repair per model however often asked, failures
recorded as data and answered from the index within the backoff, cleared by an install."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers import PART, make_config

from weightcache.daemon.errors import RepairFailed, SourceError
from weightcache.daemon.hashing import StreamHasher
from weightcache.daemon.repair import Repairer
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import Access, ModelState, Trust
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem, check_model

DIGEST = "sha256:" + "e" * 64


class FakeRefetch:
    """Records the repairs asked for and lets the test settle each one."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: list[Future[ModelRow]] = []
        self.lock = threading.Lock()

    def refetch_async(self, digest: str) -> Future[ModelRow]:
        fut: Future[ModelRow] = Future()
        with self.lock:
            self.asked.append(digest)
            self.pending.append(fut)
        return fut


def _ready_model(store: Store) -> bytes:
    data = os.urandom(2 * PART)
    staged = store.temp_path("test")
    staged.write_bytes(data)
    hasher = StreamHasher(chunk_size=PART)
    hasher.update(data)
    fp = hasher.finish()
    with store.ingest(DIGEST, "file:///m", "file", len(data), Access.ANONYMOUS, Trust.DIGEST) as tx:
        tx.commit(staged, fp, "w.bin", expected=fp.sha256)
        tx.install({"w.bin"})
    return data


def test_quarantine_first_one_repair_per_model_failures_as_data(tmp_path: Path) -> None:
    store = Store(make_config(tmp_path / "store").store)
    now = [1_000.0]
    refetch = FakeRefetch()
    seen: list[Problem] = []
    repairer = Repairer(store, refetch, on_damage=seen.append, backoff_s=60, clock=lambda: now[0])
    try:
        _ready_model(store)
        tree_file = store.model_path(DIGEST) / "w.bin"
        impostor = tmp_path / "impostor"
        impostor.write_bytes(b"replaced")  # a new inode: the blob itself stays intact
        os.chmod(tree_file.parent, 0o755)
        os.replace(impostor, tree_file)
        os.chmod(tree_file.parent, 0o555)
        check = check_model(store, DIGEST, full=False)
        assert [p.path for p in check.problems] == ["w.bin"]
        # Looking changed nothing: the model is still ready until the repairer acts.
        assert store.model(DIGEST).state == ModelState.READY  # type: ignore[union-attr]
        repairer.damaged(check.problems + check.problems)  # the same model twice
        row = store.model(DIGEST)
        assert row is not None and row.state == ModelState.CORRUPT and "w.bin" in row.error
        assert not tree_file.exists()  # quarantined before any repair was asked
        assert seen == check.problems + check.problems
        assert refetch.asked == [DIGEST]  # one repair, joined by the second ask
        joined = repairer.repair(DIGEST)
        assert refetch.asked == [DIGEST] and not joined.done()
        refetch.pending[0].set_exception(SourceError("gone: the body", reason="not_found"))
        with pytest.raises(SourceError):
            joined.result(timeout=10)
        row = store.model(DIGEST)
        assert row is not None and row.state == ModelState.CORRUPT
        assert row.error.startswith("w.bin: ")  # the damage is kept as it was
        assert (row.repair_reason, row.repair_error) == ("not_found", "gone: the body")
        # Within the backoff the answer comes from the index; the source is not asked.
        now[0] += 30
        again = repairer.repair(DIGEST)
        failure = again.exception()
        assert isinstance(failure, RepairFailed) and failure.reason == "not_found"
        assert refetch.asked == [DIGEST]
        assert repairer.failure(DIGEST) is not None
        # Past it, the source is asked again.
        now[0] += 31
        retried = repairer.repair(DIGEST)
        assert refetch.asked == [DIGEST, DIGEST] and not retried.done()
        refetch.pending[1].set_exception(SourceError("still gone", reason="not_found"))
        # An install (a fetch that brought the content back) clears the record.
        store.install(DIGEST)  # the blob is still held: the tree is rebuilt
        assert repairer.failure(DIGEST) is None
        assert store.model(DIGEST).state == ModelState.READY  # type: ignore[union-attr]
    finally:
        store.close()


def test_without_a_source_damage_is_only_marked(tmp_path: Path) -> None:
    store = Store(make_config(tmp_path / "store").store)
    try:
        _ready_model(store)
        problem = Problem(DIGEST, "w.bin", store.index.file_sha(DIGEST, "w.bin") or "", "test")
        repairer = Repairer(store, None)
        repairer.damaged([problem], repair=False)
        assert store.model(DIGEST).state == ModelState.CORRUPT  # type: ignore[union-attr]
        assert isinstance(repairer.repair(DIGEST).exception(), RepairFailed)
    finally:
        store.close()
