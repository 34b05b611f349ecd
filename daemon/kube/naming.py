"""The Kubernetes-facing names of the contract: the warm annotation and the node label keys.

A node label key's name part is at most 63 characters of ``[A-Za-z0-9._-]``, which no
reference fits, so the key carries a digest of the normalised reference instead:
``warm.weightcache.io/<first 40 hex digits of sha256(reference)>``. The reference is normalised
as weightcache prints it (its canonical form: ``oci://host/repo:tag`` with the host in lower
case, no ``:443``, registry aliases applied and the default tag spelled out):
``printf %s oci://host/repo:v1 | sha256sum | cut -c1-40``. The WarmReady event names the key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from weightcache.daemon.errors import InvalidReference
from weightcache.daemon.references import Aliases, ModelRef, parse_reference

WARM_ANNOTATION = "weightcache.io/warm"
LABEL_PREFIX = "warm.weightcache.io/"
LABEL_VALUE = "true"


def label_key(ref: ModelRef) -> str:
    return LABEL_PREFIX + hashlib.sha256(str(ref).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class WarmRequest:
    refs: tuple[ModelRef, ...]
    errors: tuple[str, ...]
    """One message per entry that is not a valid reference (reported, never guessed at)."""


def parse_warm_annotation(value: str, aliases: Aliases | None = None) -> WarmRequest:
    """``REF[,REF...]``; blanks around entries are ignored, duplicates (after folding into the
    canonical form) collapse."""
    refs: dict[str, ModelRef] = {}
    errors = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            ref = parse_reference(entry, aliases)
        except InvalidReference as exc:
            errors.append(str(exc))
            continue
        refs.setdefault(str(ref), ref)
    return WarmRequest(tuple(refs.values()), tuple(errors))
