"""Tenant policy: which pods may mount which models from the shared node cache.

Two checks, both before any byte is mounted (and before any fetch is started on a pod's
behalf): the pod's namespace against the rule matching the model, then, when the volume carries
a nodePublishSecretRef (or the rule requires one), the pod's own credentials against the
registry for that manifest. The registry's answer is remembered for ``credential_cache_s`` so a
node publishing many volumes does not ask for each one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Protocol

from weightcache.daemon.config import PolicyConfig, PolicyRule
from weightcache.daemon.errors import PolicyDenied
from weightcache.daemon.references import ModelRef, OciRef

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096


class AccessCheck(Protocol):
    """Asks a registry whether some credentials may pull one manifest."""

    def check(self, ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> None:
        """Return when ``secrets`` may pull ``manifest`` (a digest or tag) of ``ref``'s
        repository; raise :class:`PolicyDenied` when the registry refuses them, or
        :class:`SourceError` when it cannot answer (nothing is remembered then)."""
        ...


class Policy:
    def __init__(
        self,
        config: PolicyConfig,
        access: AccessCheck,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._access = access
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
        manifest: str | None,
    ) -> None:
        """Raise :class:`PolicyDenied` unless a pod in ``namespace`` holding ``secrets`` may
        mount ``ref``. ``manifest`` is the cached manifest digest when known (else the
        reference's own tag or digest is checked). Blocking: call it off the event loop."""
        rule = self.rule_for(ref)
        self._check_namespace(ref, namespace, rule)
        required = rule is not None and rule.require_pull_secret
        if not secrets and not required:
            return
        if not secrets:
            raise PolicyDenied(
                f"model {ref} may only be mounted with a nodePublishSecretRef whose "
                "credentials the registry accepts; the volume carries none"
            )
        if not isinstance(ref, OciRef):
            if required:
                raise PolicyDenied(
                    f"model {ref}: pull-secret checks are only possible for oci:// models"
                )
            return
        self._check_credentials(ref, manifest or ref.reference, secrets)

    def _check_namespace(
        self, ref: ModelRef, namespace: str | None, rule: PolicyRule | None
    ) -> None:
        if rule is None:
            if self._config.default == "allow":
                return
            raise PolicyDenied(f"no policy rule allows model {ref} on this node")
        if namespace is None:
            raise PolicyDenied(
                f"model {ref} is restricted by policy but the pod's namespace is unknown: "
                "the CSIDriver object must set podInfoOnMount: true"
            )
        if not any(fnmatchcase(namespace, pattern) for pattern in rule.namespaces):
            raise PolicyDenied(
                f"namespace {namespace!r} may not mount model {ref} "
                f"(allowed: {', '.join(rule.namespaces)})"
            )

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
