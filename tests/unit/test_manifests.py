"""manifests/: what a platform team applies, checked offline against the code it deploys.

Every flag, environment variable and ConfigMap key goes through the real config loaders of ztd and zt-bridge
(a renamed flag fails here), the RBAC is pinned rule by rule and tied to what xds_server/registry/kube.py
lists and watches, and the values both sides must agree on (ports, names, accounts, audiences, mount paths)
are cross-checked. tests/kube/test_manifests_apply.py applies the same files to a real API server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import pytest
import yaml

from ipsec_bridge.admin import Admin
from ipsec_bridge.main import BridgeConfig
from sds.ca.kubesecret import SECRET_NAMES
from sds.ca.rootconfigmap import ROOT_CONFIGMAP, ROOT_CONFIGMAP_KEY
from tests.helpers import running_ztd
from xds_server.main import ISTIOD_DNS_NAMES, ZtdConfig
from xds_server.registry.kube import IN_CLUSTER, KINDS
from ztcore import config
from ztcore.lease import LEASE_NAME
from ztcore.metrics import Registry as MetricsRegistry

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
NAMESPACE = "istio-system"
T = TypeVar("T")

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

# Everything the folder holds, by (kind, name). A new object is a deliberate edit here.
EXPECTED_OBJECTS = {
    ("Namespace", "istio-system"),
    ("CustomResourceDefinition", "authorizationpolicies.security.istio.io"),
    ("CustomResourceDefinition", "peerauthentications.security.istio.io"),
    ("ServiceAccount", "ztd"),
    ("ServiceAccount", "zt-bridge"),
    ("ClusterRole", "ztd"),
    ("ClusterRoleBinding", "ztd"),
    ("Role", "ztd"),
    ("RoleBinding", "ztd"),
    ("ConfigMap", "ztd"),
    ("Deployment", "ztd"),
    ("Service", "ztd"),
    ("PodDisruptionBudget", "ztd"),
    ("ConfigMap", "zt-bridge"),
    ("DaemonSet", "zt-bridge"),
}

# (apiGroups, resources, resourceNames, verbs) of every rule: the whole of what ztd may do.
Rule = tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]


def rule(groups: str, resources: str, verbs: str, names: str = "") -> Rule:
    return (
        frozenset(groups.split(",")),
        frozenset(resources.split()),
        frozenset(names.split()),
        frozenset(verbs.split()),
    )


EXPECTED_RULES: dict[tuple[str, str], set[Rule]] = {
    ("ClusterRole", "ztd"): {
        rule("", "namespaces serviceaccounts nodes pods services", "list watch"),
        rule("discovery.k8s.io", "endpointslices", "list watch"),
        rule("security.istio.io", "authorizationpolicies peerauthentications", "list watch"),
        rule("authentication.k8s.io", "tokenreviews", "create"),
        rule("", "configmaps", "list patch", names="istio-ca-root-cert"),
        rule("", "configmaps", "create"),
    },
    ("Role", "ztd"): {
        rule("", "secrets", "get list watch", names="cacerts istio-ca-secret"),
        rule("", "secrets", "update", names="istio-ca-secret"),
        rule("", "secrets", "create"),
        rule("coordination.k8s.io", "leases", "get update", names="ztd-leader"),
        rule("coordination.k8s.io", "leases", "create"),
    },
}

# A value for each downward-API field the manifests use, to resolve the environment as the kubelet would.
DOWNWARD = {
    "metadata.name": "ztd-6d4f9-abcde",
    "metadata.namespace": NAMESPACE,
    "spec.nodeName": "node-a",
    "status.hostIP": "192.0.2.1",
}


def _documents() -> Iterator[tuple[Path, Any]]:
    for path in sorted(MANIFESTS.glob("*.yaml")) + sorted((MANIFESTS / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


DOCS = list(_documents())


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in DOCS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} documents"
    return dict(matches[0])


def container(workload: Mapping[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def volume(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    vols = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    assert len(vols) == 1, name
    return dict(vols[0])


def mounted_file(workload: Mapping[str, Any], path: Path) -> tuple[dict[str, Any], str]:
    """The volume a file path lies in, and the path inside that volume."""
    for mount in container(workload)["volumeMounts"]:
        root = Path(mount["mountPath"])
        if path.is_relative_to(root):
            return volume(workload, mount["name"]), str(path.relative_to(root))
    raise AssertionError(f"{path} is in no volume of {workload['metadata']['name']}")


def env_names(cls: type[Any]) -> set[str]:
    """Every environment variable the config class reads (its own names and their aliases)."""
    names = set()
    for f in dataclasses.fields(cls):
        names.add(config.env_name(cls, f))
        names.update(f.metadata.get("env_aliases", ()))
    return names


def flag_names(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0].removeprefix("--") for arg in args if arg.startswith("--")}


def resolve_env(c: Mapping[str, Any]) -> dict[str, str]:
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            env[var["name"]] = DOWNWARD[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def config_file(workload: Mapping[str, Any], tmp: Path) -> tuple[Path, set[str], str]:
    """(the ConfigMap's config file written to tmp, its keys, the --config path in the pod)."""
    args = container(workload)["args"]
    pod_path = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--config=")))
    vol, inside = mounted_file(workload, pod_path)
    cm = find("ConfigMap", vol["configMap"]["name"])
    text = cm["data"][inside]
    local = tmp / f"{workload['metadata']['name']}-{inside}"
    local.write_text(text)
    return local, set(yaml.safe_load(text)), str(pod_path)


def effective(cls: type[T], workload: Mapping[str, Any], tmp: Path, prog: str) -> T:
    """The config the pod's command would run with: its args, its env and its ConfigMap, via the real loader."""
    c = container(workload)
    local, _, pod_path = config_file(workload, tmp)
    argv = [f"--config={local}" if a == f"--config={pod_path}" else a for a in c["args"]]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return config.load(cls, argv, resolve_env(c), prog=prog, description="")
    except SystemExit:  # the loader reports a bad flag/key/value in one line and exits 2
        pytest.fail(f"the manifests' configuration is refused: {stderr.getvalue().strip()}")


@pytest.fixture
def ztd_cfg(tmp_path: Path) -> ZtdConfig:
    return effective(ZtdConfig, find("Deployment", "ztd"), tmp_path, "ztd")


@pytest.fixture
def bridge_cfg(tmp_path: Path) -> BridgeConfig:
    return effective(BridgeConfig, find("DaemonSet", "zt-bridge"), tmp_path, "zt-bridge")


# --- shape ---------------------------------------------------------------------------------------------------


def test_every_document_is_a_named_kubernetes_object() -> None:
    for path, doc in DOCS:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{path}: {doc['kind']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{path}: {doc['kind']}/{doc['metadata']['name']} not in {NAMESPACE}"


def test_the_folder_holds_exactly_the_expected_objects() -> None:
    found = [(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS]
    assert len(found) == len(set(found)), "an object is defined twice"
    assert set(found) == EXPECTED_OBJECTS


def test_readme_lists_every_file_in_apply_order() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    files = [p.name for p in sorted(MANIFESTS.glob("*.yaml"))]
    positions = [readme.find(name) for name in files]
    assert all(p >= 0 for p in positions), dict(zip(files, positions, strict=True))
    assert positions == sorted(positions), "README.md lists the files out of apply order"
    assert "crds/" in readme


# --- RBAC ----------------------------------------------------------------------------------------------------


def _rules(kind: str, name: str) -> set[Rule]:
    out = set()
    for r in find(kind, name)["rules"]:
        assert set(r) <= {"apiGroups", "resources", "resourceNames", "verbs"}, r
        out.add(
            (
                frozenset(r["apiGroups"]),
                frozenset(r["resources"]),
                frozenset(r.get("resourceNames", ())),
                frozenset(r["verbs"]),
            )
        )
    return out


def test_rbac_has_no_wildcards() -> None:
    for _, doc in DOCS:
        if doc["kind"] in ("ClusterRole", "Role"):
            for r in doc["rules"]:
                for key in ("apiGroups", "resources", "resourceNames", "verbs", "nonResourceURLs"):
                    assert not any("*" in item for item in r.get(key, ())), f"{doc['kind']}/{doc['metadata']['name']}"


def test_rbac_rules_are_exactly_the_pinned_ones() -> None:
    roles = {(doc["kind"], doc["metadata"]["name"]) for _, doc in DOCS if doc["kind"] in ("ClusterRole", "Role")}
    assert roles == set(EXPECTED_RULES)
    for key, expected in EXPECTED_RULES.items():
        assert _rules(*key) == expected, key


def test_cluster_role_reads_exactly_what_the_registry_watches() -> None:
    """Each kind of xds_server/registry/kube.py KINDS is list+watch-able in each group it may be served from."""
    watched = {(v.rpartition("/")[0], spec.plural) for spec in KINDS for v in spec.api_versions}
    granted = {
        (group, resource)
        for groups, resources, names, verbs in _rules("ClusterRole", "ztd")
        if verbs == {"list", "watch"} and not names
        for group in groups
        for resource in resources
    }
    assert granted == watched
    named = [r for r in _rules("ClusterRole", "ztd") if r[1] == {"configmaps"} and r[2]]
    assert [r[2] for r in named] == [frozenset({ROOT_CONFIGMAP})]


def test_only_ztd_is_bound_and_zt_bridge_has_no_api_access() -> None:
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = find(kind, "ztd")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": "ztd"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ztd", "namespace": NAMESPACE}]
    bindings = [doc for _, doc in DOCS if doc["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert len(bindings) == 2
    bridge = find("DaemonSet", "zt-bridge")["spec"]["template"]["spec"]
    assert bridge["serviceAccountName"] == "zt-bridge"
    assert bridge["automountServiceAccountToken"] is False
    assert find("ServiceAccount", "zt-bridge")["automountServiceAccountToken"] is False


# --- ztd -------------------------------------------------------------------------------------------------------


def test_ztd_deployment_shape() -> None:
    dep = find("Deployment", "ztd")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container(dep)
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == "ztd"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    pdb = find("PodDisruptionBudget", "ztd")
    assert pdb["spec"]["selector"] == spec["selector"] and pdb["spec"]["minAvailable"] == 1


def test_ztd_flags_env_and_configmap_are_accepted_by_ztd(ztd_cfg: ZtdConfig, tmp_path: Path) -> None:
    dep = find("Deployment", "ztd")
    c = container(dep)
    _, keys, _ = config_file(dep, tmp_path)
    # A key that is also a flag would be silently shadowed by the flag.
    assert not {k.replace("_", "-") for k in keys} & flag_names(c["args"])
    assert set(resolve_env(c)) <= env_names(ZtdConfig)
    assert ztd_cfg.pod_name == DOWNWARD["metadata.name"]
    assert ztd_cfg.namespace == dep["metadata"]["namespace"]
    assert ztd_cfg.kubeconfig == IN_CLUSTER
    assert ztd_cfg.listen_address == "0.0.0.0"  # noqa: S104 - a pod's port must be reachable from the Service
    assert not ztd_cfg.local_issuer and not ztd_cfg.ca_plaintext and ztd_cfg.xds_auth
    assert ztd_cfg.config_dir is None


def test_ztd_ports_probes_and_service_match_ztd(ztd_cfg: ZtdConfig) -> None:
    c = container(find("Deployment", "ztd"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc-xds": ztd_cfg.xds_port,
        "https-dns": ztd_cfg.secure_port,
        "http-monitoring": ztd_cfg.monitoring_port,
    }
    assert ports == {"grpc-xds": 15010, "https-dns": 15012, "http-monitoring": 15014}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": ztd_cfg.monitoring_port}, probe
    svc = find("Service", "ztd")
    assert svc["spec"]["selector"] == find("Deployment", "ztd")["spec"]["selector"]["matchLabels"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        name: (port, port) for name, port in ports.items()
    }


async def test_ztd_probe_path_answers_on_a_running_ztd(ztd_cfg: ZtdConfig, tmp_path: Path) -> None:
    """The probe's path on a real ztd (embedded registry, free ports): 200 once it is ready."""
    probe = container(find("Deployment", "ztd"))["readinessProbe"]["httpGet"]
    async with running_ztd(tmp_path, trust_domain=ztd_cfg.trust_domain) as running:
        url = f"http://127.0.0.1:{running.cfg.monitoring_port}{probe['path']}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200, await resp.text()


def test_ztd_ca_comes_from_the_secrets_its_role_names(ztd_cfg: ZtdConfig) -> None:
    """No CA folder: the replicas share the CA through the Secrets (and the Lease) the Role grants by name."""
    assert ztd_cfg.cacerts_dir is None
    named = {(next(iter(res)), names) for _, res, names, _ in _rules("Role", "ztd") if names}
    assert named == {
        ("secrets", frozenset(SECRET_NAMES)),
        ("secrets", frozenset({SECRET_NAMES[-1]})),  # update: only the self-signed istio-ca-secret, for rotation
        ("leases", frozenset({LEASE_NAME})),
    }
    assert SECRET_NAMES[-1] == "istio-ca-secret"
    assert find("Role", "ztd")["metadata"]["namespace"] == ztd_cfg.namespace


def test_ztd_writes_only_to_its_empty_dirs(ztd_cfg: ZtdConfig) -> None:
    dep = find("Deployment", "ztd")
    vol, _ = mounted_file(dep, ztd_cfg.state_dir)
    assert "emptyDir" in vol  # writable although the root filesystem is not
    vol, _ = mounted_file(dep, ztd_cfg.published_root)
    assert "emptyDir" in vol


# --- zt-bridge -------------------------------------------------------------------------------------------------


def test_bridge_daemonset_privileges() -> None:
    ds = find("DaemonSet", "zt-bridge")
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    sc = c["securityContext"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert not any(k in pod for k in ("hostPID", "hostIPC")), "only the network namespace is shared"
    assert all("hostPath" not in v for v in pod["volumes"])
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_bridge_flags_env_and_configmap_are_accepted_by_zt_bridge(bridge_cfg: BridgeConfig, tmp_path: Path) -> None:
    ds = find("DaemonSet", "zt-bridge")
    c = container(ds)
    _, keys, _ = config_file(ds, tmp_path)
    assert not {k.replace("_", "-") for k in keys} & flag_names(c["args"])
    assert set(resolve_env(c)) <= env_names(BridgeConfig)
    assert bridge_cfg.node == DOWNWARD["spec.nodeName"]
    assert bridge_cfg.node_address == DOWNWARD["status.hostIP"]
    assert bridge_cfg.config_dir is None and bridge_cfg.xds_address
    assert not bridge_cfg.xds_plaintext and not bridge_cfg.ca_plaintext
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"tcp-handshake": bridge_cfg.port}


def test_bridge_probes_hit_its_admin_port(bridge_cfg: BridgeConfig) -> None:
    c = container(find("DaemonSet", "zt-bridge"))
    # Only the routes are read: the admin's parts are never called.
    admin = Admin(cast(Any, None), cast(Any, None), cast(Any, None), MetricsRegistry())
    routes = {(r.method, r.resource.canonical) for r in admin.app().router.routes() if r.resource is not None}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert (get["host"], get["port"]) == (bridge_cfg.admin_address, bridge_cfg.admin_port), probe
        assert ("GET", get["path"]) in routes


def test_bridge_token_is_a_short_lived_istio_ca_token(bridge_cfg: BridgeConfig, ztd_cfg: ZtdConfig) -> None:
    ds = find("DaemonSet", "zt-bridge")
    assert bridge_cfg.token_file is not None
    vol, inside = mounted_file(ds, bridge_cfg.token_file)
    (source,) = vol["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == inside
    assert token["audience"] == "istio-ca" and token["audience"] in ztd_cfg.token_audiences
    assert 600 <= token["expirationSeconds"] <= 3600


# --- the two sides agree -------------------------------------------------------------------------------------


def test_bridge_and_ztd_agree(bridge_cfg: BridgeConfig, ztd_cfg: ZtdConfig) -> None:
    ds = find("DaemonSet", "zt-bridge")
    svc = find("Service", "ztd")
    secure = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "https-dns")
    assert secure == ztd_cfg.secure_port
    service_host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert bridge_cfg.xds_address == bridge_cfg.ca_address == f"{service_host}:{secure}"
    # The name the bridge checks ztd's certificate against is one ztd's serving certificate carries.
    assert bridge_cfg.ca_server_name in (*ISTIOD_DNS_NAMES, *ztd_cfg.tls_san)
    assert service_host in ztd_cfg.tls_san
    account = f"{ds['metadata']['namespace']}/{ds['spec']['template']['spec']['serviceAccountName']}"
    assert bridge_cfg.bridge_account == account
    assert account in ztd_cfg.ca_trusted_node_accounts
    assert (bridge_cfg.trust_domain, bridge_cfg.cluster_id) == (ztd_cfg.trust_domain, ztd_cfg.cluster_id)
    # The root bundle is the ConfigMap ztd publishes in every namespace.
    vol, inside = mounted_file(ds, bridge_cfg.root_cert)
    assert vol["configMap"]["name"] == ROOT_CONFIGMAP and inside == ROOT_CONFIGMAP_KEY


def test_commands_are_console_scripts_and_images_carry_the_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts = project["scripts"]
    entry = {"ztd": "xds_server.main:main", "zt-bridge": "ipsec_bridge.main:main"}  # the modules loaded above
    for kind, name in (("Deployment", "ztd"), ("DaemonSet", "zt-bridge")):
        c = container(find(kind, name))
        assert c["command"] == [name]
        assert scripts[name] == entry[name]
        assert c["image"].rpartition(":")[2] == project["version"]
