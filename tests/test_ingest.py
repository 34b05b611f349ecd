"""The store's ingest transaction: nothing reaches blobs/ or models/ unless its digest is the
one expected, checked inside the store; a failure inside the transaction is recorded once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from helpers import PART, make_config, models_dir_entries

from weightcache.daemon.errors import DigestMismatch
from weightcache.daemon.hashing import Fingerprint, StreamHasher
from weightcache.daemon.store.states import Access, ModelState, Trust
from weightcache.daemon.store.store import Store

DIGEST = "sha256:" + "d" * 64


def _staged(store: Store, data: bytes) -> tuple[Path, Fingerprint]:
    path = store.temp_path("test")
    path.write_bytes(data)
    hasher = StreamHasher(chunk_size=PART)
    hasher.update(data)
    return path, hasher.finish()


def test_the_store_refuses_a_commit_whose_digest_differs(tmp_path: Path) -> None:
    store = Store(make_config(tmp_path / "store").store)
    try:
        data = os.urandom(3 * PART + 5)
        staged, fp = _staged(store, data)
        other = "sha256:" + hashlib.sha256(b"what the manifest said").hexdigest()
        with (
            pytest.raises(DigestMismatch, match="hashes to"),
            store.ingest(
                DIGEST, "oci://r/m:v1", "oras", len(data), Access.ANONYMOUS, Trust.DIGEST
            ) as ingest,
        ):
            ingest.commit(staged, fp, "w.bin", expected=other)
        assert not staged.exists()  # dropped, never linked into blobs/
        assert not store.has_blob(fp.sha256) and not store.blob_path(fp.sha256).exists()
        row = store.model(DIGEST)
        assert row is not None and row.state == ModelState.FAILED and "hashes to" in row.error
        assert models_dir_entries(tmp_path / "store") == []
        # The same bytes with the right expectation go in, and the model becomes ready.
        staged, fp = _staged(store, data)
        with store.ingest(
            DIGEST, "oci://r/m:v1", "oras", len(data), Access.ANONYMOUS, Trust.DIGEST
        ) as ingest:
            ingest.commit(staged, fp, "w.bin", expected=fp.sha256)
            ingest.install({"w.bin"})
        row = store.model(DIGEST)
        assert row is not None and row.state == ModelState.READY and row.size == len(data)
        assert (store.model_path(DIGEST) / "w.bin").read_bytes() == data
    finally:
        store.close()
