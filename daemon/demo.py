"""``weightcache demo``: the whole flow on this machine, with real local services only.

It starts a loopback registry and S3 endpoint, publishes a small model in every supported
format, and shows each step on stderr. Later steps (warm, verify, mount) join as they land.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo() -> int:
    from weightcache.testing.models import ModelPublisher, publish_s3, sample_model, write_files
    from weightcache.testing.oci_push import RegistryPusher
    from weightcache.testing.services import ServiceUnavailable, run_registry, run_s3

    with tempfile.TemporaryDirectory(prefix="weightcache-demo-") as tmp:
        work = Path(tmp)
        files = sample_model(seed=42, shard_bytes=4 * 1024 * 1024, shards=4)
        total = sum(len(v) for v in files.values())
        _say(f"demo model: {len(files)} files, {total / 2**20:.1f} MiB")
        local = write_files(work / "model", files)
        _say(f"  file://{local}")
        try:
            with run_registry(work / "registry") as registry, run_s3() as s3:
                _say(f"registry on {registry.url}, S3 endpoint on {s3.url}")
                publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
                publisher.workdir.mkdir()
                started = time.monotonic()
                for name, desc in [
                    ("ORAS artifact", publisher.oras("demo/llm", "oras", files)),
                    ("KitOps ModelKit", publisher.modelkit("demo/llm", "kit", files)),
                    ("ModelPack", publisher.modelpack("demo/llm", "modelpack", files)),
                    ("modelcar image", publisher.image("demo/llm", "image", files)),
                ]:
                    _say(f"  {name:16} oci://{registry.host}/demo/llm@{desc.digest}")
                publish_s3(s3.client(), "demo", "llm/v1/", files)
                _say("  S3 prefix        s3://demo/llm/v1/")
                _say(f"published in {time.monotonic() - started:.2f}s")
        except ServiceUnavailable as exc:
            _say(f"demo: {exc}")
            return 1
    _say("demo: done")
    return 0
