"""References are parsed once into typed values; every malformed form says what is wrong."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from weightcache.daemon.errors import InvalidReference
from weightcache.daemon.references import FileRef, OciRef, S3Ref, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci://127.0.0.1:5000/models/llm:v1", OciRef("127.0.0.1", 5000, "models/llm", "v1", None)),
        ("oci://registry.example/llm", OciRef("registry.example", None, "llm", None, None)),
        (f"oci://localhost:5000/a/b/c@{DIGEST}", OciRef("localhost", 5000, "a/b/c", None, DIGEST)),
        (f"oci://r.io/llm:v1@{DIGEST}", OciRef("r.io", None, "llm", None, DIGEST)),
        ("oci://[::1]:5000/llm:v1", OciRef("[::1]", 5000, "llm", "v1", None)),
        ("s3://bucket-1/team/llm/", S3Ref("bucket-1", "team/llm/")),
        ("s3://bucket-1/team/llm", S3Ref("bucket-1", "team/llm/")),
        ("s3://bucket-1", S3Ref("bucket-1", "")),
        ("file:///var/models/llm", FileRef(PurePosixPath("/var/models/llm"))),
    ],
)
def test_valid(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


def test_oci_accessors() -> None:
    ref = parse_reference("oci://127.0.0.1:5000/models/llm:v1")
    assert isinstance(ref, OciRef)
    assert ref.registry == "127.0.0.1:5000"
    assert ref.reference == "v1"
    pinned = ref.with_digest(DIGEST)
    assert pinned.reference == DIGEST
    assert str(pinned) == f"oci://127.0.0.1:5000/models/llm@{DIGEST}"
    assert parse_reference(str(pinned)) == pinned


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("models/llm", "no scheme"),
        ("http://r/llm", "unknown scheme 'http'"),
        ("oci://", "expected oci://HOST"),
        ("oci://r.io", "expected oci://HOST"),
        ("oci://r.io/", "expected oci://HOST"),
        ("oci://r.io/LLM:v1", "repository component 'LLM'"),
        ("oci://r.io/a//b", "repository component ''"),
        ("oci://r.io/llm:", "tag ''"),
        ("oci://r.io/llm:-bad", "tag '-bad'"),
        ("oci://r.io/llm@sha256:abc", "is not sha256:"),
        ("oci://r.io/llm@md5:" + "a" * 32, "is not sha256:"),
        ("oci://r.io:0/llm", "port '0'"),
        ("oci://r.io:99999/llm", "port '99999'"),
        ("oci://r.io:x/llm", "port 'x'"),
        ("oci://bad_host/llm", "not a valid registry host"),
        ("oci://r.io/llm v1", "whitespace"),
        ("oci://r.io/" + "a" * 5000, "longer than"),
        ("s3://", "expected s3://BUCKET"),
        ("s3://UPPER/x/", "bucket 'UPPER'"),
        ("s3://ab/x/", "bucket 'ab'"),
        ("s3://bucket/a//b/", "empty path segment"),
        ("s3://bucket/a/../b/", ". or .. segments"),
        ("file://relative/dir", "three slashes"),
        ("file:///a/../b", ". or .. segments"),
    ],
)
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(InvalidReference, match=message.replace("(", r"\(")) as exc:
        parse_reference(text)
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize(
    "spelling",
    [
        "oci://registry.example.com/team/llm:v1",
        "oci://REGISTRY.Example.COM/team/llm:v1",
        "oci://registry.example.com:443/team/llm:v1",
        "oci://registry.example.com./team/llm:v1",
        "oci://Registry.Example.Com.:443/team/llm:v1",
        "oci://10.0.0.5/team/llm:v1",
        "oci://10.0.0.5:443/team/llm:v1",
        "oci://internal-mirror:5000/team/llm:v1",
    ],
)
def test_every_spelling_of_a_registry_folds_into_one_reference(spelling: str) -> None:
    aliases = {"10.0.0.5": "registry.example.com", "internal-mirror:5000": "registry.example.com"}
    assert str(parse_reference(spelling, aliases)) == "oci://registry.example.com/team/llm:v1"


def test_other_ports_and_hosts_stay_distinct() -> None:
    assert str(parse_reference("oci://registry.example.com:5000/team/llm:v1")) == (
        "oci://registry.example.com:5000/team/llm:v1"
    )
    aliases = {"10.0.0.5": "registry.example.com"}
    assert str(parse_reference("oci://10.0.0.6/team/llm:v1", aliases)) == (
        "oci://10.0.0.6/team/llm:v1"
    )
