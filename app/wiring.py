"""The composition root: build the store, the sources and the fetcher from a Config."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from weightcache.daemon.config import Config, RegistryConfig
from weightcache.daemon.errors import UnsupportedManifest
from weightcache.daemon.fetcher import Fetcher, ProgressCallback
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.policy import Policy, SignatureAdmission
from weightcache.daemon.references import OciRef
from weightcache.daemon.signing import SignatureResult
from weightcache.daemon.signing.cosign import verify_cosign
from weightcache.daemon.signing.gate import CosignCheck, SignatureGate, load_trust
from weightcache.daemon.sources import Sources
from weightcache.daemon.sources.credentials import DockerConfigFile
from weightcache.daemon.sources.local import LocalSource
from weightcache.daemon.sources.oci import OciSource
from weightcache.daemon.sources.oci_access import RegistryAccess
from weightcache.daemon.sources.oci_http import RegistryHTTP
from weightcache.daemon.sources.provenance import LocalProvenance, OciProvenance
from weightcache.daemon.sources.ranges import Limits
from weightcache.daemon.sources.s3 import S3Source
from weightcache.daemon.store.store import Store


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    # The standard AWS chain: AWS_ENDPOINT_URL, profiles, IRSA web identity, instance roles.
    return boto3.client(
        "s3",
        config=BotoConfig(max_pool_connections=64, retries={"max_attempts": 1, "mode": "standard"}),
    )


def build_sources(config: Config) -> Sources:
    limits = Limits.of(config.fetch)
    http = RegistryHTTP(
        config.registry,
        DockerConfigFile(config.registry.docker_config),
        config.fetch.timeout_s,
        limits=limits,
    )
    # Asks the origin alone, with no credentials at all: is this model public?
    anonymous = RegistryHTTP(
        RegistryConfig(insecure=config.registry.insecure, ca_file=config.registry.ca_file),
        {},
        config.fetch.timeout_s,
        limits=limits,
    )
    return Sources(
        {
            "oci": OciSource(http),
            "s3": S3Source(_s3_client, config.fetch.timeout_s, limits=limits),
            "file": LocalSource(config.policy.file_roots),
        },
        {"oci": OciProvenance(http, anonymous), "file": LocalProvenance()},
    )


def build_fetcher(
    config: Config,
    store: Store | None = None,
    *,
    stop: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
    metrics: Metrics | None = None,
) -> Fetcher:
    """The fetcher, with the signing rules' keys read here (a key that cannot be used is a
    ConfigError before anything runs); its ``signatures`` go to :func:`build_policy`."""
    store = store or Store(config.store)
    sources = build_sources(config)
    return Fetcher(
        store,
        sources,
        config.fetch,
        stop=stop,
        on_progress=on_progress,
        metrics=metrics,
        signatures=build_signatures(config, store, sources),
    )


def build_signatures(
    config: Config, store: Store, sources: Sources | None = None
) -> SignatureGate | None:
    """The signing rules over ``store``; None when no rule is configured. With ``sources``,
    an ``oci://`` model without ``model.sig`` is looked up for a cosign signature."""
    if not config.signing.rules:
        return None
    cosign: CosignCheck | None = None
    if sources is not None:
        registry = sources

        def cosign(ref: OciRef, digest: str, keys: Sequence[bytes]) -> SignatureResult:
            source = registry.for_ref(ref)
            if not isinstance(source, OciSource):
                raise UnsupportedManifest(f"{ref}: no OCI source to read cosign signatures from")
            return verify_cosign(source, ref, digest, keys)

    return SignatureGate(store, load_trust(config.signing), cosign)


def build_policy(config: Config, sources: Sources, signatures: SignatureAdmission | None) -> Policy:
    """The tenant policy; ``sources`` tell whether a model is public (the fetcher's);
    ``signatures`` (the fetcher's) makes publish and warm obey the signing rules too."""
    return Policy(
        config.policy,
        RegistryAccess(config.registry, config.fetch.timeout_s),
        lambda ref, manifest: sources.provenance(ref).anonymous(ref, manifest),
        protected=(
            config.store.root,
            config.csi.kubelet_dir,
            *([config.registry.docker_config.parent] if config.registry.docker_config else []),
        ),
        signatures=signatures,
    )
