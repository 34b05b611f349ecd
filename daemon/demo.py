"""``weightcache demo``: the whole flow on this machine, with real local services only.

It starts a loopback registry and S3 endpoint, publishes one small model in every supported
format, warms each into a fresh store through the same code the node agent uses, shows the
store, damages a file and shows the re-check catching it and a warm healing it. Every step is
printed on stderr; the exit status is 0 only if every step did what it should.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from weightcache.daemon.config import Config


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo() -> int:
    from weightcache.daemon.config import FetchConfig, StoreConfig
    from weightcache.testing.models import ModelPublisher, publish_s3, sample_model, write_files
    from weightcache.testing.oci_push import RegistryPusher
    from weightcache.testing.services import ServiceUnavailable, run_registry, run_s3

    with tempfile.TemporaryDirectory(prefix="weightcache-demo-") as tmp:
        work = Path(tmp)
        files = sample_model(seed=42, shard_bytes=8 * 1024 * 1024, shards=4)
        total = sum(len(v) for v in files.values())
        _say(f"1. a demo model: {len(files)} files, {total / 2**20:.1f} MiB")
        local = write_files(work / "model", files)
        try:
            with run_registry(work / "registry") as registry, run_s3() as s3:
                _say(f"2. local services: registry {registry.url}, S3 endpoint {s3.url}")
                publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
                publisher.workdir.mkdir()
                refs = {
                    "ORAS artifact": f"oci://{registry.host}/demo/llm:oras",
                    "KitOps ModelKit": f"oci://{registry.host}/demo/llm:kit",
                    "ModelPack (raw)": f"oci://{registry.host}/demo/llm:modelpack",
                    "ModelPack (tar+zstd)": f"oci://{registry.host}/demo/llm:modelpack-zstd",
                    "modelcar image": f"oci://{registry.host}/demo/llm:image",
                    "S3 prefix": "s3://demo/llm/v1/",
                    "local directory": f"file://{local}",
                }
                publisher.oras("demo/llm", "oras", files)
                publisher.modelkit("demo/llm", "kit", files, compression="gzip")
                publisher.modelpack("demo/llm", "modelpack", files)
                publisher.modelpack("demo/llm", "modelpack-zstd", files, "tar+zstd")
                publisher.image("demo/llm", "image", files)
                publish_s3(s3.client(), "demo", "llm/v1/", files)
                _say("3. published the model in every supported format")
                for key, value in s3.env().items():
                    os.environ[key] = value  # the S3 source reads the standard AWS chain
                config = Config(
                    store=StoreConfig(root=work / "store"),
                    fetch=FetchConfig(part_bytes=4 * 1024 * 1024),
                )
                return _warm_and_check(config, refs, files)
        except ServiceUnavailable as exc:
            _say(f"demo: {exc}")
            return 1


def _warm_and_check(config: Config, refs: dict[str, str], files: dict[str, bytes]) -> int:
    from weightcache.daemon.references import parse_reference
    from weightcache.daemon.store.store import Store
    from weightcache.daemon.store.verify import verify_store
    from weightcache.daemon.wiring import build_fetcher

    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    ok = True
    try:
        _say(f"4. warm each into a fresh store at {config.store.root}")
        digests = {}
        for name, ref in refs.items():
            started = time.monotonic()
            row = fetcher.warm(parse_reference(ref))
            tree = store.model_path(row.digest)
            same = all((tree / rel).read_bytes() == data for rel, data in files.items())
            ok &= same
            digests[name] = row.digest
            _say(
                f"   {name:22} {row.state} in {time.monotonic() - started:5.2f}s  "
                f"{row.digest[:19]}  files {'identical' if same else 'DIFFER'}"
            )
        blobs = sum(1 for p in store.layout.blobs.rglob("*") if p.is_file())
        _say(
            f"5. {len(store.models())} models held as {blobs} blobs "
            f"(identical files stored once; the tar formats also hold their directory entries)"
        )
        report = verify_store(store, full=True)
        _say(
            f"6. verify --full: {report.files} files, {report.bytes_hashed / 2**20:.0f} MiB "
            f"hashed: {'ok' if report.ok else 'PROBLEMS'}"
        )
        ok &= report.ok
        victim_digest = digests["ORAS artifact"]
        victim = store.model_path(victim_digest) / "config.json"
        with open(victim, "r+b") as f:
            f.write(b"#")  # bit rot, a careless edit, or tampering
        report = verify_store(store, full=True)
        caught = sorted({p.path for p in report.problems})
        _say(
            f"7. damaged config.json on disk; verify --full caught: {caught}; "
            f"models now corrupt: {len(report.corrupt_models)} (they share the blob)"
        )
        ok &= caught == ["config.json"]
        row = fetcher.warm(parse_reference(refs["ORAS artifact"]))
        healed = (store.model_path(victim_digest) / "config.json").read_bytes() == files[
            "config.json"
        ]
        states = sorted({m.state for m in store.models()})
        _say(f"8. warm again: {row.state}, file healed: {healed}; every model now: {states}")
        ok &= healed and row.state == "ready" and states == ["ready"]
    finally:
        fetcher.close()
        store.close()
    _say("demo: done" if ok else "demo: a step did not do what it should")
    return 0 if ok else 1
