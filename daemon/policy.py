"""Tenant policy: which namespaces may mount or warm which models from the shared node cache.

The one place the isolation principle of docs/security.md is decided, for CSI publish and the
warm controller alike, before any fetch is started on a tenant's behalf:

1. ``file://`` is an operator's source: served only from ``[policy] file_roots`` (symlinks
   resolved first), never from the store, the kubelet's directory or the agent's own.
2. The first ``[[policy.rules]]`` entry matching the canonical reference decides the
   namespaces; a rule may also require the pod's pull secret.
3. With no rule, ``default = "deny"`` refuses; ``"allow"`` admits a model the node obtained
   anonymously (public on the node) and, for a model that needed credentials, only a pod whose
   own pull secret opens the manifest at the origin (the kubelet's "ensure secret pulled
   images" rule). A model never fetched is asked of its origin without credentials.
4. A pull secret the volume carries must open the manifest, whatever granted the namespace.
5. Then the signing rules (:mod:`weightcache.daemon.signing.gate`): a ready model must satisfy
   the rule matching it now, verified again if the rule changed since it was fetched.

A registry's answer to a pull secret is remembered for ``credential_cache_s``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Protocol

from weightcache.daemon.config import PolicyConfig, PolicyRule
from weightcache.daemon.errors import PolicyDenied, SourceError
from weightcache.daemon.references import FileRef, ModelRef, OciRef
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import Access

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096


class AccessCheck(Protocol):
    """Asks a registry whether some credentials may pull one manifest."""

    def check(self, ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> None:
        """Return when ``secrets`` may pull ``manifest`` (a digest or tag) of ``ref``'s
        repository; raise :class:`PolicyDenied` when the registry refuses them, or
        :class:`SourceError` when it cannot answer (nothing is remembered then)."""
        ...


class SignatureAdmission(Protocol):
    """The signature half of the decision (real: ``signing.gate.SignatureGate``)."""

    def admit(self, ref: ModelRef, cached: ModelRow | None) -> None:
        """Raise a :class:`PolicyDenied` (``SignatureMissing``, ``SignatureInvalid``) when the
        signing rule refuses the cached model; it may verify it again."""
        ...


PublicCheck = Callable[[ModelRef, str], bool]
"""``(ref, manifest)`` -> whether the origin serves it without credentials."""


class Policy:
    def __init__(
        self,
        config: PolicyConfig,
        access: AccessCheck,
        public: PublicCheck,
        protected: Sequence[Path] = (),
        clock: Callable[[], float] = time.monotonic,
        signatures: SignatureAdmission | None = None,
    ) -> None:
        """``protected``: directories no ``file://`` model may lie in or contain (the store,
        the kubelet's directory, the agent's socket directory). ``signatures``: the signing
        rules, checked after the tenant's rights (None: no signature is asked for)."""
        self._signatures = signatures
        self._config = config
        self._access = access
        self._public = public
        self._roots = tuple(Path(os.path.realpath(r)) for r in config.file_roots)
        self._protected = tuple(Path(os.path.realpath(p)) for p in protected)
        self._clock = clock
        self._decisions: dict[str, tuple[float, str | None]] = {}  # key -> (expiry, denial)
        self._lock = threading.Lock()

    def rule_for(self, ref: ModelRef) -> PolicyRule | None:
        text = str(ref)
        for rule in self._config.rules:
            if any(fnmatchcase(text, pattern) for pattern in rule.models):
                return rule
        return None

    def authorize(
        self,
        ref: ModelRef,
        namespace: str | None,
        secrets: Mapping[str, str],
        cached: ModelRow | None,
    ) -> None:
        """Raise :class:`PolicyDenied` unless ``namespace`` (a pod holding ``secrets``, or a
        workload with none) may have ``ref``. ``cached`` is the model's record when the node
        has resolved it before. Blocking (it may ask a registry): call it off the event loop.
        The denial's message is for the tenant: it names no node path or remote answer."""
        if isinstance(ref, FileRef):
            self._check_file_root(ref)
        rule = self.rule_for(ref)
        if rule is not None:
            self._check_namespace(ref, namespace, rule)
            if rule.require_pull_secret and not secrets:
                raise PolicyDenied(
                    f"model {ref} may only be mounted with a nodePublishSecretRef whose "
                    "credentials the registry accepts; the volume carries none"
                )
        elif self._config.default != "allow":
            raise PolicyDenied(f"no policy rule allows model {ref} on this node")
        if secrets and isinstance(ref, OciRef):
            self._check_credentials(ref, cached.digest if cached else ref.reference, secrets)
        elif rule is not None and rule.require_pull_secret:
            raise PolicyDenied(
                f"model {ref}: pull-secret checks are only possible for oci:// models"
            )
        elif rule is None and not self._is_public(ref, cached):
            raise PolicyDenied(
                f"model {ref} needs credentials on this node: no policy rule grants it to "
                f"namespace {namespace!r}, and the pod brings no pull secret that opens it"
            )
        if self._signatures is not None:
            self._signatures.admit(ref, cached)

    def _is_public(self, ref: ModelRef, cached: ModelRow | None) -> bool:
        if cached is not None:
            return cached.access == Access.ANONYMOUS
        try:
            return self._public(ref, ref.reference if isinstance(ref, OciRef) else "")
        except SourceError as exc:
            log.info("%s: could not tell whether it is public (%s): treated as private", ref, exc)
            return False

    def _check_file_root(self, ref: FileRef) -> None:
        refused = PolicyDenied(
            f"model {ref}: file:// models are served only from the directories the node's "
            "policy lists ([policy] file_roots)"
        )
        real = Path(os.path.realpath(ref.path))
        if not any(real.is_relative_to(root) for root in self._roots):
            log.warning("refused %s: %s is under no file root", ref, real)
            raise refused
        for protected in self._protected:
            if real.is_relative_to(protected) or protected.is_relative_to(real):
                log.warning("refused %s: %s overlaps the agent's %s", ref, real, protected)
                raise refused

    def _check_namespace(self, ref: ModelRef, namespace: str | None, rule: PolicyRule) -> None:
        if namespace is None:
            raise PolicyDenied(
                f"model {ref} is restricted by policy but the pod's namespace is unknown: "
                "the CSIDriver object must set podInfoOnMount: true"
            )
        if not any(fnmatchcase(namespace, pattern) for pattern in rule.namespaces):
            log.info("namespace %s refused %s (rule allows %s)", namespace, ref, rule.namespaces)
            raise PolicyDenied(f"namespace {namespace!r} may not mount model {ref}")

    def _check_credentials(self, ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> None:
        key = _decision_key(ref, manifest, secrets)
        now = self._clock()
        with self._lock:
            remembered = self._decisions.get(key)
        if remembered is not None and remembered[0] > now:
            if remembered[1] is not None:
                raise PolicyDenied(remembered[1])
            return
        denial: str | None = None
        try:
            self._access.check(ref, manifest, secrets)
        except PolicyDenied as exc:
            if isinstance(exc.__cause__, SourceError):
                # The registry's own words stay in the log.
                log.info("pull secret refused for %s: %s", ref, exc)
                status = exc.__cause__.status
                denial = (
                    f"the pod's pull secret is refused by {ref.registry} for "
                    f"{ref.repository}@{manifest} ({exc.__cause__.reason}"
                    + (f", HTTP {status}" if status else "")
                    + ")"
                )
            else:
                denial = str(exc)
        with self._lock:
            if len(self._decisions) >= MAX_REMEMBERED:
                live = sorted(
                    ((k, v) for k, v in self._decisions.items() if v[0] > now),
                    key=lambda kv: kv[1][0],
                )
                self._decisions = dict(live[len(live) // 2 :])  # the newer half
            self._decisions[key] = (now + self._config.credential_cache_s, denial)
        if denial is not None:
            raise PolicyDenied(denial)
        log.info("pull secret accepted by %s for %s@%s", ref.registry, ref.repository, manifest)


def _decision_key(ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> str:
    """A digest of the secret's content, never the content itself."""
    h = hashlib.sha256(f"{ref.registry}\x00{ref.repository}\x00{manifest}".encode())
    for name in sorted(secrets):
        h.update(f"\x00{name}\x00{secrets[name]}".encode())
    return h.hexdigest()
