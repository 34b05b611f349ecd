"""The signature decision: which rule applies, verify at the end of a fetch, and check again
at publish and warm (through :class:`weightcache.daemon.policy.Policy`), so what a workload may
warm and what its pods may mount are decided by the same code.

- ``off`` (or no rule): nothing is read; the model is recorded ``unchecked``.
- ``warn``: the result is recorded and logged; the model is cached and mounted.
- ``require``: anything but ``verified`` fails the fetch (nothing becomes ready) and refuses
  publish and warm with :class:`SignatureMissing` / :class:`SignatureInvalid`.

A result is kept with the model with the fingerprint of the keys that were trusted; when the
matching rule trusts other keys (or the model was recorded unchecked) the next publish or warm
verifies it again: for OMS that is ``model.sig`` alone.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from weightcache.daemon.config import SigningConfig, SigningRule
from weightcache.daemon.references import ModelRef, OciRef
from weightcache.daemon.signing import (
    SIGNATURE_FILE,
    SignatureInvalid,
    SignatureMissing,
    SignatureResult,
    SignatureStatus,
)
from weightcache.daemon.signing.oms import (
    TrustedChains,
    TrustedKey,
    TrustError,
    load_chains,
    load_key,
    verify_oms,
)
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.store import Store

log = logging.getLogger(__name__)

CosignCheck = Callable[[OciRef, str, Sequence[bytes]], SignatureResult]
"""``(ref, manifest digest, trusted PEM keys)`` -> the cosign verdict (UNSIGNED when the
registry holds no signature for it)."""


@dataclass(frozen=True)
class Trust:
    """One rule with its key material loaded."""

    rule: SigningRule
    keys: tuple[TrustedKey, ...]
    key_pems: tuple[bytes, ...]
    chains: TrustedChains | None
    fingerprint: str


def load_trust(config: SigningConfig) -> tuple[Trust, ...]:
    """Read every rule's keys and certificates once; raises :class:`TrustError` naming the
    file that cannot be used."""
    out = []
    for rule in config.rules:
        loaded = [(load_key(p), p.read_bytes()) for p in rule.public_keys]
        keys = tuple(k for k, _ in loaded if k is not None)
        pems = tuple(pem for _, pem in loaded)
        chains = load_chains(rule.certificate_chains)
        h = hashlib.sha256()
        for digest in sorted(hashlib.sha256(pem).hexdigest() for pem in pems):
            h.update(f"key {digest}\n".encode())
        if chains is not None:
            h.update(f"chains {chains.fingerprint}\n".encode())
        out.append(Trust(rule, keys, pems, chains, h.hexdigest()))
    return tuple(out)


class SignatureGate:
    """Verifies and decides; shared by the fetcher and the policy of one process."""

    def __init__(
        self,
        store: Store,
        trust: Sequence[Trust],
        cosign: CosignCheck | None = None,
    ) -> None:
        self._store = store
        self._trust = tuple(trust)
        self._cosign = cosign

    def trust_for(self, ref: ModelRef) -> Trust | None:
        """The first rule matching the canonical reference, unless its mode is ``off``."""
        text = str(ref)
        for trust in self._trust:
            if any(fnmatchcase(text, pattern) for pattern in trust.rule.models):
                return None if trust.rule.mode == "off" else trust
        return None

    def verify_fetch(self, ref: ModelRef, digest: str, paths: Collection[str]) -> SignatureResult:
        """At the end of a fetch, before the model is installed: verify, record, enforce.
        ``paths`` are the files the model will have."""
        trust = self.trust_for(ref)
        if trust is None:
            result = SignatureResult(SignatureStatus.UNCHECKED)
            self._record(digest, result, "")
            return result
        files = {p: s for p, s in self._store.index.model_files(digest) if p in paths}
        result = self._verify(ref, digest, files, trust)
        self._record(digest, result, trust.fingerprint)
        self._enforce(ref, digest, result, trust)
        return result

    def admit(self, ref: ModelRef, cached: ModelRow | None) -> None:
        """At publish and warm: a ready model's recorded result, verified again when the rule
        now trusts other keys than the check did, must satisfy the rule. A model not yet
        ready is checked when its fetch ends."""
        trust = self.trust_for(ref)
        if trust is None or cached is None or cached.state != ModelState.READY:
            return
        result = SignatureResult(
            SignatureStatus(cached.signature),
            None,
            cached.signature_signer,
            cached.signature_detail,
        )
        stale = cached.signature_trust != trust.fingerprint
        if stale or result.status == SignatureStatus.UNCHECKED:
            files = dict(self._store.index.model_files(cached.digest))
            result = self._verify(ref, cached.digest, files, trust)
            log.info(
                "%s (%s): signature checked again for the current rule: %s",
                ref,
                cached.digest,
                result.status,
            )
            self._record(cached.digest, result, trust.fingerprint)
        self._enforce(ref, cached.digest, result, trust)

    def _verify(
        self, ref: ModelRef, digest: str, files: Mapping[str, str], trust: Trust
    ) -> SignatureResult:
        sig = files.get(SIGNATURE_FILE)
        if sig is not None:
            return verify_oms(self._store.blob_path(sig), files, trust.keys, trust.chains)
        if isinstance(ref, OciRef) and self._cosign is not None and trust.key_pems:
            return self._cosign(ref, digest, trust.key_pems)
        return SignatureResult(
            SignatureStatus.UNSIGNED, detail=f"the model carries no {SIGNATURE_FILE}"
        )

    def _record(self, digest: str, result: SignatureResult, fingerprint: str) -> None:
        self._store.index.set_signature(
            digest,
            result.status,
            result.scheme or "",
            result.signer,
            result.detail,
            fingerprint,
        )

    def _enforce(self, ref: ModelRef, digest: str, result: SignatureResult, trust: Trust) -> None:
        if result.status == SignatureStatus.VERIFIED:
            return
        why = f"model {ref} ({digest}) is {result.status}" + (
            f": {result.detail}" if result.detail else ""
        )
        if trust.rule.mode != "require":
            log.warning("%s (signing rule %s: warn)", why, list(trust.rule.models))
            return
        log.warning("%s (signing rule %s: require)", why, list(trust.rule.models))
        kind = SignatureMissing if result.status == SignatureStatus.UNSIGNED else SignatureInvalid
        raise kind(f"{why}; the node's signing policy requires a trusted signature")


__all__ = ["CosignCheck", "SignatureGate", "Trust", "TrustError", "load_trust"]
