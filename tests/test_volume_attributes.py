"""Volume attributes are parsed at the edge; each bad field gets its own message."""

from __future__ import annotations

import pytest

from weightcache.csi.errors import InvalidArgument
from weightcache.csi.volume import parse_volume_attributes
from weightcache.daemon.references import OciRef

DIGEST = "sha256:" + "c" * 64


def test_inline_volume_from_the_kubelet() -> None:
    attrs = parse_volume_attributes(
        {
            "model": f"oci://127.0.0.1:5000/llm@{DIGEST}",
            "verify": "full",
            "csi.storage.k8s.io/pod.name": "llm-0",
            "csi.storage.k8s.io/pod.namespace": "team-a",
            "csi.storage.k8s.io/pod.uid": "u-1",
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "true",
        }
    )
    assert attrs.model == OciRef("127.0.0.1", 5000, "llm", None, DIGEST)
    assert (attrs.verify, attrs.fetch, attrs.ephemeral) == ("full", "IfNotCached", True)
    assert (attrs.pod_namespace, attrs.pod_name, attrs.pod_uid) == ("team-a", "llm-0", "u-1")


def test_defaults() -> None:
    attrs = parse_volume_attributes({"model": "s3://bucket/llm/"})
    assert (attrs.verify, attrs.fetch, attrs.ephemeral, attrs.pod_namespace) == (
        "fast",
        "IfNotCached",
        False,
        None,
    )


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({}, "'model' is required"),
        ({"model": ""}, "'model' is required"),
        ({"model": "http://x/y"}, "'model': .*unknown scheme"),
        ({"model": "s3://bkt/x/", "verify": "paranoid"}, "'verify' must be fast or full"),
        ({"model": "s3://bkt/x/", "fetch": "Always"}, "'fetch' must be IfNotCached or CachedOnly"),
        ({"model": "s3://bkt/x/", "modle": "x"}, "unknown volume attribute.*'modle'"),
        ({"model": "s3://bkt/x/", "csi.storage.k8s.io/ephemeral": "yes"}, "must be true or false"),
    ],
)
def test_bad_attributes(context: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_volume_attributes(context)
