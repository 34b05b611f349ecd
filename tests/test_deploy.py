"""The manifests in deploy/ agree with the code: CLI flags, config fields, references, contracts.

Every YAML file is parsed; the containers' arguments go through the real argument parser, the
ConfigMap through the real config parser and every model reference through the real reference
parser, so a manifest cannot drift from the code it runs.
"""

from __future__ import annotations

import argparse
import posixpath
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml

from weightcache.app.cli import build_parser
from weightcache.daemon.config import ConfigError, parse_config
from weightcache.daemon.kube.naming import label_key
from weightcache.daemon.references import parse_reference

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
DRIVER = "csi.weightcache.io"
WARM_ANNOTATION = "weightcache.io/warm"
NODE_IMAGE = "ghcr.io/weightcache/weightcache"
POD_OWNERS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"}

Doc = dict[str, Any]


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _load(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: a document is not a mapping"
    return docs


def _objects() -> Iterator[tuple[Path, Doc]]:
    for path in _yaml_files():
        if path.name == "kustomization.yaml":
            continue
        for doc in _load(path):
            yield path, doc


def _one(kind: str, name: str) -> tuple[Path, Doc]:
    found = [(p, d) for p, d in _objects() if d.get("kind") == kind and _name(d) == name]
    assert len(found) == 1, f"expected exactly one {kind} {name!r} under deploy/, found {found}"
    return found[0]


def _name(doc: Doc) -> str | None:
    name = (doc.get("metadata") or {}).get("name")
    return name if isinstance(name, str) else None


def _pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") == "Pod":
        spec = doc.get("spec")
    elif doc.get("kind") in POD_OWNERS:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
    else:
        return None
    return spec if isinstance(spec, dict) else None


def _containers(spec: Doc) -> list[Doc]:
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def _container(path: Path, spec: Doc, name: str) -> Doc:
    found = [c for c in _containers(spec) if c.get("name") == name]
    assert len(found) == 1, f"{_rel(path)}: expected one container named {name!r}"
    return found[0]


def _flag(path: Path, container: Doc, flag: str) -> str:
    prefix = f"--{flag}="
    values = [a[len(prefix) :] for a in container.get("args", []) if a.startswith(prefix)]
    assert len(values) == 1, f"{_rel(path)}: {container['name']} needs exactly one {prefix}..."
    return str(values[0])


def _volume(path: Path, spec: Doc, name: str) -> Doc:
    found = [v for v in spec.get("volumes", []) if v.get("name") == name]
    assert len(found) == 1, f"{_rel(path)}: expected one volume named {name!r}"
    return found[0]


def _host_path_of(path: Path, spec: Doc, container: Doc, file_in_container: str) -> str:
    """Where a file inside the container lives on the host, through a hostPath mount."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if file_in_container.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{_rel(path)}: nothing in {container['name']} mounts {file_in_container}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    host = _volume(path, spec, mount["name"]).get("hostPath", {}).get("path")
    assert host, f"{_rel(path)}: volume {mount['name']!r} is not a hostPath"
    return posixpath.join(host, posixpath.relpath(file_in_container, mount["mountPath"]))


def _parse_cli(path: Path, container: Doc) -> argparse.Namespace:
    args = [str(a).replace("$(NODE_NAME)", "node-1") for a in container.get("args", [])]
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{_rel(path)}: {container['name']} args {args} do not parse: exit {exc}")


def _csi_endpoint_path(endpoint: str) -> str:
    assert endpoint.startswith("unix:///"), f"CSI endpoint {endpoint!r} is not unix:///PATH"
    return endpoint[len("unix://") :]


# -- kustomization and object shape ------------------------------------------------------------


def test_kustomization_lists_every_base_file_and_nothing_else() -> None:
    kustomization = _load(DEPLOY / "kustomization.yaml")[0]
    listed = set(kustomization.get("resources", []))
    for generator in kustomization.get("configMapGenerator", []):
        listed |= {f.split("=", 1)[-1] for f in generator.get("files", [])}
    present = {
        p.name
        for p in DEPLOY.iterdir()
        if p.is_file() and p.name not in ("README.md", "kustomization.yaml")
    }
    assert present - listed == set(), (
        f"deploy/kustomization.yaml does not list {sorted(present - listed)}"
    )
    assert listed - present == set(), (
        f"deploy/kustomization.yaml lists missing files {sorted(listed - present)}"
    )
    assert kustomization.get("namespace") == "weightcache", "deploy/kustomization.yaml: namespace"
    images = {i.get("name") for i in kustomization.get("images", [])}
    assert NODE_IMAGE in images, f"deploy/kustomization.yaml: no images: entry for {NODE_IMAGE}"


def test_every_object_has_api_version_kind_and_name() -> None:
    files = _yaml_files()
    assert files, "no YAML under deploy/"
    for path in files:
        docs = _load(path)
        assert docs, f"{_rel(path)} holds no document"
        for doc in docs:
            for key in ("apiVersion", "kind"):
                assert doc.get(key), f"{_rel(path)}: a document has no {key}"
            if path.name != "kustomization.yaml":
                assert _name(doc), f"{_rel(path)}: a {doc['kind']} has no metadata.name"


def test_base_objects_are_in_the_weightcache_namespace() -> None:
    cluster_scoped = {
        "Namespace",
        "CSIDriver",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "PriorityClass",
    }
    for path, doc in _objects():
        if path.parent != DEPLOY or doc["kind"] in cluster_scoped:
            continue
        namespace = doc["metadata"].get("namespace")
        assert namespace == "weightcache", f"{_rel(path)}: {doc['kind']} in {namespace!r}"


def test_csidriver() -> None:
    path, doc = _one("CSIDriver", DRIVER)
    spec = doc["spec"]
    expected = {
        "attachRequired": False,
        "podInfoOnMount": True,
        "fsGroupPolicy": "None",
        "requiresRepublish": False,
    }
    for key, value in expected.items():
        assert spec.get(key) == value, f"{_rel(path)}: spec.{key} is {spec.get(key)!r}"
    modes = sorted(spec.get("volumeLifecycleModes", []))
    assert modes == ["Ephemeral", "Persistent"], f"{_rel(path)}: volumeLifecycleModes {modes}"


# -- the node DaemonSet -----------------------------------------------------------------------


def _node() -> tuple[Path, Doc, Doc]:
    path, doc = _one("DaemonSet", "weightcache-node")
    spec = _pod_spec(doc)
    assert spec is not None, f"{_rel(path)}: no pod template"
    return path, spec, _container(path, spec, "weightcache")


def test_node_args_parse_with_the_cli() -> None:
    path, spec, container = _node()
    args = _parse_cli(path, container)
    assert args.command == "node", f"{_rel(path)}: weightcache runs {args.command!r}, not node"
    assert args.node_name == "node-1", f"{_rel(path)}: --node-name is not $(NODE_NAME)"
    env = {e["name"]: e for e in container.get("env", [])}
    field = env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    assert field == "spec.nodeName", f"{_rel(path)}: NODE_NAME is not from spec.nodeName"
    assert spec.get("serviceAccountName") == "weightcache-node", f"{_rel(path)}: serviceAccount"


def test_node_store_and_config_are_mounted() -> None:
    path, spec, container = _node()
    args = _parse_cli(path, container)
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    store = mounts.get(args.store)
    assert store, f"{_rel(path)}: --store {args.store} is not a volume mount"
    host = _volume(path, spec, store["name"]).get("hostPath", {})
    assert host.get("path"), f"{_rel(path)}: the store is not a hostPath"
    config_dir = posixpath.dirname(args.config)
    config = mounts.get(config_dir)
    assert config, f"{_rel(path)}: --config {args.config} is not under a volume mount"
    source = _volume(path, spec, config["name"]).get("configMap", {})
    assert source.get("name") == "weightcache-config", f"{_rel(path)}: config volume source"
    _config_generator()


def test_node_registrar_points_the_kubelet_at_the_agent_socket() -> None:
    path, spec, container = _node()
    socket = _csi_endpoint_path(_parse_cli(path, container).csi_endpoint)
    on_host = _host_path_of(path, spec, container, socket)
    registrar = _container(path, spec, "node-driver-registrar")
    registration = _flag(path, registrar, "kubelet-registration-path")
    assert registration == on_host, (
        f"{_rel(path)}: --kubelet-registration-path {registration} but the agent's socket "
        f"is {on_host} on the host"
    )
    assert _host_path_of(path, spec, registrar, _flag(path, registrar, "csi-address")) == on_host
    probe = _container(path, spec, "livenessprobe")
    assert _host_path_of(path, spec, probe, _flag(path, probe, "csi-address")) == on_host, (
        f"{_rel(path)}: livenessprobe --csi-address is not the agent's socket"
    )


def test_node_liveness_probe_is_served_by_the_sidecar() -> None:
    path, spec, container = _node()
    probe = container.get("livenessProbe", {}).get("httpGet", {})
    assert probe.get("path") == "/healthz", f"{_rel(path)}: livenessProbe path"
    port = probe.get("port")
    if isinstance(port, str):
        named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert port in named, f"{_rel(path)}: livenessProbe port {port!r} is not declared"
        port = named[port]
    sidecar = _container(path, spec, "livenessprobe")
    health_port = int(_flag(path, sidecar, "health-port"))
    assert port == health_port, f"{_rel(path)}: probe port {port}, sidecar serves {health_port}"


def test_node_metrics_port_matches_the_metrics_address() -> None:
    path, _, container = _node()
    address = _parse_cli(path, container).metrics_address
    port = int(address.rsplit(":", 1)[1])
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    assert ports.get("metrics") == port, f"{_rel(path)}: metrics port is not {port}"


def test_node_mounts_pods_bidirectionally_and_is_privileged() -> None:
    path, spec, container = _node()
    pods = [
        m
        for m in container.get("volumeMounts", [])
        if _volume(path, spec, m["name"]).get("hostPath", {}).get("path") == "/var/lib/kubelet/pods"
    ]
    assert len(pods) == 1, f"{_rel(path)}: weightcache does not mount /var/lib/kubelet/pods"
    assert pods[0].get("mountPropagation") == "Bidirectional", (
        f"{_rel(path)}: the kubelet pods dir needs mountPropagation: Bidirectional"
    )
    privileged = container.get("securityContext", {}).get("privileged")
    assert privileged is True, f"{_rel(path)}: weightcache must be privileged to bind-mount"


def test_node_memory_limit_leaves_room_for_a_fetch() -> None:
    path, _, container = _node()
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        return
    units = {"Mi": 1024**2, "Gi": 1024**3}
    number, unit = limit[:-2], limit[-2:]
    assert unit in units, f"{_rel(path)}: memory limit {limit!r} not in Mi or Gi"
    assert int(number) * units[unit] >= 1024**3, f"{_rel(path)}: memory limit {limit} < 1Gi"


# -- the controller Deployment ----------------------------------------------------------------


def test_controller_args_parse_with_the_cli_and_share_the_socket() -> None:
    path, doc = _one("Deployment", "weightcache-controller")
    spec = _pod_spec(doc)
    assert spec is not None, f"{_rel(path)}: no pod template"
    container = _container(path, spec, "weightcache")
    args = _parse_cli(path, container)
    assert args.command == "controller", f"{_rel(path)}: runs {args.command!r}, not controller"
    socket = _csi_endpoint_path(args.csi_endpoint)
    provisioner = _container(path, spec, "csi-provisioner")
    assert _flag(path, provisioner, "csi-address") == socket, (
        f"{_rel(path)}: csi-provisioner --csi-address is not {socket}"
    )

    def socket_volume(c: Doc) -> str:
        mounts = [m for m in c.get("volumeMounts", []) if socket.startswith(m["mountPath"] + "/")]
        assert len(mounts) == 1, f"{_rel(path)}: {c['name']} does not mount the socket dir"
        return str(mounts[0]["name"])

    assert socket_volume(container) == socket_volume(provisioner), (
        f"{_rel(path)}: weightcache and csi-provisioner mount different socket dirs"
    )
    flags = set(provisioner.get("args", []))
    for flag in ("--leader-election", "--extra-create-metadata"):
        assert flag in flags, f"{_rel(path)}: csi-provisioner needs {flag}"
    if doc["spec"].get("replicas", 1) > 1:
        assert "--leader-election" in flags, f"{_rel(path)}: replicas > 1 without leader election"


# -- RBAC -------------------------------------------------------------------------------------


def _rules(doc: Doc) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in doc.get("rules", [])
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def test_node_cluster_role_is_exactly_least_privilege() -> None:
    path, doc = _one("ClusterRole", "weightcache-node")
    expected = {
        ("apps", "deployments", "list"),
        ("apps", "deployments", "watch"),
        ("apps", "statefulsets", "list"),
        ("apps", "statefulsets", "watch"),
        ("", "nodes", "get"),
        ("", "nodes", "watch"),
        ("", "nodes", "patch"),
        ("", "events", "create"),
        ("", "events", "patch"),
    }
    got = _rules(doc)
    assert got == expected, (
        f"{_rel(path)}: extra {sorted(got - expected)}, missing {sorted(expected - got)}"
    )
    for rule in doc.get("rules", []):
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"{_rel(path)}: {rule}"


@pytest.mark.parametrize(
    ("sa", "role_kind", "role"),
    [
        ("weightcache-node", "ClusterRole", "weightcache-node"),
        ("weightcache-controller", "ClusterRole", "weightcache-controller"),
        ("weightcache-controller", "Role", "weightcache-controller-leader-election"),
    ],
)
def test_service_accounts_are_bound(sa: str, role_kind: str, role: str) -> None:
    _one("ServiceAccount", sa)
    _one(role_kind, role)
    binding_kind = "ClusterRoleBinding" if role_kind == "ClusterRole" else "RoleBinding"
    bindings = [
        (p, d)
        for p, d in _objects()
        if d.get("kind") == binding_kind
        and d.get("roleRef", {}).get("name") == role
        and d.get("roleRef", {}).get("kind") == role_kind
    ]
    assert bindings, f"no {binding_kind} for {role_kind} {role}"
    subjects = [
        (s.get("kind"), s.get("name"), s.get("namespace"))
        for _, d in bindings
        for s in d.get("subjects", [])
    ]
    assert ("ServiceAccount", sa, "weightcache") in subjects, (
        f"{_rel(bindings[0][0])}: {role} is not bound to weightcache/{sa}"
    )


# -- images -----------------------------------------------------------------------------------


def test_every_image_is_pinned() -> None:
    seen = 0
    for path, doc in _objects():
        spec = _pod_spec(doc)
        if spec is None:
            continue
        for container in _containers(spec):
            image = str(container.get("image", ""))
            seen += 1
            name, at, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            tag = last.partition(":")[2]
            assert image, f"{_rel(path)}: container {container.get('name')} has no image"
            if at:
                assert digest.startswith("sha256:"), f"{_rel(path)}: {image} bad digest"
                continue
            assert tag, f"{_rel(path)}: image {image} is not pinned to a tag"
            assert tag != "latest", f"{_rel(path)}: image {image} uses :latest"
    assert seen, "no containers found under deploy/"


# -- configuration ----------------------------------------------------------------------------


def _config_generator() -> Doc:
    kustomization = _load(DEPLOY / "kustomization.yaml")[0]
    (generator,) = [
        g
        for g in kustomization.get("configMapGenerator", [])
        if g.get("name") == "weightcache-config"
    ]
    return generator


def _config_toml() -> tuple[Path, dict[str, Any]]:
    assert _config_generator()["files"] == ["config.toml"]
    path = DEPLOY / "config.toml"
    text = path.read_text()
    try:
        return path, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{_rel(path)}: config.toml is not valid TOML: {exc}")


def test_configmap_parses_with_the_config_parser() -> None:
    path, data = _config_toml()
    try:
        parse_config(data)
    except ConfigError as exc:
        # [policy] is being added to the parser; until it knows the section, parse the rest
        # without it. Once it does, any error inside [policy] fails here.
        if not ("unknown section" in str(exc) and "policy" in str(exc) and "policy" in data):
            pytest.fail(f"{_rel(path)}: config.toml: {exc}")
        rest = {k: v for k, v in data.items() if k != "policy"}
        try:
            parse_config(rest)
        except ConfigError as again:
            pytest.fail(f"{_rel(path)}: config.toml: {again}")


def test_configmap_policy_has_the_agreed_shape() -> None:
    path, data = _config_toml()
    policy = data.get("policy")
    assert isinstance(policy, dict), f"{_rel(path)}: config.toml has no [policy]"
    assert set(policy) <= {"default", "credential_cache_s", "rules"}, f"{_rel(path)}: [policy]"
    assert policy.get("default") in ("allow", "deny"), f"{_rel(path)}: [policy] default"
    for i, rule in enumerate(policy.get("rules", [])):
        where = f"{_rel(path)}: [[policy.rules]] #{i}"
        assert set(rule) <= {"models", "namespaces", "require_pull_secret"}, where
        assert all(isinstance(m, str) for m in rule.get("models", [])), where
        assert all(isinstance(n, str) for n in rule.get("namespaces", [])), where
        assert isinstance(rule.get("require_pull_secret", False), bool), where


# -- examples ---------------------------------------------------------------------------------


def _csi_volumes(doc: Doc) -> list[tuple[str, Doc]]:
    """(driver, attributes) of every CSI volume an example declares."""
    found: list[tuple[str, Doc]] = []
    kind = doc.get("kind")
    if kind == "PersistentVolume" and "csi" in doc.get("spec", {}):
        csi = doc["spec"]["csi"]
        found.append((csi.get("driver", ""), csi.get("volumeAttributes", {})))
    elif kind == "StorageClass":
        params = {
            k: v
            for k, v in (doc.get("parameters") or {}).items()
            if not k.startswith("csi.storage.k8s.io/")  # consumed by the provisioner
        }
        found.append((doc.get("provisioner", ""), params))
    spec = _pod_spec(doc)
    for volume in (spec or {}).get("volumes", []):
        if "csi" in volume:
            csi = volume["csi"]
            found.append((csi.get("driver", ""), csi.get("volumeAttributes", {})))
    return found


def test_examples_use_the_driver_and_valid_attributes() -> None:
    checked = 0
    for path, doc in _objects():
        if path.parent != EXAMPLES:
            continue
        for driver, attrs in _csi_volumes(doc):
            checked += 1
            where = f"{_rel(path)}: {doc['kind']} {_name(doc)}"
            assert driver == DRIVER, f"{where}: driver {driver!r}"
            assert set(attrs) <= {"model", "verify", "fetch"}, f"{where}: attributes {attrs}"
            assert attrs.get("verify", "fast") in ("fast", "full"), f"{where}: verify"
            assert attrs.get("fetch", "IfNotCached") in ("IfNotCached", "CachedOnly"), where
            assert "model" in attrs, f"{where}: no model"
            parse_reference(attrs["model"])
    assert checked >= 4, f"expected CSI volumes in the examples, found {checked}"


def test_every_volume_kind_has_an_example() -> None:
    kinds = set()
    for path, doc in _objects():
        if path.parent != EXAMPLES:
            continue
        for _ in _csi_volumes(doc):
            kinds.add("inline" if _pod_spec(doc) is not None else doc["kind"])
    assert kinds == {"inline", "PersistentVolume", "StorageClass"}, (
        f"deploy/examples/ covers {sorted(kinds)}"
    )


def test_warm_deployment_annotation_and_mount() -> None:
    path = EXAMPLES / "warm-deployment.yaml"
    deployments = [d for d in _load(path) if d.get("kind") == "Deployment"]
    assert len(deployments) == 1, f"{_rel(path)}: expected one Deployment"
    doc = deployments[0]
    annotations = doc["metadata"].get("annotations", {})
    warm_keys = [k for k in annotations if "warm" in k]
    assert warm_keys == [WARM_ANNOTATION], f"{_rel(path)}: warm annotation keys {warm_keys}"
    refs = [r.strip() for r in annotations[WARM_ANNOTATION].split(",")]
    for ref in refs:
        parse_reference(ref)
    mounted = {attrs.get("model") for _, attrs in _csi_volumes(doc)}
    assert mounted and mounted <= set(refs), (
        f"{_rel(path)}: mounts {sorted(map(str, mounted))} but warms {refs}"
    )
    spec = _pod_spec(doc) or {}
    preferred = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("preferredDuringSchedulingIgnoredDuringExecution", [])
    )
    assert preferred, f"{_rel(path)}: no preferred node affinity on the warm label"
    keys = {e["key"] for p in preferred for e in p["preference"].get("matchExpressions", [])}
    expected = {label_key(parse_reference(r)) for r in refs}
    assert keys == expected, f"{_rel(path)}: affinity on {keys}, the node labels are {expected}"


# -- schemas, admission and placement -----------------------------------------------------------

KUBE_VERSION = "1.34"
"""The Kubernetes release the manifests are validated against (kubernetes-validate's schemas)."""
NODE_SA = "system:serviceaccount:weightcache:weightcache-node"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"


def test_every_object_validates_against_the_kubernetes_schemas() -> None:
    checked = 0
    for path, doc in _objects():
        if doc.get("kind") == "Component":
            continue  # a kustomize component, not an API object
        if str(doc.get("apiVersion", "")).startswith(f"{MONITORING_GROUP}/"):
            continue  # Prometheus Operator CRDs: checked by shape below
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_rel(path)}: {doc.get('kind')} {_name(doc)}: {exc.message}")
        checked += 1
    assert checked >= 10


MONITORING_GROUP = "monitoring.coreos.com"


def test_monitoring_objects_scrape_the_node_agents_metrics_port() -> None:
    _, daemonset = _one("DaemonSet", "weightcache-node")
    path, _, container = _node()
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert "metrics" in ports, f"{_rel(path)}: no container port named metrics"
    service_path, service = _one("Service", "weightcache-node-metrics")
    assert service["spec"].get("clusterIP") == "None", f"{_rel(service_path)}: not headless"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"
    kinds = {"PodMonitor": "podMetricsEndpoints", "ServiceMonitor": "endpoints"}
    for kind, endpoints_key in kinds.items():
        monitor_path, monitor = _one(kind, "weightcache-node")
        where = _rel(monitor_path)
        assert monitor["apiVersion"] == f"{MONITORING_GROUP}/v1", where
        selected = pod_labels if kind == "PodMonitor" else service["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= selected.items(), where
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["weightcache"], where
        (endpoint,) = monitor["spec"][endpoints_key]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics", where
        relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert relabel["node"] == ["__meta_kubernetes_pod_node_name"], where
    rule_path, rule = _one("PrometheusRule", "weightcache")
    assert rule["apiVersion"] == f"{MONITORING_GROUP}/v1", _rel(rule_path)
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts and all(r["expr"] and r["labels"]["severity"] for r in alerts)
    # The agent logs JSON, and a rolling update waits for its own readiness.
    assert _parse_cli(path, container).log_format == "json", f"{_rel(path)}: --log-format"
    ready = container.get("readinessProbe", {}).get("httpGet", {})
    assert ready.get("path") == "/readyz" and ready.get("port") == "metrics", _rel(path)


def _admission_verdict(user: str, claim: str | None, old: Doc, new: Doc) -> str:
    """Evaluate the shipped ValidatingAdmissionPolicy's CEL for one node update, the way the
    API server does: match conditions, then variables, then each validation in order."""
    _, policy = _one("ValidatingAdmissionPolicy", "weightcache-node-labels")
    env = celpy.Environment()

    def evaluate(expression: str, activation: dict[str, Any]) -> Any:
        return env.program(env.compile(expression)).evaluate(activation)

    user_info: Doc = {"username": user}
    if claim is not None:
        user_info["extra"] = {NODE_NAME_CLAIM: [claim]}
    activation: dict[str, Any] = {
        "request": celpy.json_to_cel({"userInfo": user_info}),
        "object": celpy.json_to_cel(new),
        "oldObject": celpy.json_to_cel(old),
    }
    if not all(evaluate(m["expression"], activation) for m in policy["spec"]["matchConditions"]):
        return "not matched"
    activation["variables"] = celpy.celtypes.MapType(
        {
            celpy.celtypes.StringType(v["name"]): evaluate(v["expression"], activation)
            for v in policy["spec"]["variables"]
        }
    )
    for validation in policy["spec"]["validations"]:
        if not evaluate(validation["expression"], activation):
            return str(validation["message"])
    return "allowed"


def _node_object(**labels: str) -> Doc:
    return {
        "metadata": {"name": "gpu-1", "labels": {"kubernetes.io/hostname": "gpu-1", **labels}},
        "spec": {"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
        "status": {"capacity": {"cpu": "64"}},
    }


def test_admission_lets_the_agent_change_only_warm_labels_of_its_own_node() -> None:
    old = _node_object(**{"warm.weightcache.io/aaa": "true", "team": "a"})
    swapped = _node_object(**{"warm.weightcache.io/bbb": "true", "team": "a"})
    relabelled = _node_object(**{"warm.weightcache.io/aaa": "true", "team": "b"})
    dropped = _node_object(**{"warm.weightcache.io/aaa": "true"})
    untainted = _node_object(**{"warm.weightcache.io/aaa": "true", "team": "a"})
    untainted["spec"] = {"taints": []}
    annotated = _node_object(**{"warm.weightcache.io/aaa": "true", "team": "a"})
    annotated["metadata"]["annotations"] = {"x": "y"}
    own_labels = "allowed"
    other_node = "weightcache's node agent may change only the Node its pod runs on"
    not_labels = "weightcache's node agent may change only warm.weightcache.io/ labels"
    cases = [
        (NODE_SA, "gpu-1", swapped, own_labels),
        (NODE_SA, "gpu-2", swapped, other_node),
        (NODE_SA, None, swapped, other_node),
        (NODE_SA, "gpu-1", relabelled, not_labels),
        (NODE_SA, "gpu-1", dropped, not_labels),
        (NODE_SA, "gpu-1", untainted, not_labels),
        (NODE_SA, "gpu-1", annotated, not_labels),
        ("system:node:gpu-1", None, relabelled, "not matched"),
    ]
    for user, claim, new, verdict in cases:
        assert _admission_verdict(user, claim, old, new) == verdict, (user, claim, new)
    _, binding = _one("ValidatingAdmissionPolicyBinding", "weightcache-node-labels")
    assert binding["spec"] == {
        "policyName": "weightcache-node-labels",
        "validationActions": ["Deny"],
    }
    kustomization = _load(DEPLOY / "kustomization.yaml")[0]
    namespace, name = NODE_SA.split(":")[2:]
    assert kustomization["namespace"] == namespace
    _one("ServiceAccount", name)


def _required_terms(daemonset: Doc) -> list[Doc]:
    affinity = daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms: list[Doc] = affinity["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return terms


def test_the_daemonset_runs_on_gpu_nodes_only_and_never_on_the_control_plane() -> None:
    _, daemonset = _one("DaemonSet", "weightcache-node")
    not_control_plane = {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}
    terms = _required_terms(daemonset)
    assert terms
    for term in terms:
        expressions = term["matchExpressions"]
        assert not_control_plane in expressions
        gpu = [e for e in expressions if e != not_control_plane]
        assert len(gpu) == 1 and gpu[0]["operator"] == "In" and gpu[0]["values"] == ["true"]
        assert "gpu" in gpu[0]["key"] or "pci-" in gpu[0]["key"]
    # The component for every worker node keeps the control plane out.
    component = _load(DEPLOY / "components" / "all-nodes" / "kustomization.yaml")[0]
    assert component["kind"] == "Component"
    (patch,) = component["patches"]
    assert patch["target"] == {"kind": "DaemonSet", "name": "weightcache-node"}
    (op,) = yaml.safe_load(patch["patch"])
    assert op["op"] == "replace"
    path = op["path"].strip("/").split("/")
    target: Any = daemonset
    for part in path:  # the path must exist in the base for a replace to apply
        target = target[part]
    assert op["value"] == [{"matchExpressions": [not_control_plane]}]
