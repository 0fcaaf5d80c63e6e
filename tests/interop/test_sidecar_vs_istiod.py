"""ztd's captured-sidecar config against the real istiod's for the same pod: same listeners, clusters, filter chains.

One etcd + kube-apiserver (tests/support/kube.py) holds Istio's own CRDs and the mesh of
tests/golden/envoy/capture.mesh.yaml, written as a real cluster would hold it: the pods scheduled on a Node,
their status Running + Ready with their IP (no kubelet: written here), the ServiceAccounts they run as, and an
EndpointSlice per selector Service (no controller manager: written here as the EndpointSlice controller would).
Then, per meshConfig.outboundTrafficPolicy mode (ALLOW_ANY, REGISTRY_ONLY), pilot-discovery (built by
`scripts/istio-tools.sh pilot-discovery`, started as bench/vs_istiod.py starts it, `--meshConfig` carrying the
mode) and ztd (`python -m xds_server.main --kubeconfig ... --outbound-traffic-policy <mode>`) both read it. A SotW
ADS client on each one's plaintext xDS port plays the sidecar of a pod (node id and metadata as pilot-agent sends
them for an injected pod), asks for CDS then LDS, ACKs, and the two answers are reduced to their structure:

- the listener names;
- `virtualInbound` and `virtualOutbound`: per filter chain (name, destination_port, transport_protocol, sorted
  application_protocols, has a transport_socket, network filter names, HTTP filter names for an HCM chain,
  tcp_proxy's cluster, which is what tells REGISTRY_ONLY from ALLOW_ANY), compared as a sorted list (Envoy picks
  a chain by the most specific match, not by position);
- the cluster names;
- per RBAC filter on `virtualInbound` (chain, filter kind, action, sorted Envoy policy names; shadow rules too).

Filters left out of the chains (FILTERS_ONLY_IN_ISTIO_ENVOY), because only Istio's own Envoy build (proxyv2) has
them: ztd targets upstream Envoy, which refuses a config naming an extension it was not built with.
- `istio.metadata_exchange`: istiod puts it first among the network filters of every `virtualInbound` chain, and
  first among the HTTP filters of each HCM there; the upstream Envoy 1.40 binary has no such extension.
- `istio.stats`: Istio's telemetry filter; istiod adds it only when meshConfig names a metrics provider (not here, so
  not observed), and upstream Envoy has no such extension either.
Nothing else is left out: `envoy.filters.http.grpc_stats`, `envoy.filters.http.fault` and `envoy.filters.http.cors`,
which istiod adds to every HTTP connection manager (pilot/pkg/networking/core/listener_builder.go), are upstream
Envoy extensions (present in the 1.40 binary), so they are compared.

Differences ztd makes on purpose go in DELIBERATE (none today), with a reason each; they are applied explicitly to
istiod's side before the comparison, and an entry no longer observed fails the test (no stale excuses).
Set ZT_VS_ISTIOD_DUMP=<folder> to keep both structures of every case as text.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import pprint
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from bench.vs_istiod import ISTIOD_ENV, Proc, istio_crds, pilot_discovery
from tests.support.kube import KubeCluster, free_port, kube_tools, rest
from tests.support.wait import eventually

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MESH = REPO / "tests" / "golden" / "envoy" / "capture.mesh.yaml"
NODE, NODE_IP = "zt-node", "192.0.2.10"
IMAGE = "registry.invalid/app:1"
ISTIO_VERSION = "1.31.0"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"

FILTERS_ONLY_IN_ISTIO_ENVOY = {
    "istio.metadata_exchange": "peer metadata exchange (network and HTTP), an extension of Istio's proxy only",
    "istio.stats": "Istio's telemetry filter (network and HTTP), an extension of Istio's proxy only",
}
# The bench runs istiod for ztunnels; a sidecar mesh leaves ambient off, as a default install does.
SIDECAR_ISTIOD_ENV = {k: v for k, v in ISTIOD_ENV.items() if k != "PILOT_ENABLE_AMBIENT"}


@dataclass(frozen=True)
class Deliberate:
    """One structural difference ztd makes on purpose: `key` of the structure, istiod's value, ztd's value."""

    case: str  # "<mode>/<namespace>/<pod>", or "*" for every case
    key: str
    istiod: Any
    ztd: Any
    reason: str


DELIBERATE: tuple[Deliberate, ...] = ()


# -- the cluster -------------------------------------------------------------------------------------------------


def _ok(cluster: KubeCluster, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
    got = rest(cluster, method, path, body, content_type=content_type)
    if got.status >= 300 and not (got.status == 409 and method == "POST"):
        raise AssertionError(f"{method} {path}: HTTP {got.status}: {got.body.get('message', got.body)}")
    return got.body


def _install_crds(cluster: KubeCluster) -> None:
    crds, source = istio_crds()
    assert any(c["spec"]["group"] == "networking.istio.io" for c in crds), f"not Istio's full CRD set: {source}"
    for crd in crds:
        _ok(cluster, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)

    def established() -> bool:
        for crd in crds:
            got = _ok(
                cluster, "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
            )
            conditions = {c["type"]: c["status"] for c in got.get("status", {}).get("conditions", [])}
            if conditions.get("Established") != "True":
                return False
        return True

    asyncio.run(eventually(established, within=60, what="Istio's CRDs established"))


def _pod_ports(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for c in pod["spec"]["containers"] for p in c.get("ports", [])]


def _endpoint_slice(svc: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The slice the EndpointSlice controller would write for a selector Service (ports by target port)."""
    selector = svc["spec"]["selector"]
    chosen = [
        p
        for p in pods
        if p["metadata"]["namespace"] == svc["metadata"]["namespace"]
        and selector.items() <= p["metadata"].get("labels", {}).items()
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{svc['metadata']['name']}-zt",
            "labels": {
                "kubernetes.io/service-name": svc["metadata"]["name"],
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [
            {"name": p["name"], "port": int(p["targetPort"]), "protocol": p.get("protocol", "TCP")}
            for p in svc["spec"]["ports"]
        ],
        "endpoints": [
            {
                "addresses": [p["status"]["podIP"]],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": NODE,
                "targetRef": {"kind": "Pod", "namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"]},
            }
            for p in chosen
        ],
    }


def _apply_mesh(cluster: KubeCluster, docs: list[dict[str, Any]]) -> None:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    _ok(cluster, "POST", "/api/v1/namespaces", {"metadata": {"name": "istio-system"}})
    for ns in by_kind.pop("Namespace"):
        _ok(cluster, "POST", "/api/v1/namespaces", {"metadata": ns["metadata"]})
    _ok(cluster, "POST", "/api/v1/nodes", {"metadata": {"name": NODE}})
    _ok(
        cluster,
        "PATCH",
        f"/api/v1/nodes/{NODE}/status",
        {"status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
        "application/merge-patch+json",
    )
    pods = by_kind.pop("Pod")
    for pod in pods:
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        sa = pod["spec"]["serviceAccountName"]
        # The ServiceAccount admission plugin refuses a pod whose account does not exist.
        _ok(cluster, "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": sa}})
        spec = {
            **pod["spec"],
            "nodeName": NODE,
            "automountServiceAccountToken": False,
            "containers": [{**c, "image": IMAGE} for c in pod["spec"]["containers"]],
        }
        _ok(cluster, "POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": pod["metadata"], "spec": spec})
        ip = pod["status"]["podIP"]
        status = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        }
        _ok(
            cluster,
            "PATCH",
            f"/api/v1/namespaces/{ns}/pods/{name}/status",
            {"status": status},
            "application/merge-patch+json",
        )
    for svc in by_kind.pop("Service"):
        ns = svc["metadata"]["namespace"]
        _ok(cluster, "POST", f"/api/v1/namespaces/{ns}/services", svc)
        if svc["spec"].get("selector"):
            _ok(
                cluster, "POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", _endpoint_slice(svc, pods)
            )
    for kind, plural in (
        ("PeerAuthentication", "peerauthentications"),
        ("AuthorizationPolicy", "authorizationpolicies"),
    ):
        for doc in by_kind.pop(kind):
            ns = doc["metadata"]["namespace"]
            _ok(cluster, "POST", f"/apis/security.istio.io/v1/namespaces/{ns}/{plural}", doc)
    assert not by_kind, f"capture.mesh.yaml has kinds this test does not apply: {sorted(by_kind)}"


@pytest.fixture(scope="module")
def mesh_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MESH.read_text()) if d]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, mesh_docs: list[dict[str, Any]]) -> Iterator[KubeCluster]:
    kube = KubeCluster.start(kube_tools(), tmp_path_factory.mktemp("kube"))
    try:
        _install_crds(kube)
        _apply_mesh(kube, mesh_docs)
        yield kube
    finally:
        kube.stop()


# -- the two servers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Servers:
    mode: str
    ports: dict[str, int]  # server name -> plaintext xDS port
    procs: tuple[Proc, ...]


async def _ready(url: str, procs: tuple[Proc, ...]) -> None:
    def answered() -> bool:
        for p in procs:
            assert not p.died(), p.died()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    await eventually(lambda: asyncio.to_thread(answered), within=180, what=f"{url} to answer 200")


@pytest.fixture(scope="module", params=["ALLOW_ANY", "REGISTRY_ONLY"])
def servers(
    request: pytest.FixtureRequest, cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    mode = str(request.param)
    work = tmp_path_factory.mktemp(f"servers-{mode}")
    binary = pilot_discovery()
    ztd_xds, istiod_xds, ztd_mon, istiod_http = free_port(), free_port(), free_port(), free_port()
    ztd = Proc(
        "ztd",
        [
            sys.executable,
            "-m",
            "xds_server.main",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--state-dir",
            str(work / "ztd-state"),
            "--xds-port",
            str(ztd_xds),
            "--secure-port",
            str(free_port()),
            "--monitoring-port",
            str(ztd_mon),
            "--outbound-traffic-policy",
            mode,
        ],
        work / "ztd.log",
    )
    mesh_config = work / "mesh.yaml"
    mesh_config.write_text(
        "rootNamespace: istio-system\ntrustDomain: cluster.local\n"
        f"outboundTrafficPolicy:\n  mode: {mode}\n"
        "defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n"
    )
    (work / "meshNetworks.yaml").write_text("networks: {}\n")
    istiod = Proc(
        "istiod",
        [
            str(binary),
            "discovery",
            f"--kubeconfig={cluster.kubeconfig}",
            f"--meshConfig={mesh_config}",
            f"--networksConfig={work / 'meshNetworks.yaml'}",
            f"--grpcAddr=127.0.0.1:{istiod_xds}",  # plaintext xDS (15010 in a cluster)
            f"--httpAddr=127.0.0.1:{istiod_http}",
            "--httpsAddr=",
            "--secureGRPCAddr=",
            f"--monitoringAddr=127.0.0.1:{free_port()}",
            f"--ctrlz_port={free_port()}",
            "--shutdownDuration=1s",
            "--domain=cluster.local",
        ],
        work / "istiod.log",
        env={**os.environ, **SIDECAR_ISTIOD_ENV},
    )
    procs = (ztd.start(), istiod.start())
    try:

        async def both_ready() -> None:
            await _ready(f"http://127.0.0.1:{ztd_mon}/ready", procs)
            await _ready(f"http://127.0.0.1:{istiod_http}/ready", procs)

        asyncio.run(both_ready())
        yield Servers(mode, {"ztd": ztd_xds, "istiod": istiod_xds}, procs)
    finally:
        for p in procs:
            p.stop()


# -- the sidecar's ADS client --------------------------------------------------------------------------------------


def sidecar_node(pod: dict[str, Any]) -> base_pb2.Node:
    """The node pilot-agent sends for an injected pod (env of Istio's injection template + the downward API)."""
    ns, name, ip = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["status"]["podIP"]
    labels = pod["metadata"].get("labels", {})
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAME": name,
            "NAMESPACE": ns,
            "LABELS": labels,
            "SERVICE_ACCOUNT": pod["spec"]["serviceAccountName"],
            "INSTANCE_IPS": ip,
            "WORKLOAD_NAME": name,  # no Deployment owns these pods
            "OWNER": f"kubernetes://apis/v1/namespaces/{ns}/pods/{name}",
            "CLUSTER_ID": "Kubernetes",
            "MESH_ID": "cluster.local",
            "NODE_NAME": NODE,
            "ISTIO_VERSION": ISTIO_VERSION,
            "INTERCEPTION_MODE": "REDIRECT",
            "POD_PORTS": json.dumps(_pod_ports(pod)),
            "APP_CONTAINERS": ",".join(c["name"] for c in pod["spec"]["containers"]),
            "ENVOY_STATUS_PORT": 15021,
            "ENVOY_PROMETHEUS_PORT": 15090,
        }
    )
    return base_pb2.Node(id=f"sidecar~{ip}~{name}.{ns}~{ns}.svc.cluster.local", metadata=meta)


async def fetch(port: int, node: base_pb2.Node, within: float = 60.0) -> dict[str, list[Any]]:
    """CDS then LDS over one SotW ADS stream, each response ACKed as Envoy does; the resources by type URL."""
    out: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (req := await out.get()) is not None:
            yield req

    got: dict[str, list[Any]] = {}
    classes = {CDS: cluster_pb2.Cluster, LDS: listener_pb2.Listener}
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(requests())
        try:
            async with asyncio.timeout(within):
                for type_url in (CDS, LDS):
                    await out.put(discovery_pb2.DiscoveryRequest(node=node, type_url=type_url))
                    while type_url not in got:
                        resp = await call.read()
                        assert resp is not grpc.aio.EOF, f"stream on port {port} ended before {type_url}"
                        await out.put(
                            discovery_pb2.DiscoveryRequest(
                                node=node,
                                type_url=resp.type_url,
                                version_info=resp.version_info,
                                response_nonce=resp.nonce,
                            )
                        )
                        if resp.type_url in classes:
                            msgs = []
                            for any_ in resp.resources:
                                msg = classes[resp.type_url]()
                                assert any_.Unpack(msg), f"{resp.type_url}: resource of type {any_.type_url}"
                                msgs.append(msg)
                            got[resp.type_url] = msgs
        finally:
            await out.put(None)
            call.cancel()
    return got


# -- structure ----------------------------------------------------------------------------------------------------


def _http_filters(chain: listener_pb2.FilterChain) -> list[str] | None:
    for f in chain.filters:
        if f.name == HCM:
            hcm = hcm_pb2.HttpConnectionManager()
            assert f.typed_config.Unpack(hcm)
            return [h.name for h in hcm.http_filters if h.name not in FILTERS_ONLY_IN_ISTIO_ENVOY]
    return None


def _tcp_proxy_cluster(chain: listener_pb2.FilterChain) -> str | None:
    for f in chain.filters:
        if f.name == TCP_PROXY:
            tcp = tcp_proxy_pb2.TcpProxy()
            assert f.typed_config.Unpack(tcp)
            return tcp.cluster or "(weighted)"
    return None


def chain_shape(chain: listener_pb2.FilterChain) -> tuple[Any, ...]:
    """(name, destination port, transport protocol, ALPNs, has transport socket, network filters, HTTP filters,
    tcp_proxy's cluster): the last tells ALLOW_ANY from REGISTRY_ONLY, which use the same chains."""
    m = chain.filter_chain_match
    return (
        chain.name,
        m.destination_port.value if m.HasField("destination_port") else None,
        m.transport_protocol,
        tuple(sorted(m.application_protocols)),
        chain.HasField("transport_socket"),
        tuple(f.name for f in chain.filters if f.name not in FILTERS_ONLY_IN_ISTIO_ENVOY),
        tuple(_http_filters(chain) or ()),
        _tcp_proxy_cluster(chain),
    )


def _rbac(chain: listener_pb2.FilterChain) -> list[tuple[Any, ...]]:
    """(filter kind, action, policy names, shadow action, shadow policy names) of each RBAC filter of the chain."""
    configs: list[tuple[str, Any]] = []
    for f in chain.filters:
        if f.name == "envoy.filters.network.rbac":
            msg = network_rbac_pb2.RBAC()
            assert f.typed_config.Unpack(msg)
            configs.append(("network", msg))
        elif f.name == HCM:
            hcm = hcm_pb2.HttpConnectionManager()
            assert f.typed_config.Unpack(hcm)
            for h in hcm.http_filters:
                if h.name == "envoy.filters.http.rbac":
                    msg = http_rbac_pb2.RBAC()
                    assert h.typed_config.Unpack(msg)
                    configs.append(("http", msg))
    return [
        (
            kind,
            msg.rules.Action.Name(msg.rules.action) if msg.HasField("rules") else None,
            tuple(sorted(msg.rules.policies)),
            msg.shadow_rules.Action.Name(msg.shadow_rules.action) if msg.HasField("shadow_rules") else None,
            tuple(sorted(msg.shadow_rules.policies)),
        )
        for kind, msg in configs
    ]


def structure(resources: dict[str, list[Any]]) -> dict[str, Any]:
    listeners = {lst.name: lst for lst in resources[LDS]}
    out: dict[str, Any] = {
        "listeners": sorted(listeners),
        "clusters": sorted(c.name for c in resources[CDS]),
    }
    for name in ("virtualInbound", "virtualOutbound"):
        lst = listeners.get(name)
        out[f"{name} chains"] = sorted((chain_shape(c) for c in (lst.filter_chains if lst else [])), key=repr)
        if lst is not None and lst.HasField("default_filter_chain"):  # neither server sets one today
            out[f"{name} default chain"] = chain_shape(lst.default_filter_chain)
    inbound = listeners.get("virtualInbound")
    out["virtualInbound rbac"] = sorted(
        ((chain_shape(c)[:4], *r) for c in (inbound.filter_chains if inbound else []) for r in _rbac(c)), key=repr
    )
    return out


def apply_deliberate(case: str, theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """istiod's structure with ztd's deliberate differences applied; returns the entries that did not hold."""
    stale = []
    for d in DELIBERATE:
        if d.case not in ("*", case):
            continue
        if theirs.get(d.key) != d.istiod or ours.get(d.key) != d.ztd:
            stale.append(f"{d.key}: {d.reason}")
            continue
        theirs[d.key] = d.ztd
    return stale


def readable_diff(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    lines = []
    for key in sorted(theirs.keys() | ours.keys()):
        a, b = theirs.get(key), ours.get(key)
        if a == b:
            continue
        lines.append(f"== {key}")
        lines += difflib.unified_diff(
            pprint.pformat(a, width=160).splitlines(),
            pprint.pformat(b, width=160).splitlines(),
            "istiod",
            "ztd",
            lineterm="",
            n=1,
        )
    return "\n".join(lines)


# -- the test ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod_key", "inbound_clusters"),
    [
        pytest.param("foo/httpbin-1", ["inbound|8000||", "inbound|9000||"], id="foo/httpbin-1"),
        pytest.param("foo/sleep-1", [], id="foo/sleep-1"),
    ],
)
async def test_sidecar_config_has_istiods_structure(
    servers: Servers, mesh_docs: list[dict[str, Any]], pod_key: str, inbound_clusters: list[str], tmp_path: Path
) -> None:
    ns, name = pod_key.split("/")
    pod = next(
        d
        for d in mesh_docs
        if d["kind"] == "Pod" and d["metadata"]["name"] == name and d["metadata"]["namespace"] == ns
    )
    node = sidecar_node(pod)
    theirs, ours = (
        structure(await fetch(servers.ports["istiod"], node)),
        structure(await fetch(servers.ports["ztd"], node)),
    )
    case = f"{servers.mode}/{pod_key}"
    dump = Path(os.environ.get("ZT_VS_ISTIOD_DUMP", tmp_path)) / case.replace("/", "_")
    dump.mkdir(parents=True, exist_ok=True)
    (dump / "istiod.txt").write_text(pprint.pformat(theirs, width=160))
    (dump / "ztd.txt").write_text(pprint.pformat(ours, width=160))
    # istiod matched the sidecar to its pod (its inbound clusters are the pod's ports) and read the mesh config's
    # mode: otherwise an equal structure would prove nothing.
    assert sorted(c for c in theirs["clusters"] if c.startswith("inbound|")) == inbound_clusters, theirs["clusters"]
    catch_all = {chain[0]: chain[-1] for chain in theirs["virtualOutbound chains"]}
    want = "BlackHoleCluster" if servers.mode == "REGISTRY_ONLY" else "PassthroughCluster"
    assert catch_all.get("virtualOutbound-catchall-tcp") == want, theirs["virtualOutbound chains"]
    stale = apply_deliberate(case, theirs, ours)
    assert not stale, f"{case}: DELIBERATE entries not observed (istiod or ztd changed):\n" + "\n".join(stale)
    assert theirs == ours, f"{case}: ztd's structure differs from istiod's:\n{readable_diff(theirs, ours)}"
