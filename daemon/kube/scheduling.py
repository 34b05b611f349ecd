"""Could a workload's pods schedule on this node? The scheduler's hard constraints, read from
the pod template: nodeSelector, required node affinity, and taints against tolerations.

Objects are the API's JSON (camelCase dicts), as the watch delivers them after serialisation,
so this module needs no client and is tested with plain data. Soft constraints (preferred
affinity, PreferNoSchedule) never make a node ineligible; neither do resources, which change
faster than a model downloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

HARD_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class Verdict:
    eligible: bool
    reason: str
    """Why not (empty when eligible): shown in logs and events."""


def eligible(pod_spec: Mapping[str, Any], node: Mapping[str, Any]) -> Verdict:
    labels: Mapping[str, str] = (node.get("metadata") or {}).get("labels") or {}
    name: str = (node.get("metadata") or {}).get("name") or ""
    for key, value in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return Verdict(False, f"nodeSelector {key}={value} does not match")
    required = (
        ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
    ) or None
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        if not any(_term_matches(t, labels, name) for t in terms):
            return Verdict(False, "required node affinity does not match")
    tolerations = pod_spec.get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in HARD_EFFECTS and not any(
            _tolerates(t, taint) for t in tolerations
        ):
            return Verdict(
                False, f"taint {taint.get('key')}={taint.get('value', '')}:{taint['effect']}"
            )
    return Verdict(True, "")


def _term_matches(term: Mapping[str, Any], labels: Mapping[str, str], name: str) -> bool:
    """A term ANDs its requirements; a term with none matches nothing (as in the scheduler)."""
    exprs: Sequence[Mapping[str, Any]] = term.get("matchExpressions") or []
    fields: Sequence[Mapping[str, Any]] = term.get("matchFields") or []
    if not exprs and not fields:
        return False
    for req in exprs:
        if not _requirement(req, labels.get(req.get("key", "")), req.get("key", "") in labels):
            return False
    for req in fields:
        if req.get("key") != "metadata.name" or req.get("operator") not in ("In", "NotIn"):
            return False  # the only field selector the scheduler supports
        if not _requirement(req, name, True):
            return False
    return True


def _requirement(req: Mapping[str, Any], value: str | None, present: bool) -> bool:
    op = req.get("operator")
    values: Sequence[str] = req.get("values") or []
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        try:
            have, want = int(value or ""), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False  # an unknown operator matches nothing: never warm on a guess


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    operator = toleration.get("operator") or "Equal"
    if operator == "Exists":
        return not key or key == taint.get("key")
    if operator == "Equal":
        return key == taint.get("key") and (toleration.get("value") or "") == (
            taint.get("value") or ""
        )
    return False
