"""Generated manifests and indexes, as the registry's bytes, through the OCI source's reading.

Every document is either refused with a domain error (a ``WeightcacheError``) or becomes a plan
whose paths are safe relative paths; a document built clean becomes exactly the plan it
describes. Nothing else may escape: no ``TypeError``, ``KeyError``, ``RecursionError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import report as summary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightcache.daemon.errors import SourceError, UnsupportedManifest, WeightcacheError
from weightcache.daemon.plan import ModelPlan, RemoteArchive, RemoteFile, safe_relpath
from weightcache.daemon.references import parse_reference
from weightcache.daemon.sources.oci_formats import (
    DOCKER_MANIFEST,
    IMAGE_CONFIGS,
    KIT_ARTIFACT,
    KIT_CONFIG,
    MAX_LAYER_BYTES,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    MODELPACK_FILEPATH,
    OCI_INDEX,
    OCI_MANIFEST,
    ORAS_UNPACK,
    TITLE,
    load_document,
    read_model,
)

REF = parse_reference("oci://127.0.0.1:5000/gen/model:v1")
DIGEST = "sha256:" + "0" * 64
SAFE_NAMES = ("a.bin", "b/c.safetensors", "./d.json", "e/f/g.txt", "tok/v.json")
HOSTILE_PATHS = (
    "",
    ".",
    "/etc/passwd",
    "../x",
    "a/../../x",
    "a\\b",
    "nul\x00byte",
    "lone-\ud800-surrogate",
    "n" * 256,
    "d/" * 2100 + "f",
)
NOT_STRINGS: tuple[Any, ...] = (0, 7, -1, 1.5, True, None, [], ["a"], {}, {"a": "b"})


def _digest(seed: bytes) -> str:
    return "sha256:" + hashlib.sha256(seed).hexdigest()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(("sha256:" + "a" * 64, OCI_MANIFEST, OCI_INDEX, TITLE)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@dataclass
class Doc:
    """A generated document, the manifests it may point to, and what a clean one must become."""

    body: bytes
    content_type: str
    others: dict[str, bytes] = field(default_factory=dict)
    expect: tuple[str, list[tuple[str, str]]] | None = None
    """(format, [(kind, path-or-digest)]) when the document was built clean; else None."""


@st.composite
def layer_paths(draw: st.DrawFn) -> tuple[Any, bool]:
    """A title / filepath annotation value and whether it is clean."""
    kind = draw(st.integers(0, 9))
    if kind <= 6:
        return draw(st.sampled_from(SAFE_NAMES)), True
    if kind <= 8:
        return draw(st.sampled_from(HOSTILE_PATHS)), False
    return draw(st.sampled_from(NOT_STRINGS)), False


def _clean_paths(paths: list[str]) -> bool:
    """Whether normalised paths are distinct and no file is another's directory."""
    norm = [p.removeprefix("./") for p in paths]
    names = set(norm)
    if len(names) != len(norm):
        return False
    return not any(p.startswith(q + "/") for p in names for q in names)


@st.composite
def manifests(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[str, list[tuple[str, str]]] | None]:
    """A manifest in one of the accepted formats, built clean or with hostile paths."""
    fmt = draw(st.sampled_from(("oras", "modelkit", "modelpack", "image")))
    n = draw(st.integers(0 if fmt != "oras" else 1, 4))
    layers: list[dict[str, Any]] = []
    want: list[tuple[str, str]] = []
    paths: list[str] = []
    clean = True
    for i in range(n):
        digest = _digest(draw(st.binary(max_size=8)) + bytes([i]))
        size = draw(st.integers(0, 1 << 40))
        layer: dict[str, Any] = {"digest": digest, "size": size}
        if fmt == "oras":
            path, ok = draw(layer_paths())
            clean &= ok
            layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
            layer["annotations"] = {TITLE: path}
            if ok and draw(st.integers(0, 4)) == 3:
                layer["annotations"][ORAS_UNPACK] = "true"
                want.append(("archive", digest))
            elif ok:
                want.append(("file", path.removeprefix("./")))
                paths.append(path)
        elif fmt == "modelkit":
            part = draw(st.sampled_from(("model", "modelpart", "dataset", "code", "docs")))
            suffix = draw(st.sampled_from(("", "+gzip", "+zstd")))
            layer["mediaType"] = f"application/vnd.kitops.modelkit.{part}.v1.tar{suffix}"
            want.append(("archive", digest))
        elif fmt == "modelpack":
            kind = draw(st.sampled_from(("weight", "weight.config", "doc", "code", "dataset")))
            packing = draw(st.sampled_from(("raw", "tar", "tar+gzip", "tar+zstd")))
            layer["mediaType"] = f"application/vnd.cncf.model.{kind}.v1.{packing}"
            path, ok = draw(layer_paths())
            layer["annotations"] = {MODELPACK_FILEPATH: path}
            if packing == "raw":
                clean &= ok
                if ok:
                    want.append(("file", path.removeprefix("./")))
                    paths.append(path)
            elif ok:
                want.append(("archive", digest))
            else:
                clean = False  # an archive's filepath is not used, but it must be a string
        else:
            layer["mediaType"] = draw(
                st.sampled_from(
                    (
                        "application/vnd.oci.image.layer.v1.tar",
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                        "application/vnd.oci.image.layer.v1.tar+zstd",
                        "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    )
                )
            )
            want.append(("archive", digest))
        layers.append(layer)
    config_type = {
        "oras": "application/vnd.oci.empty.v1+json",
        "modelkit": KIT_CONFIG,
        "modelpack": MODELPACK_CONFIG,
        "image": draw(st.sampled_from(sorted(IMAGE_CONFIGS))),
    }[fmt]
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": draw(st.sampled_from((OCI_MANIFEST, DOCKER_MANIFEST))),
        "config": {"mediaType": config_type, "digest": _digest(b"config"), "size": 2},
        "layers": layers,
    }
    if fmt in ("modelkit", "modelpack") and draw(st.booleans()):
        doc["artifactType"] = KIT_ARTIFACT if fmt == "modelkit" else MODELPACK_ARTIFACT
    if draw(st.booleans()):
        doc["annotations"] = {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}
    clean &= _clean_paths(paths)
    return doc, ((fmt, want) if clean else None)


INTERPRETED = {
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "manifests",
    "platform",
    "digest",
    "size",
    "annotations",
    TITLE,
    MODELPACK_FILEPATH,
    ORAS_UNPACK,
}


def _nodes(value: Any, trail: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value, as a trail of keys and indexes."""
    out = [trail]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _nodes(v, (*trail, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _nodes(v, (*trail, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with one place replaced by another JSON value, or removed."""
    doc = json.loads(json.dumps(doc))
    places = _nodes(doc)[1:]
    # Fields the reader interprets are where a wrong type hurts: aim there most often.
    aimed = [t for t in places if t[-1] in INTERPRETED]
    trail = draw(st.sampled_from(aimed if aimed and draw(st.booleans()) else places))
    parent: Any = doc
    for key in trail[:-1]:
        parent = parent[key]
    if draw(st.integers(0, 4)) == 2:
        del parent[trail[-1]]
    else:
        parent[trail[-1]] = draw(
            st.one_of(
                json_values,
                st.sampled_from(NOT_STRINGS),
                st.sampled_from((-1, 1 << 60, MAX_LAYER_BYTES + 1, "sha256:" + "A" * 64, "x")),
            )
        )
    return doc


def _deep(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes that are not a manifest, or one nested beyond any manifest."""
    depth = draw(st.sampled_from((40, 1000, 100_000)))
    return draw(
        st.sampled_from(
            (
                _deep(depth).encode(),
                ('{"schemaVersion": 2, "layers": ' + _deep(depth, "{}") + "}").encode(),
                b'{"a": ' * depth + b"1" + b"}" * depth,
                b'{"schemaVersion": 2, "layers": [{"size": NaN}]}',
                b'{"schemaVersion": 2, "layers": [{"size": Infinity}]}',
                b'{"schemaVersion": 2, "layers": [{"size": ' + b"9" * 5000 + b"}]}",
                b"\xff\xfe\x00garbage",
                b'{"schemaVersion": 2, "layers": [',
                b"[]",
                b'"a string"',
                b"",
            )
        )
    )


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    choice = draw(st.sampled_from(("clean", "clean", "mutated", "mutated", "index", "raw")))
    if choice == "raw":
        return Doc(draw(raw_bodies()), draw(st.sampled_from((OCI_MANIFEST, OCI_INDEX, ""))))
    doc, expect = draw(manifests())
    if choice == "mutated":
        doc, expect = draw(mutated(doc)), None
    body = json.dumps(doc).encode()
    if choice != "index":
        return Doc(body, draw(st.sampled_from((OCI_MANIFEST, ""))), expect=expect)
    digest = _digest(body)
    entries: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 2))):
        other = json.dumps({"schemaVersion": 2, "n": i}).encode()
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": _digest(other),
                "size": len(other),
                "platform": {"os": "linux", "architecture": ("amd64", "arm64")[i]},
            }
        )
    entries.insert(
        draw(st.integers(0, len(entries))),
        {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body)},
    )
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    if draw(st.booleans()):
        index, expect = draw(mutated(index)), None
    return Doc(json.dumps(index).encode(), OCI_INDEX, {digest: body}, expect)


# -- running one document -----------------------------------------------------------------------


def resolve(doc: Doc) -> ModelPlan:
    """What the OCI source does with the registry's answers, minus the network."""

    def fetch(digest: str) -> tuple[bytes, str, str]:
        if digest not in doc.others:
            raise SourceError(f"{digest}: manifest unknown", reason="not_found")
        body = doc.others[digest]
        return body, "", _digest(body)

    digest, fmt, items = read_model(doc.body, doc.content_type, DIGEST, fetch, str(REF))
    return ModelPlan(ref=REF, digest=digest, format=fmt, items=items)


def outside_paths(plan: ModelPlan) -> int:
    """Items that would land outside a store directory (or are not what a plan may hold)."""
    bad = 0
    for item in plan.items:
        assert isinstance(item.size, int) and 0 <= item.size <= MAX_LAYER_BYTES
        if isinstance(item, RemoteFile):
            lexical = os.path.normpath(os.path.join("/store", item.path))
            if safe_relpath(item.path, what="") != item.path or not lexical.startswith("/store/"):
                bad += 1
        else:
            assert isinstance(item, RemoteArchive)
            assert item.compression in ("none", "gzip", "zstd")
            assert item.root in ("", "models")
            assert len(item.sha256) == 71 and item.sha256.startswith("sha256:")
    return bad


def _shape(plan: ModelPlan) -> tuple[str, list[tuple[str, str]]]:
    return plan.format, [
        ("file", i.path) if isinstance(i, RemoteFile) else ("archive", i.sha256) for i in plan.items
    ]


def report(config: pytest.Config, line: str) -> None:
    summary(config, "generated hostile manifests", line)


# -- the tests ----------------------------------------------------------------------------------


def test_generated_manifests_are_refused_or_safe_plans(request: pytest.FixtureRequest) -> None:
    counts: Counter[str] = Counter()

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(doc=documents())
    def one(doc: Doc) -> None:
        counts["generated"] += 1
        try:
            plan = resolve(doc)
        except WeightcacheError:
            counts["refused"] += 1
            assert doc.expect is None, "a clean manifest was refused"
            return
        except Exception:
            counts["internal"] += 1
            raise
        outside = outside_paths(plan)
        counts["outside"] += outside
        assert outside == 0
        if doc.expect is not None:
            if _shape(plan) != doc.expect:
                counts["wrong"] += 1
            assert _shape(plan) == doc.expect
        counts["correct"] += 1

    one()
    report(
        request.config,
        f"hostile manifests: {counts['generated']} generated, {counts['refused']} refused with a "
        f"clear error, {counts['correct']} correct models, {counts['internal']} internal errors, "
        f"{counts['wrong']} wrong plans, {counts['outside']} files outside the store",
    )
    assert counts["generated"] >= 200
    assert counts["refused"] > 0 and counts["correct"] > 0
    assert counts["refused"] + counts["correct"] == counts["generated"]
    assert counts["internal"] == counts["wrong"] == counts["outside"] == 0


def _layer(**fields: Any) -> dict[str, Any]:
    base = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar",
        "digest": _digest(b"w"),
        "size": 1,
        "annotations": {TITLE: "w.bin"},
    }
    return {**base, **fields}


def _manifest(**fields: Any) -> dict[str, Any]:
    base = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": DIGEST, "size": 2},
        "layers": [_layer()],
    }
    return {**base, **fields}


@pytest.mark.parametrize("title", NOT_STRINGS)
def test_a_title_that_is_not_a_string_is_refused(title: Any) -> None:
    body = json.dumps(_manifest(layers=[_layer(annotations={TITLE: title})])).encode()
    with pytest.raises(UnsupportedManifest, match="is not a string"):
        resolve(Doc(body, OCI_MANIFEST))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_manifest(layers={"0": _layer()}), "no layers list"),
        (_manifest(layers=[_layer(size="1")]), "not a non-negative integer"),
        (_manifest(layers=[_layer(size=-1)]), "not a non-negative integer"),
        (_manifest(layers=[_layer(size=1.0)]), "not a non-negative integer"),
        (_manifest(layers=[_layer(size=1 << 60)]), "absurd"),
        (_manifest(layers=[_layer(digest=7)]), "not a sha256 digest"),
        (_manifest(layers=[_layer(digest="sha256:" + "A" * 64)]), "not a sha256 digest"),
        (_manifest(layers=[_layer(mediaType=["x"])]), "mediaType of .* is not a string"),
        (_manifest(layers=[_layer(annotations=["x"])]), "annotations of .* are not an object"),
        (_manifest(mediaType=[OCI_MANIFEST]), "mediaType .* is not a string"),
        (_manifest(artifactType=1), "artifactType 1 is not a string"),
        (_manifest(annotations="x"), "manifest annotations are not an object"),
        (_manifest(schemaVersion=2.0), "schemaVersion 2.0"),
        (_manifest(config=None), "descriptor is not an object"),
        (_manifest(layers=[_layer(), _layer(annotations={TITLE: "w.bin/x"})]), "is a file but"),
        ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": "x"}, "lists no manifests"),
        (
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"digest": DIGEST}]},
            "not a non-negative integer",
        ),
        (
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"digest": DIGEST, "size": 1, "platform": "linux"}],
            },
            "platform is not an object",
        ),
    ],
)
def test_a_field_of_the_wrong_type_is_a_clear_refusal(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(WeightcacheError, match=match):
        resolve(Doc(json.dumps(doc).encode(), ""))


@pytest.mark.parametrize("depth", [33, 1000, 1_000_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    with pytest.raises(UnsupportedManifest, match="nests"):
        load_document(('{"a": ' + _deep(depth) + "}").encode(), "m")


def test_an_index_entry_whose_size_lies_is_refused() -> None:
    body = json.dumps(_manifest()).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": _digest(body), "size": len(body) + 1}],
    }
    doc = Doc(json.dumps(index).encode(), OCI_INDEX, {_digest(body): body})
    with pytest.raises(UnsupportedManifest, match="the index says"):
        resolve(doc)
