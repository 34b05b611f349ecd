"""Does a pod's pull secret open this manifest? Asked of the origin registry, never a mirror
(a mirror does not enforce the tenant's access), with only the pod's credentials and a fresh
token cache, so one tenant's token never answers for another. The rules of
:mod:`weightcache.daemon.sources.oci_http` hold here too: the pod's credentials go only to the
origin and its token realm (never to a redirect target, never from https to http, never to a
plain-http realm of a registry not configured insecure), and every read is bounded."""

from __future__ import annotations

from collections.abc import Mapping

from weightcache.daemon.config import RegistryConfig
from weightcache.daemon.errors import PolicyDenied, SourceError
from weightcache.daemon.references import OciRef
from weightcache.daemon.sources.oci_http import (
    MANIFEST_ACCEPT,
    Credentials,
    RegistryHTTP,
    parse_docker_config,
)

DOCKER_CONFIG_KEY = ".dockerconfigjson"


def credentials_from_secret(secrets: Mapping[str, str], registry: str) -> Credentials:
    """A ``kubernetes.io/dockerconfigjson`` secret, or ``username`` and ``password`` keys
    (``kubernetes.io/basic-auth``). PolicyDenied says what is missing, never the values."""
    if DOCKER_CONFIG_KEY in secrets:
        try:
            by_host = parse_docker_config(secrets[DOCKER_CONFIG_KEY], "in the pull secret")
        except SourceError as exc:
            raise PolicyDenied(str(exc)) from exc
        creds = by_host.get(registry)
        if creds is None:
            raise PolicyDenied(f"the pull secret holds no credentials for {registry}")
        return creds
    if secrets.get("username") and secrets.get("password"):
        return Credentials(secrets["username"], secrets["password"])
    raise PolicyDenied(
        f"the pull secret has neither {DOCKER_CONFIG_KEY} nor username and password keys "
        f"(keys present: {', '.join(sorted(secrets)) or 'none'})"
    )


class RegistryAccess:
    """:class:`weightcache.daemon.policy.AccessCheck` against OCI registries."""

    def __init__(self, config: RegistryConfig, timeout_s: float) -> None:
        # Mirrors and the node's own docker config are deliberately left out.
        self._config = RegistryConfig(insecure=config.insecure, ca_file=config.ca_file)
        self._timeout = timeout_s

    def check(self, ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> None:
        creds = credentials_from_secret(secrets, ref.registry)
        http = RegistryHTTP(self._config, {ref.registry: creds}, self._timeout, pool_size=1)
        origin = http.endpoints(ref, resolving=False)[-1]
        url = origin.url(ref, f"manifests/{manifest}")
        try:
            resp = http.request(ref, origin, "HEAD", url, {"Accept": MANIFEST_ACCEPT})
            resp.release_conn()
        except SourceError as exc:
            if exc.reason in ("auth", "not_found"):
                # Registries answer 404 as well as 401/403 to hide what a caller may not see.
                raise PolicyDenied(
                    f"the pod's pull secret is refused by {ref.registry} for "
                    f"{ref.repository}@{manifest}: {exc}"
                ) from exc
            raise
