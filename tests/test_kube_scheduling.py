"""Node eligibility from a pod template, as the scheduler's hard constraints decide it, and
the contract names (annotation parsing, node label keys)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from weightcache.daemon.kube.naming import LABEL_PREFIX, label_key, parse_warm_annotation
from weightcache.daemon.kube.scheduling import eligible
from weightcache.daemon.references import parse_reference

NODE = {
    "metadata": {
        "name": "gpu-7",
        "labels": {"gpu": "h100", "zone": "a", "gpus": "8", "pool": "inference"},
    },
    "spec": {
        "taints": [
            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
            {"key": "soft", "effect": "PreferNoSchedule"},
        ]
    },
}
TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
TG: dict[str, Any] = {"tolerations": TOLERATE_GPU}


def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
        }
    }


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"matchExpressions": [{"key": key, "operator": op, "values": list(values)}]}


def aff(*terms: dict[str, Any]) -> dict[str, Any]:
    """A pod spec tolerating the GPU taint with these required node affinity terms."""
    return {**TG, "affinity": affinity(*terms)}


def name_field(op: str, name: str) -> dict[str, Any]:
    return {"matchFields": [{"key": "metadata.name", "operator": op, "values": [name]}]}


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        (TG, True),
        ({}, False),  # the GPU taint is not tolerated
        ({"tolerations": [{"operator": "Exists"}]}, True),  # tolerates everything
        ({"tolerations": [{"key": "nvidia.com/gpu", "value": "present"}]}, True),  # Equal
        ({"tolerations": [{"key": "nvidia.com/gpu", "value": "absent"}]}, False),
        (
            {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoExecute"}
                ]
            },
            False,
        ),
        ({**TG, "nodeSelector": {"gpu": "h100"}}, True),
        ({**TG, "nodeSelector": {"gpu": "a100"}}, False),
        ({**TG, "nodeSelector": {"missing": "x"}}, False),
        (
            {"tolerations": TOLERATE_GPU, "affinity": affinity(expr("gpu", "In", "a100", "h100"))},
            True,
        ),
        (aff(expr("gpu", "In", "a100")), False),
        (aff(expr("gpu", "NotIn", "a100")), True),
        (aff(expr("gpu", "NotIn", "h100")), False),
        (aff(expr("nope", "NotIn", "x")), True),
        (aff(expr("gpu", "Exists")), True),
        (aff(expr("nope", "Exists")), False),
        (aff(expr("nope", "DoesNotExist")), True),
        (aff(expr("gpu", "DoesNotExist")), False),
        (aff(expr("gpus", "Gt", "4")), True),
        (aff(expr("gpus", "Gt", "8")), False),
        (aff(expr("gpus", "Lt", "9")), True),
        (aff(expr("gpu", "Lt", "9")), False),
        # Terms are ORed; a term's requirements are ANDed.
        (
            {
                "tolerations": TOLERATE_GPU,
                "affinity": affinity(expr("gpu", "In", "a100"), expr("zone", "In", "a")),
            },
            True,
        ),
        (
            {
                "tolerations": TOLERATE_GPU,
                "affinity": affinity(
                    {
                        "matchExpressions": [
                            {"key": "gpu", "operator": "In", "values": ["h100"]},
                            {"key": "zone", "operator": "In", "values": ["b"]},
                        ]
                    }
                ),
            },
            False,
        ),
        (
            {
                "tolerations": TOLERATE_GPU,
                "affinity": affinity(
                    {
                        "matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}
                        ]
                    }
                ),
            },
            True,
        ),
        (
            {
                "tolerations": TOLERATE_GPU,
                "affinity": affinity(
                    {
                        "matchFields": [
                            {"key": "metadata.name", "operator": "NotIn", "values": ["gpu-7"]}
                        ]
                    }
                ),
            },
            False,
        ),
        (aff({}), False),  # empty term: nothing
        (aff(), False),  # no terms: nothing
    ],
)
def test_eligibility(spec: dict[str, Any], ok: bool) -> None:
    verdict = eligible(spec, NODE)
    assert verdict.eligible is ok, verdict
    assert bool(verdict.reason) is not ok


def test_no_execute_taints_count_and_prefer_no_schedule_does_not() -> None:
    node = {
        "metadata": {"name": "n", "labels": {}},
        "spec": {"taints": [{"key": "x", "effect": "NoExecute"}]},
    }
    assert not eligible({}, node).eligible
    assert "taint x=:NoExecute" in eligible({}, node).reason
    soft = {
        "metadata": {"name": "n"},
        "spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]},
    }
    assert eligible({}, soft).eligible


def test_warm_annotation_parsing() -> None:
    req = parse_warm_annotation(
        " oci://r.example/a/m:v1, s3://models-1/p/ ,,oci://r.example/a/m:v1, http://x"
    )
    assert [str(r) for r in req.refs] == ["oci://r.example/a/m:v1", "s3://models-1/p/"]
    assert len(req.errors) == 1 and "http://x" in req.errors[0]


@pytest.mark.parametrize(
    "ref",
    [
        "oci://registry.example.com:5000/a/very/deep/" + "x" * 200 + ":tag",
        "s3://bucket-1/prefix/with.dots_and-dashes/",
        "file:///models/llama",
        "oci://r.example/m@sha256:" + "f" * 64,
    ],
)
def test_label_keys_are_valid_for_any_reference(ref: str) -> None:
    key = label_key(parse_reference(ref))
    prefix, name = key.split("/")
    assert f"{prefix}/" == LABEL_PREFIX and len(prefix) <= 253
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", prefix)
    assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", name) and len(name) <= 63
    assert key == label_key(parse_reference(ref))  # stable
    assert key != label_key(parse_reference("file:///other"))
