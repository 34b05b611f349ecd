"""Configuration, read once at the edge into grouped frozen dataclasses and passed down.

The file is TOML (``--config FILE``); every field has a default, so an empty file is valid.
Nothing below the entry point reads the environment or a file for settings.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from weightcache.daemon.errors import InvalidReference, WeightcacheError
from weightcache.daemon.references import canonical_registry


class ConfigError(WeightcacheError):
    """The configuration file is malformed; the message names the field."""


@dataclass(frozen=True)
class StoreConfig:
    root: Path = Path("/var/lib/weightcache")
    """The store directory on the node's NVMe."""
    budget_bytes: int = 0
    """Byte budget for cached content; 0 means the filesystem's size less the reserve."""
    high_watermark: float = 0.90
    """Start evicting when usage passes this fraction of the budget."""
    low_watermark: float = 0.80
    """Evict down to this fraction of the budget."""
    quarantine_bytes: int = 10 * 1024**3
    """How many bytes of quarantined files to keep for inspection (oldest dropped first)."""
    reserve_fraction: float = 0.20
    """Free space the store always leaves on its filesystem, as a fraction of the filesystem's
    size: a fetch that would leave less is refused (after evicting what may be evicted), naming
    the sizes. The kubelet's default hard eviction thresholds are nodefs.available<10% and
    imagefs.available<15%, and image garbage collection starts above 85% used; on most nodes
    all three watch the same filesystem, so 15% free is where DiskPressure begins and GPU pods
    are evicted. 20% keeps 5 points of margin above it for logs, images and emptyDirs
    (deploy/README.md has the arithmetic). A store on a disk of its own may lower it."""
    reserve_bytes: int = 0
    """A floor on the reserve in bytes (for a kubelet threshold written in bytes, e.g.
    ``nodefs.available<100Gi``); the larger of the two applies."""
    partial_max_age_s: float = 24 * 3600.0
    """A partial download nobody has resumed (or written to) for this long is removed, when the
    store opens and by ``gc``: a fetch that failed for good must not hold disk forever."""


SHA256_BYTES_PER_S_PER_CORE = 1.5e9
"""sha256 on one core with SHA-NI (bench/hashing.py: 1.4-1.6 GB/s); the bound of a fetch."""
FASTEST_DISK_BYTES_PER_S = 25e9
"""The fastest local NVMe array a GPU node carries: past it more hashing threads buy nothing."""


def hashing_threads(cores: int | None) -> int:
    """Files fetched (and sha256 streams hashed) at once on a node of ``cores``: enough to
    hash at the fastest disk's rate (17), never more than a quarter of the cores (the pods
    need the rest), and at least 4, what small nodes have always used (32 cores: 8, 64: 16)."""
    at_disk_rate = math.ceil(FASTEST_DISK_BYTES_PER_S / SHA256_BYTES_PER_S_PER_CORE)
    return max(4, min(at_disk_rate, (cores or 1) // 4))


@dataclass(frozen=True)
class FetchConfig:
    files_in_parallel: int = field(default_factory=lambda: hashing_threads(os.cpu_count()))
    """Files downloaded at once: each streams through its own sha256 on its own thread, so
    this is also how many cores hash (:func:`hashing_threads` of the node's cores)."""
    ranges_per_file: int = 2
    """Range requests in flight per large file; memory is files x ranges x part size."""
    part_bytes: int = 16 * 1024 * 1024
    """Size of one range request (a multiple of the fingerprint chunk size)."""
    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """Backoff delays between attempts (jitter is added); the count is the retry budget."""
    bandwidth_bytes_per_s: int = 0
    """Cap on download rate for this node; 0 means unlimited."""
    timeout_s: float = 60.0
    """Connect and read timeout of one request."""
    stall_bytes_per_s: int = 1024 * 1024
    """A transfer that moves fewer bytes than this per second over ``stall_window_s`` is
    aborted and retried (on the next mirror when there is one); 0: no stall detection."""
    stall_window_s: float = 30.0
    """The window over which ``stall_bytes_per_s`` is measured."""
    request_deadline_s: float = 60.0
    """Overall deadline of one manifest, token or metadata request: connect, redirects, headers
    and body together."""
    max_layer_members: int = 100_000
    """Entries one tar layer may hold (files, directories, links, whiteouts); more is refused."""


@dataclass(frozen=True)
class Mirror:
    """A registry mirror tried before the origin (containerd hosts.toml semantics)."""

    url: str
    """Base URL, e.g. ``http://127.0.0.1:5001`` or ``https://mirror.example``."""
    resolve: bool = False
    """Whether tags may be resolved through this mirror (``capabilities = ["pull", "resolve"]``)."""
    override_path: bool = False
    """The URL already includes the API path (``/v2`` is not appended)."""


@dataclass(frozen=True)
class RegistryConfig:
    insecure: tuple[str, ...] = ()
    """Registry hosts (``host[:port]``) reached over plain HTTP besides loopback ones."""
    mirrors: Mapping[str, tuple[Mirror, ...]] = field(default_factory=dict)
    """Per registry host, mirrors tried in order before the origin."""
    docker_config: Path | None = None
    """A docker ``config.json`` (the imagePullSecret format) with registry credentials."""
    ca_file: Path | None = None
    """PEM certificates trusted, besides the system's, for registries, mirrors and token realms
    reached over HTTPS."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Other spellings of a registry (``host[:port]``: an IP, an internal name) -> the one
    references are folded into, so the policy, the index and node labels see one model."""


@dataclass(frozen=True)
class PolicyRule:
    """Which pod namespaces may mount the models a rule matches."""

    models: tuple[str, ...] = ()
    """fnmatch patterns over the normalised reference (``*`` also matches ``/``)."""
    namespaces: tuple[str, ...] = ()
    """fnmatch patterns over the pod's namespace."""
    require_pull_secret: bool = False
    """The volume must carry a nodePublishSecretRef that the registry accepts for the model."""


@dataclass(frozen=True)
class PolicyConfig:
    """Tenant policy of the node cache, checked at every publish. The first matching rule
    decides; ``default`` applies when none matches."""

    default: str = "allow"
    """``allow`` or ``deny`` for models no rule matches."""
    credential_cache_s: float = 60.0
    """How long a pull-secret check against the registry is remembered."""
    rules: tuple[PolicyRule, ...] = ()
    file_roots: tuple[Path, ...] = ()
    """Directories under which ``file://`` models may be served to pods and warmed (symlinks
    resolved first). Empty: the node agent refuses ``file://``; the CLI always takes it."""


@dataclass(frozen=True)
class WarmConfig:
    """The warm controller's dealings with the Kubernetes API."""

    watch_timeout_s: int = 300
    """Server-side lifetime of one watch; the next one resumes from the last resourceVersion."""
    reconnect_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
    """Waits between failed list/watch attempts (the last one repeats)."""
    request_timeout_s: float = 30.0
    """Connect and read timeout of one API request."""
    resync_s: float = 60.0
    """How often the controller re-checks the store (evictions) without a cluster change."""
    retry_failed_s: float = 300.0
    """How long a failed warm waits before it is tried again."""
    namespace_bytes: int = 0
    """Bytes of models that warm pins of one namespace's workloads may hold on this node;
    0: no limit (the store's budget still applies)."""
    refs_per_workload: int = 8
    """References one workload's annotation may name; a workload naming more warms nothing."""
    labels_per_node: int = 64
    """``warm.weightcache.io/`` labels this node carries at most."""
    idle_pin_s: float = 7 * 24 * 3600.0
    """A warm pin on a model no pod has mounted for this long is released (the model becomes
    evictable) until a pod mounts it or the workload changes; 0: never."""


@dataclass(frozen=True)
class CsiConfig:
    """Where the CSI node service may act."""

    kubelet_dir: Path = Path("/var/lib/kubelet")
    """Publish and unpublish act only on target paths under this directory."""


PACED = -1
"""``[scrub] bytes_per_s`` left to ``interval_s``."""


@dataclass(frozen=True)
class ScrubConfig:
    """The continuous re-check of everything the store holds (``weightcache node``)."""

    enabled: bool = True
    interval_s: float = 24 * 3600.0
    """One full pass over everything held per this many seconds, at the lowest rate that meets
    it: each pass reads at (bytes the pass will check) / interval_s, set again when a pass
    starts, so the disk sees a trickle (2 TB held: 23 MB/s) rather than a stream. 0: no
    pacing, as fast as the disk allows."""
    bytes_per_s: int = PACED
    """A fixed read rate instead of ``interval_s``'s; 0: as fast as the disk allows; -1 (the
    default): paced by ``interval_s``."""
    idle_s: float = 60.0
    """Wait before the next pass when the store holds nothing to check."""


SIGNING_MODES = ("require", "warn", "off")


@dataclass(frozen=True)
class SigningRule:
    """Which signatures the models a rule matches must carry."""

    models: tuple[str, ...] = ()
    """fnmatch patterns over the canonical reference (``*`` also matches ``/``)."""
    mode: str = "off"
    """``require``: unsigned or invalid is never cached or mounted; ``warn``: cached and
    marked; ``off``: not checked."""
    public_keys: tuple[Path, ...] = ()
    """PEM public keys (elliptic curve) trusted for OMS ``model.sig`` and cosign signatures."""
    certificate_chains: tuple[Path, ...] = ()
    """PEM certificate files (roots and intermediates) trusted for OMS certificate
    signatures."""


@dataclass(frozen=True)
class SigningConfig:
    """Model signatures: the first rule matching the canonical reference decides; with no
    matching rule a model is not checked (``off``)."""

    rules: tuple[SigningRule, ...] = ()


@dataclass(frozen=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    csi: CsiConfig = field(default_factory=CsiConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)


def _build(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown setting(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        spec = known[name]
        if spec.default is not MISSING:
            default = spec.default
        elif spec.default_factory is not MISSING:
            default = spec.default_factory()
        else:
            default = ""  # a required string field
        try:
            kwargs[name] = _coerce(default, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{where}] {name}: {exc}") from exc
    return cls(**kwargs)


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if isinstance(default, Path) or default is None:
        if not isinstance(value, str):
            raise TypeError(f"expected a path string, got {value!r}")
        return Path(value)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return tuple(value)
    raise TypeError(f"unsupported value {value!r}")


def parse_config(data: Mapping[str, Any]) -> Config:
    """Build a validated :class:`Config` from a parsed TOML document."""
    unknown = set(data) - {
        "store",
        "fetch",
        "registry",
        "policy",
        "warm",
        "scrub",
        "csi",
        "signing",
    }
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}")
    store = _build(StoreConfig, data.get("store", {}), "store")
    fetch = _build(FetchConfig, data.get("fetch", {}), "fetch")
    reg = dict(data.get("registry", {}))
    mirrors_raw = reg.pop("mirrors", {})
    aliases_raw = reg.pop("aliases", {})
    registry = _build(RegistryConfig, reg, "registry")
    mirrors: dict[str, tuple[Mirror, ...]] = {}
    for host, entries in mirrors_raw.items():
        if not isinstance(entries, list):
            raise ConfigError(f"[registry.mirrors] {host}: expected a list of mirrors")
        built = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"url": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise ConfigError(f"[registry.mirrors] {host}[{i}]: expected {{url = ...}}")
            built.append(_build(Mirror, entry, f"registry.mirrors.{host}[{i}]"))
        mirrors[host] = tuple(built)
    registry = replace(registry, mirrors=mirrors, aliases=_aliases(aliases_raw))
    config = Config(
        store=store,
        fetch=fetch,
        registry=registry,
        policy=_policy(data.get("policy", {})),
        warm=_build(WarmConfig, data.get("warm", {}), "warm"),
        scrub=_build(ScrubConfig, data.get("scrub", {}), "scrub"),
        csi=_build(CsiConfig, data.get("csi", {}), "csi"),
        signing=_signing(data.get("signing", {})),
    )
    validate(config)
    return config


def _policy(data: Mapping[str, Any]) -> PolicyConfig:
    raw = dict(data)
    rules_raw = raw.pop("rules", [])
    base: PolicyConfig = _build(PolicyConfig, raw, "policy")
    if not isinstance(rules_raw, list):
        raise ConfigError("[policy] rules: expected [[policy.rules]] tables")
    rules = []
    for i, entry in enumerate(rules_raw):
        where = f"policy.rules[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"[{where}]: expected a table")
        rule = _build(PolicyRule, entry, where)
        if not rule.models or not rule.namespaces:
            raise ConfigError(f"[{where}]: models and namespaces must each list a pattern")
        for value in (*rule.models, *rule.namespaces):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"[{where}]: patterns must be non-empty strings")
        rules.append(rule)
    roots: list[Path] = []
    for root in base.file_roots:  # the list as written: strings, until checked here
        text: object = root
        if not isinstance(text, str) or not text.startswith("/"):
            raise ConfigError(f"[policy] file_roots: {text!r} is not an absolute path")
        roots.append(Path(text))
    return replace(base, rules=tuple(rules), file_roots=tuple(roots))


def _signing(data: Any) -> SigningConfig:
    if not isinstance(data, dict):
        raise ConfigError("[signing]: expected a table")
    raw = dict(data)
    rules_raw = raw.pop("rules", [])
    _build(SigningConfig, raw, "signing")  # refuses unknown settings
    if not isinstance(rules_raw, list):
        raise ConfigError("[signing] rules: expected [[signing.rules]] tables")
    rules = []
    for i, entry in enumerate(rules_raw):
        where = f"signing.rules[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"[{where}]: expected a table")
        rule: SigningRule = _build(SigningRule, entry, where)
        if not rule.models or not all(isinstance(m, str) and m for m in rule.models):
            raise ConfigError(f"[{where}]: models must list non-empty patterns")
        if rule.mode not in SIGNING_MODES:
            raise ConfigError(
                f"[{where}] mode must be one of {', '.join(SIGNING_MODES)}, not {rule.mode!r}"
            )
        paths: dict[str, tuple[Path, ...]] = {}
        for name in ("public_keys", "certificate_chains"):
            checked = []
            for item in getattr(rule, name):  # the list as written: strings, until checked
                text: object = item
                if not isinstance(text, str) or not text.startswith("/"):
                    raise ConfigError(f"[{where}] {name}: {text!r} is not an absolute path")
                checked.append(Path(text))
            paths[name] = tuple(checked)
        rule = replace(
            rule, public_keys=paths["public_keys"], certificate_chains=paths["certificate_chains"]
        )
        if rule.mode != "off" and not (rule.public_keys or rule.certificate_chains):
            raise ConfigError(
                f"[{where}]: mode {rule.mode!r} needs public_keys or certificate_chains to trust"
            )
        rules.append(rule)
    return SigningConfig(rules=tuple(rules))


def _aliases(data: Any) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ConfigError('[registry.aliases]: expected a table of "alias" = "registry"')
    out = {}
    for alias, target in data.items():
        if not isinstance(target, str):
            raise ConfigError(f"[registry.aliases] {alias}: expected a registry host string")
        try:
            out[canonical_registry(alias)] = canonical_registry(target)
        except InvalidReference as exc:
            raise ConfigError(f"[registry.aliases] {alias}: {exc}") from exc
    return out


def validate(config: Config) -> None:
    s, f = config.store, config.fetch
    if not 0 < s.low_watermark <= s.high_watermark <= 1:
        raise ConfigError("[store] need 0 < low_watermark <= high_watermark <= 1")
    if s.partial_max_age_s < 0:
        raise ConfigError("[store] partial_max_age_s must not be negative")
    if s.budget_bytes < 0 or s.quarantine_bytes < 0 or s.reserve_bytes < 0:
        raise ConfigError("[store] byte sizes must not be negative")
    if not 0 <= s.reserve_fraction < 1:
        raise ConfigError("[store] reserve_fraction must be at least 0 and less than 1")
    if f.files_in_parallel < 1 or f.ranges_per_file < 1:
        raise ConfigError("[fetch] files_in_parallel and ranges_per_file must be at least 1")
    if f.part_bytes < 1024 * 1024 or f.part_bytes % 4096:
        raise ConfigError("[fetch] part_bytes must be at least 1 MiB and a multiple of 4096")
    if f.bandwidth_bytes_per_s < 0 or f.timeout_s <= 0:
        raise ConfigError("[fetch] bandwidth must not be negative; timeout must be positive")
    if any(d < 0 for d in f.retry_delays):
        raise ConfigError("[fetch] retry_delays must not be negative")
    if f.stall_bytes_per_s < 0 or f.stall_window_s <= 0 or f.request_deadline_s <= 0:
        raise ConfigError(
            "[fetch] stall_bytes_per_s must not be negative; stall_window_s and "
            "request_deadline_s must be positive"
        )
    if f.max_layer_members < 1:
        raise ConfigError("[fetch] max_layer_members must be at least 1")
    p = config.policy
    if p.default not in ("allow", "deny"):
        raise ConfigError(f"[policy] default must be allow or deny, not {p.default!r}")
    if p.credential_cache_s < 0:
        raise ConfigError("[policy] credential_cache_s must not be negative")
    w = config.warm
    if w.watch_timeout_s < 1 or w.request_timeout_s <= 0 or w.resync_s <= 0:
        raise ConfigError("[warm] timeouts and resync_s must be positive")
    if not w.reconnect_delays or any(d < 0 for d in w.reconnect_delays):
        raise ConfigError("[warm] reconnect_delays must list non-negative delays")
    if w.retry_failed_s < 0:
        raise ConfigError("[warm] retry_failed_s must not be negative")
    if w.namespace_bytes < 0 or w.refs_per_workload < 1 or w.labels_per_node < 1:
        raise ConfigError(
            "[warm] namespace_bytes must not be negative; refs_per_workload and "
            "labels_per_node must be at least 1"
        )
    if w.idle_pin_s < 0:
        raise ConfigError("[warm] idle_pin_s must not be negative")
    if not config.csi.kubelet_dir.is_absolute():
        raise ConfigError("[csi] kubelet_dir must be an absolute path")
    if config.scrub.bytes_per_s < PACED or config.scrub.idle_s <= 0:
        raise ConfigError(
            "[scrub] bytes_per_s must be -1 (paced by interval_s), 0 (unlimited) or a rate; "
            "idle_s must be positive"
        )
    if config.scrub.interval_s < 0:
        raise ConfigError("[scrub] interval_s must not be negative")


def load_config(path: Path | None, **store_overrides: Any) -> Config:
    """Read ``path`` (TOML) if given, then apply command-line overrides to [store]."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    config = parse_config(data)
    overrides = {k: v for k, v in store_overrides.items() if v is not None}
    if overrides:
        store = StoreConfig(**{**config.store.__dict__, **overrides})
        config = replace(config, store=store)
        validate(config)
    return config
