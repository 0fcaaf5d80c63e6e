"""Embedded registry: parsing (kinds, defaults, errors with file:line), snapshots, the folder watcher."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import textwrap
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.support.wait import eventually
from ztcore.fsutil import write_atomic
from ztcore.mesh.registry import files
from ztcore.mesh.registry.files import FileRegistrySource, RegistryLoadError, load_dir, read_dir
from ztcore.mesh.registry.objects import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    FrozenMap,
    Namespace,
    Node,
    NodeAddress,
    ObjectMeta,
    ObjectReference,
    Operation,
    PeerAuthentication,
    Pod,
    PolicyTargetReference,
    Rule,
    Service,
    ServiceAccount,
    ServicePort,
    Source,
    default_uid,
)
from ztcore.mesh.registry.parse import parse_documents, parse_sources, parse_text
from ztcore.mesh.registry.store import Registry, RegistrySnapshot
from ztcore.registry import PodDirectory, PodRef

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mesh"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def parse_one(text: str) -> object:
    objects, errors = parse_documents(y(text), "t.yaml")
    assert [str(e) for e in errors] == []
    assert len(objects) == 1
    return objects[0]


def meta(name: str, namespace: str = "", kind: str = "", **labels: str) -> ObjectMeta:
    return ObjectMeta(name, namespace, default_uid(kind, namespace, name), FrozenMap(labels))


# --- parsing each kind ---------------------------------------------------------------------------------

KIND_CASES = [
    pytest.param(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
        """,
        Namespace(
            ObjectMeta(
                "shop",
                "",
                default_uid("Namespace", "", "shop"),
                FrozenMap({"istio.io/dataplane-mode": "ambient"}),
            )
        ),
        id="namespace-cluster-scoped",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: cart, namespace: shop, uid: "u-1"}
        """,
        ServiceAccount(ObjectMeta("cart", "shop", "u-1")),
        id="serviceaccount-explicit-uid",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Node
        metadata: {name: node-a, namespace: ignored}
        status:
          addresses: [{type: InternalIP, address: 10.10.0.1}, {type: Hostname, address: node-a}]
        """,
        Node(
            meta("node-a", kind="Node"),
            (NodeAddress("InternalIP", "10.10.0.1"), NodeAddress("Hostname", "node-a")),
        ),
        id="node-addresses",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Pod
        metadata: {name: web, namespace: shop, labels: {app: web}}
        spec:
          serviceAccountName: frontend
          nodeName: node-a
          containers:
            - name: c
              ports: [{containerPort: 8080, name: http}, {containerPort: 53, protocol: UDP}]
        status:
          phase: Pending
          podIP: 10.244.1.10
          podIPs: [{ip: 10.244.1.10}, {ip: "fd00:0::a"}]
        """,
        Pod(
            meta("web", "shop", "Pod", app="web"),
            service_account="frontend",
            node_name="node-a",
            pod_ips=("10.244.1.10", "fd00::a"),
            phase="Pending",
            container_ports=(ContainerPort(8080, "http"), ContainerPort(53, "", "UDP")),
        ),
        id="pod-full-podIPs-win",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Pod
        metadata: {name: bare}
        status: {podIP: 10.244.2.3}
        """,
        Pod(meta("bare", "default", "Pod"), pod_ips=("10.244.2.3",)),
        id="pod-defaults-namespace-sa-phase",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Pod
        metadata: {name: old, namespace: ns}
        spec: {serviceAccount: legacy, hostNetwork: true}
        """,
        Pod(meta("old", "ns", "Pod"), service_account="legacy", host_network=True),
        id="pod-deprecated-serviceAccount-hostNetwork",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: frontend, namespace: shop}
        spec:
          selector: {app: frontend}
          clusterIP: 10.96.10.1
          clusterIPs: [10.96.10.1, "fd00:96::1"]
          ports:
            - {name: http, port: 80, targetPort: http, appProtocol: http}
            - {port: 9000}
            - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
        """,
        Service(
            meta("frontend", "shop", "Service"),
            selector=FrozenMap({"app": "frontend"}),
            cluster_ips=("10.96.10.1", "fd00:96::1"),
            ports=(
                ServicePort(80, "http", "http", "TCP", "http"),
                ServicePort(9000, 9000),
                ServicePort(53, 5353, "dns", "UDP"),
            ),
            ip_families=("IPv4", "IPv6"),  # defaulted from the cluster IPs, as the API server does
        ),
        id="service-ports-clusterIPs",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: v6, namespace: shop}
        spec: {clusterIP: "fd00:96::2", ipFamilies: [IPv6], ipFamilyPolicy: SingleStack}
        """,
        Service(meta("v6", "shop", "Service"), cluster_ips=("fd00:96::2",), ip_families=("IPv6",)),
        id="service-ipFamilies-given",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: ext, namespace: shop}
        spec: {type: ExternalName, externalName: example.com}
        """,
        Service(meta("ext", "shop", "Service"), type="ExternalName"),
        id="service-externalname-has-no-families",
    ),
    pytest.param(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: headless, namespace: shop}
        spec: {clusterIP: None, selector: {app: db}}
        """,
        Service(meta("headless", "shop", "Service"), selector=FrozenMap({"app": "db"}), ip_families=("IPv4",)),
        id="service-headless",
    ),
    pytest.param(
        """
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata:
          name: ext-abc
          namespace: shop
          labels: {kubernetes.io/service-name: ext}
        addressType: IPv4
        endpoints:
          - addresses: [192.168.7.1]
            conditions: {ready: false}
            nodeName: node-b
            targetRef: {kind: Pod, namespace: shop, name: ext-1}
        ports: [{name: http, port: 80, appProtocol: http}]
        """,
        EndpointSlice(
            meta("ext-abc", "shop", "EndpointSlice", **{"kubernetes.io/service-name": "ext"}),
            "IPv4",
            (Endpoint(("192.168.7.1",), ObjectReference("Pod", "ext-1", "shop"), "node-b", False),),
            (EndpointPort(80, "http", "TCP", "http"),),
        ),
        id="endpointslice",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ledger, namespace: payments, annotations: {istio.io/dry-run: "true"}}
        spec:
          selector: {matchLabels: {app: ledger}}
          action: DENY
          rules:
            - from:
                - source:
                    principals: [cluster.local/ns/shop/sa/cart]
                    notNamespaces: [dev]
                    ipBlocks: [10.0.0.0/8, 192.168.1.1]
                    notRemoteIpBlocks: ["fd00::/8"]
                    requestPrincipals: ["*"]
                - source: {serviceAccounts: [shop/default], notServiceAccounts: [x]}
              to:
                - operation: {ports: ["9000", 9001], notPorts: ["22"], methods: [GET], paths: [/x*]}
              when:
                - {key: source.ip, values: [10.1.0.0/16]}
                - {key: "request.headers[x]", notValues: [a]}
        """,
        AuthorizationPolicy(
            ObjectMeta(
                "ledger",
                "payments",
                default_uid("AuthorizationPolicy", "payments", "ledger"),
                annotations=FrozenMap({"istio.io/dry-run": "true"}),
            ),
            selector=FrozenMap({"app": "ledger"}),
            action="DENY",
            rules=(
                Rule(
                    from_=(
                        Source(
                            principals=("cluster.local/ns/shop/sa/cart",),
                            not_namespaces=("dev",),
                            ip_blocks=("10.0.0.0/8", "192.168.1.1"),
                            not_remote_ip_blocks=("fd00::/8",),
                            request_principals=("*",),
                        ),
                        Source(service_accounts=("shop/default",), not_service_accounts=("x",)),
                    ),
                    to=(Operation(ports=(9000, 9001), not_ports=(22,), methods=("GET",), paths=("/x*",)),),
                    when=(
                        Condition("source.ip", ("10.1.0.0/16",)),
                        Condition("request.headers[x]", not_values=("a",)),
                    ),
                ),
            ),
        ),
        id="authz-full",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: shop}
        spec: {}
        """,
        AuthorizationPolicy(meta("allow-nothing", "shop", "AuthorizationPolicy")),
        id="authz-v1beta1-allow-nothing",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-all, namespace: shop}
        spec: {selector: {matchLabels: {}}, rules: [{}]}
        """,
        AuthorizationPolicy(meta("allow-all", "shop", "AuthorizationPolicy"), FrozenMap(), rules=(Rule(),)),
        id="authz-allow-all-empty-selector",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: shop}
        spec:
          action: CUSTOM
          provider: {name: opa}
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
          rules: [{to: [{operation: {paths: [/admin]}}]}]
        """,
        AuthorizationPolicy(
            meta("ext", "shop", "AuthorizationPolicy"),
            action="CUSTOM",
            rules=(Rule(to=(Operation(paths=("/admin",)),)),),
            target_refs=(PolicyTargetReference("Gateway", "waypoint", "gateway.networking.k8s.io"),),
            provider="opa",
        ),
        id="authz-custom-targetRefs",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: ledger, namespace: payments}
        spec:
          selector: {matchLabels: {app: ledger}}
          mtls: {mode: STRICT}
          portLevelMtls:
            9090: {mode: PERMISSIVE}
            "8080": {mode: DISABLE}
        """,
        PeerAuthentication(
            meta("ledger", "payments", "PeerAuthentication"),
            FrozenMap({"app": "ledger"}),
            "STRICT",
            FrozenMap({8080: "DISABLE", 9090: "PERMISSIVE"}),
        ),
        id="peerauthn-port-level",
    ),
    pytest.param(
        """
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {}}
        """,
        PeerAuthentication(meta("default", "istio-system", "PeerAuthentication")),
        id="peerauthn-mesh-unset",
    ),
]


@pytest.mark.parametrize(("text", "expected"), KIND_CASES)
def test_parse_kind(text: str, expected: object) -> None:
    assert parse_one(text) == expected


def test_default_uid_is_deterministic_uuid5() -> None:
    uid = default_uid("Pod", "shop", "cart-1")
    assert uid == str(uuid.uuid5(uuid.NAMESPACE_URL, "ztdpu://Pod/shop/cart-1"))
    assert uid == default_uid("Pod", "shop", "cart-1")
    assert len({uid, default_uid("Pod", "shop", "cart-2"), default_uid("Pod", "payments", "cart-1")}) == 3
    pod = parse_one("apiVersion: v1\nkind: Pod\nmetadata: {name: cart-1, namespace: shop}\n")
    assert isinstance(pod, Pod) and pod.uid == uid
    assert pod.to_ref() == PodRef("shop", "cart-1", uid, "default", "", "Running")


def test_objects_are_immutable() -> None:
    pod = parse_one("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: a}}\n")
    assert isinstance(pod, Pod)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pod.phase = "Failed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        pod.labels["app"] = "b"  # type: ignore[index]
    assert hash(pod) == hash(parse_one("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: a}}\n"))


def test_multi_document_list_and_empty_documents() -> None:
    text = y(
        """
        # only a comment
        ---
        ---
        apiVersion: v1
        kind: List
        items:
          - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
          - {apiVersion: v1, kind: Namespace, metadata: {name: b}}
        ---
        ~
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: c}
        """
    )
    objects, errors = parse_documents(text, "multi.yaml")
    assert errors == []
    assert [o.name for o in objects] == ["a", "b", "c"]


def test_unknown_kinds_skipped_and_counted() -> None:
    text = y(
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec: {replicas: [not, checked]}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: cfg}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: api}
        ---
        apiVersion: example.com/v1
        kind: AuthorizationPolicy
        metadata: {name: someone-elses-crd}
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: kept}
        """
    )
    result = parse_text(text, "mixed.yaml")
    assert result.errors == ()
    assert [o.name for o in result.objects] == ["kept"]
    assert dict(result.skipped) == {
        "apps/v1 Deployment": 2,
        "v1 ConfigMap": 1,
        "example.com/v1 AuthorizationPolicy": 1,
    }


# --- errors: file and line -----------------------------------------------------------------------------

# Every case starts with a valid document, so the offending line is never simply 1.
PREFIX = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\n"  # 4 lines

ERROR_CASES = [
    ("a: [1\nb: 2\n", "bad.yaml:6: invalid YAML: while parsing a flow sequence"),
    ("key: !custom 1\n", "bad.yaml:5: invalid YAML: could not determine a constructor for the tag '!custom'"),
    ("- just\n- a list\n", "bad.yaml:5: document must be a mapping, got a list"),
    ("plain scalar\n", "bad.yaml:5: document must be a mapping, got a string"),
    ("kind: Pod\nmetadata: {name: a}\n", "bad.yaml:5: apiVersion: required field is missing"),
    ("apiVersion: v1\nmetadata: {name: a}\n", "bad.yaml:5: kind: required field is missing"),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n",
        "bad.yaml:7: metadata.name: required field is missing",
    ),
    ("apiVersion: v1\nkind: Pod\n", "bad.yaml:5: metadata: required field is missing"),
    ("apiVersion: v1\nkind: Pod\nmetadata: [a]\n", "bad.yaml:7: metadata: must be a mapping, got a list"),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\n",
        "bad.yaml:7: metadata.name: invalid name 'Bad_Name'",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {version: 1.0}\n",
        "bad.yaml:9: metadata.labels.version: must be a string, got float (quote it)",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  uid: 1234\n",
        "bad.yaml:9: metadata.uid: must be a string, got an integer",
    ),
    (
        "apiVersion: v2\nkind: Pod\nmetadata: {name: a}\n",
        "bad.yaml:5: apiVersion: unsupported apiVersion 'v2' for Pod (expected v1)",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nstatus:\n  podIP: 10.0.0.300\n",
        "bad.yaml:9: Pod x/a: status.podIP: '10.0.0.300' is not an IP address",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus:\n  phase: Sleeping\n",
        "bad.yaml:9: Pod default/a: status.phase: unknown value 'Sleeping' "
        "(expected one of Pending, Running, Succeeded, Failed, Unknown)",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n"
        "    - name: c\n      ports:\n        - containerPort: http\n",
        "bad.yaml:12: Pod default/a: spec.containers[0].ports[0].containerPort: must be an integer port, got a string",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: 80\n",
        "bad.yaml:9: Service default/s: spec.ports: must be a list, got an integer",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: '80'\n",
        "bad.yaml:10: Service default/s: spec.ports[0].port: must be an integer port, got a string",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: true\n",
        "bad.yaml:10: Service default/s: spec.ports[0].port: must be an integer port, got a boolean",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - port: 70000\n",
        "bad.yaml:10: Service default/s: spec.ports[0].port: port 70000 out of range 1-65535",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports:\n  - {port: 80, targetPort: '8080'}\n",
        "bad.yaml:10: Service default/s: spec.ports[0].targetPort: '8080' is neither a port number "
        "nor a valid port name",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selector: app=web\n",
        "bad.yaml:9: Service default/s: spec.selector: must be a mapping, got a string",
    ),
    (
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\nendpoints: []\n",
        "bad.yaml:5: EndpointSlice default/e: addressType: required field is missing",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: ALOW\n",
        "bad.yaml:9: AuthorizationPolicy default/p: spec.action: unknown value 'ALOW' "
        "(expected one of ALLOW, DENY, AUDIT, CUSTOM)",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector: [app]\n",
        "bad.yaml:9: AuthorizationPolicy default/p: spec.selector: must be a mapping, got a list",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec:\n  selector:\n    app: web\n",
        "bad.yaml:10: AuthorizationPolicy default/p: spec.selector.app: unknown field (expected one of matchLabels)",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "  - from:\n    - source:\n        ipBlocks: [10.0.0.0/8, 10.1.0.0/33]\n",
        "bad.yaml:12: AuthorizationPolicy default/p: spec.rules[0].from[0].source.ipBlocks[1]: "
        "'10.1.0.0/33' is not an IP address or CIDR",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "  - from:\n    - source:\n        principal: [a]\n",
        "bad.yaml:12: AuthorizationPolicy default/p: spec.rules[0].from[0].source.principal: unknown field",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "  - from:\n    - source: {serviceAccounts: [a], namespaces: [b]}\n",
        "bad.yaml:11: AuthorizationPolicy default/p: spec.rules[0].from[0].source: serviceAccounts/"
        "notServiceAccounts cannot be combined with principals or namespaces",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "  - to:\n    - operation: {ports: [http]}\n",
        "bad.yaml:11: AuthorizationPolicy default/p: spec.rules[0].to[0].operation.ports[0]: "
        "'http' is not a port number",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  rules:\n"
        "  - when:\n    - key: source.ip\n",
        "bad.yaml:11: AuthorizationPolicy default/p: spec.rules[0].when[0]: "
        "condition 'source.ip' needs values or notValues",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  action: CUSTOM\n",
        "bad.yaml:8: AuthorizationPolicy default/p: spec.provider: action CUSTOM requires provider.name",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n"
        "  selector: {matchLabels: {app: a}}\n  targetRef: {kind: Service, name: a}\n",
        "bad.yaml:9: AuthorizationPolicy default/p: spec.selector: only one of selector or targetRef(s) can be set",
    ),
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ipFamilies: [IPv4, ipv6]\n",
        "bad.yaml:9: Service default/s: spec.ipFamilies[1]: must be IPv4 or IPv6, got 'ipv6'",
    ),
    (
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        "bad.yaml:5: apiVersion: unsupported apiVersion 'security.istio.io/v2' for AuthorizationPolicy",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n"
        "  mtls:\n    mode: strict\n",
        "bad.yaml:10: PeerAuthentication default/p: spec.mtls.mode: unknown value 'strict' "
        "(expected one of UNSET, DISABLE, PERMISSIVE, STRICT)",
    ),
    (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n"
        "  portLevelMtls:\n    8080: {mode: DISABLE}\n",
        "bad.yaml:9: PeerAuthentication default/p: spec.portLevelMtls: port-level mTLS needs a workload selector",
    ),
    (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  name: b\n",
        "bad.yaml:9: metadata.name: duplicate key (first at line 8)",
    ),
    (
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: x}}\n"
        "- apiVersion: v1\n  kind: Namespace\n  metadata: {}\n",
        "bad.yaml:11: items[1].metadata.name: required field is missing",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_error_reports_file_and_line(text: str, expected: str) -> None:
    result = parse_text(PREFIX + text, "bad.yaml")
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    assert str(result.errors[0]).startswith(expected)
    # The valid document before the broken one still parses; the broken one is dropped.
    assert [o.name for o in result.objects if isinstance(o, Namespace)] == ["ok"] + (["x"] if "name: x" in text else [])


def test_errors_in_several_documents_are_all_reported() -> None:
    text = "kind: Pod\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: nope}\n"
    _, errors = parse_documents(text, "two.yaml")
    assert [str(e) for e in errors] == [
        "two.yaml:1: apiVersion: required field is missing",
        "two.yaml:6: Pod default/a: status.podIP: 'nope' is not an IP address",
    ]


# --- duplicates ----------------------------------------------------------------------------------------

NS_SHOP_POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n"


def test_duplicate_across_files_reported_on_second() -> None:
    other = "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n---\n" + NS_SHOP_POD
    result = parse_sources([("a.yaml", NS_SHOP_POD), ("b.yaml", other)])
    assert [str(e) for e in result.errors] == ["b.yaml:5: duplicate Pod shop/web (first defined at a.yaml:1)"]
    assert len(result.objects) == 2  # the first pod and the namespace


@pytest.mark.parametrize(
    "second",
    [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: other}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n",
    ],
    ids=["other-namespace", "other-kind"],
)
def test_same_name_is_not_a_duplicate(second: str) -> None:
    result = parse_sources([("a.yaml", NS_SHOP_POD), ("b.yaml", second)])
    assert result.errors == ()
    assert len(result.objects) == 2


def test_duplicate_within_one_file_and_cluster_scoped() -> None:
    ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n"
    _, errors = parse_documents(ns + "---\n" + ns, "x.yaml")
    assert [str(e) for e in errors] == ["x.yaml:5: duplicate Namespace n (first defined at x.yaml:1)"]


def test_two_live_pods_on_one_ip_is_an_error_but_host_network_and_failed_are_not() -> None:
    def doc(name: str, spec: str = "", phase: str = "") -> str:
        status = "status: {podIP: 10.0.0.5" + (f", phase: {phase}" if phase else "") + "}\n"
        return f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n{spec}{status}"

    ok = parse_sources(
        [
            ("a.yaml", doc("live")),
            ("b.yaml", doc("old", phase="Failed")),
            ("c.yaml", doc("host", spec="spec: {hostNetwork: true}\n")),
        ]
    )
    assert ok.errors == ()
    clash = parse_sources([("a.yaml", doc("one")), ("b.yaml", doc("two"))])
    assert [str(e) for e in clash.errors] == [
        "b.yaml:1: Pod default/two: pod IP already used by Pod default/one (a.yaml:1)"
    ]


# --- snapshot, PodDirectory ------------------------------------------------------------------------------


def make_pod(
    name: str,
    node: str,
    phase: str = "Running",
    sa: str = "app",
    pod_ips: tuple[str, ...] = (),
    host_network: bool = False,
) -> Pod:
    uid = default_uid("Pod", "shop", name)
    return Pod(ObjectMeta(name, "shop", uid), sa, node, pod_ips, phase, host_network)


def test_pod_directory_excludes_failed_pods() -> None:
    snap = RegistrySnapshot(
        [
            make_pod("a1", "node-a"),
            make_pod("a2", "node-a", phase="Pending"),
            make_pod("a3", "node-a", phase="Failed"),
            make_pod("a4", "node-a", phase="Succeeded"),
            make_pod("b1", "node-b"),
            make_pod("other-sa", "node-a", sa="cart"),
        ]
    )
    directory: PodDirectory = snap
    assert directory.get_pod("shop", "a1") == PodRef("shop", "a1", default_uid("Pod", "shop", "a1"), "app", "node-a")
    assert directory.get_pod("shop", "a3") is None  # Failed
    assert snap.pod("shop", "a3") is not None  # still visible to the registry itself
    assert directory.get_pod("shop", "missing") is None
    assert directory.get_pod("payments", "a1") is None
    assert directory.count_pods_on_node("shop", "app", "node-a") == 3  # a1, a2, a4; not a3
    assert directory.count_pods_on_node("shop", "app", "node-b") == 1
    assert directory.count_pods_on_node("shop", "cart", "node-a") == 1
    assert directory.count_pods_on_node("shop", "app", "node-c") == 0
    assert not directory.has_node("node-a")  # pods name nodes; only Node objects make them known
    assert RegistrySnapshot([Node(meta("node-a", kind="Node"))]).has_node("node-a")


def test_pod_by_ip_prefers_live_pod_network_pod() -> None:
    live = make_pod("live", "n", pod_ips=("10.0.0.5",))
    failed = make_pod("dead", "n", phase="Failed", pod_ips=("10.0.0.5",))
    host = make_pod("host", "n", host_network=True, pod_ips=("10.10.0.1",))
    v6 = make_pod("v6", "n", pod_ips=("10.0.0.6", "fd00::6"))
    snap = RegistrySnapshot([failed, live, host, v6])
    assert snap.pod_by_ip("10.0.0.5") is live
    assert snap.pods_by_ip("10.0.0.5") == (live, failed)
    assert snap.pod_by_ip("10.10.0.1") is host
    assert snap.pod_by_ip("fd00:0:0::6") is v6  # any spelling of the address
    assert snap.pod_by_ip("10.0.0.7") is None
    assert snap.pod_by_ip("not-an-ip") is None


def test_snapshot_accessors_digest_and_validation() -> None:
    objs = [make_pod("b", "n"), make_pod("a", "n"), Namespace(meta("shop", kind="Namespace"))]
    snap = RegistrySnapshot(objs)
    assert [p.name for p in snap.pods()] == ["a", "b"]
    assert [n.name for n in snap.namespaces()] == ["shop"]
    assert snap.namespace("shop") is objs[2]
    assert snap.services() == () and snap.authorization_policies() == ()
    assert RegistrySnapshot(reversed(objs)).digest == snap.digest  # order does not matter
    assert RegistrySnapshot(objs[:2]).digest != snap.digest
    with pytest.raises(ValueError, match="duplicate"):
        RegistrySnapshot([objs[0], objs[0]])
    with pytest.raises(TypeError):
        RegistrySnapshot(["not an object"])


async def test_registry_versions_and_watchers() -> None:
    registry = Registry()
    assert registry.current.version == 0
    waiter = asyncio.create_task(registry.wait_for_change(0))
    watched: list[int] = []

    async def watch() -> None:
        async for snap in registry.watch():
            watched.append(snap.version)
            if snap.version >= 1:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    assert not waiter.done()
    first = registry.replace([make_pod("a", "n")])
    assert first.version == 1
    assert (await asyncio.wait_for(waiter, 1)) is first
    await asyncio.wait_for(watcher, 1)
    assert watched == [0, 1]
    assert registry.replace([make_pod("a", "n")]) is first  # same content: no new version, no push
    assert registry.replace([]).version == 2
    assert (await registry.wait_for_change(1)).version == 2  # already newer: returns at once


# --- the example mesh --------------------------------------------------------------------------------------


def test_example_mesh_loads_cleanly() -> None:
    result = read_dir(EXAMPLES)
    assert [str(e) for e in result.errors] == []
    assert dict(result.skipped) == {}
    snap = RegistrySnapshot(result.objects, version=1)
    assert {n.name for n in snap.namespaces()} == {"istio-system", "shop", "payments"}
    assert {n.name: n.internal_ips for n in snap.nodes()} == {
        "node-a": ("10.10.0.1",),
        "node-b": ("10.10.0.2",),
    }
    assert {(s.namespace, s.name) for s in snap.service_accounts()} == {
        ("istio-system", "ztunnel"),
        ("shop", "frontend"),
        ("shop", "cart"),
        ("shop", "default"),
        ("payments", "ledger"),
        ("payments", "default"),
    }
    assert len(snap.pods()) == 8
    assert len(snap.services()) == 3 and len(snap.authorization_policies()) == 4
    assert [(p.namespace, p.mtls_mode) for p in snap.peer_authentications()] == [
        ("istio-system", "PERMISSIVE"),
        ("payments", "STRICT"),
    ]
    for pod in snap.pods():
        subnet = {"node-a": "10.244.1.", "node-b": "10.244.2."}[pod.node_name]
        assert pod.pod_ips and pod.pod_ips[0].startswith(subnet), pod.name
        assert snap.get(ServiceAccount, pod.namespace, pod.service_account) is not None, pod.name
    debug = snap.get_pod("shop", "debug")
    assert debug is not None and debug.service_account == "default" and debug.node_name == "node-b"
    assert snap.count_pods_on_node("istio-system", "ztunnel", "node-a") == 1
    assert snap.count_pods_on_node("istio-system", "ztunnel", "node-b") == 1
    ledger = snap.get(AuthorizationPolicy, "payments", "ledger-allow-cart")
    assert ledger is not None and ledger.rules[0].to[0].ports == (9000,)
    frontend = snap.get(Service, "shop", "frontend")
    assert frontend is not None and frontend.ports[0].port == 80 and frontend.cluster_ips == ("10.96.10.1",)


# --- folder loading and watching -----------------------------------------------------------------------

LogCapture = pytest.LogCaptureFixture
NS = "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n"


def test_load_dir_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.yaml").write_text(NS.format("b"))
    (tmp_path / "a.yml").write_text(NS.format("a"))
    # Tab-indented JSON (json.dumps(indent="\t")) is valid JSON that plain PyYAML rejects.
    (tmp_path / "sub" / "c.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}, indent="\t")
    )
    (tmp_path / ".hidden" / "d.yaml").write_text(NS.format("a"))  # would be a duplicate if read
    (tmp_path / "notes.txt").write_text("not: [yaml")
    objects, errors = load_dir(tmp_path)
    assert errors == []
    assert [o.name for o in objects] == ["a", "b", "c"]


def test_load_dir_unreadable_file_and_missing_dir(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(NS.format("ok"))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    os.symlink(tmp_path / "gone.yaml", tmp_path / "dangling.yaml")
    objects, errors = load_dir(tmp_path)
    assert [o.name for o in objects] == ["ok"]
    texts = sorted(str(e) for e in errors)
    assert texts[0].startswith(f"{tmp_path / 'binary.yaml'}:0: cannot read file:")
    assert texts[1] == f"{tmp_path / 'dangling.yaml'}:0: cannot read file: No such file or directory"
    with pytest.raises(FileNotFoundError, match="registry config directory does not exist"):
        load_dir(tmp_path / "nope")


async def test_load_initial_raises_with_every_error(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(NS.format("ok") + "---\nkind: Pod\n")
    source = FileRegistrySource(tmp_path, Registry())
    with pytest.raises(RegistryLoadError) as info:
        await source.load_initial()
    assert [str(e) for e in info.value.errors] == [f"{tmp_path / 'bad.yaml'}:5: apiVersion: required field is missing"]
    assert f"{tmp_path / 'bad.yaml'}:5: apiVersion" in str(info.value)
    with pytest.raises(RegistryLoadError, match="does not exist"):
        await FileRegistrySource(tmp_path / "missing", Registry()).load_initial()


async def test_file_source_watches_and_keeps_last_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "ns.yaml").write_text(NS.format("one"))
    registry = Registry()
    # no rescan within the test: every change below is seen through the folder's events (inotify)
    source = FileRegistrySource(tmp_path, registry, rescan_interval=600)
    first = await source.load_initial()
    assert [n.name for n in first.namespaces()] == ["one"]
    task = asyncio.create_task(source.run())
    try:
        # A change is picked up.
        (tmp_path / "ns.yaml").write_text(NS.format("one") + "---\n" + NS.format("two"))
        second = await asyncio.wait_for(registry.wait_for_change(first.version), 2)
        assert [n.name for n in second.namespaces()] == ["one", "two"]

        # A broken file: last good snapshot stays, errors are exposed and logged as file:line.
        (tmp_path / "pod.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus:\n  podIP: x\n")
        await eventually(lambda: source.last_errors, within=2.0, what="the reload's errors", every=0.01)
        broken = f"{tmp_path / 'pod.yaml'}:5: Pod default/p: status.podIP: 'x' is not an IP address"
        assert [str(e) for e in source.last_errors] == [broken]
        assert registry.current is second
        assert broken in caplog.text

        # Fixed: a new snapshot with the pod, errors cleared.
        (tmp_path / "pod.yaml").write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus:\n  podIP: 10.0.0.9\n"
        )
        third = await asyncio.wait_for(registry.wait_for_change(second.version), 2)
        assert third.pod_by_ip("10.0.0.9") is not None
        assert source.last_errors == ()

        # A removed file removes its objects.
        (tmp_path / "pod.yaml").unlink()
        fourth = await asyncio.wait_for(registry.wait_for_change(third.version), 2)
        assert fourth.pods() == () and fourth.digest == second.digest
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_change_reads_only_the_files_that_changed_and_applies_only_their_objects(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"ns-{i:02}.yaml").write_text(NS.format(f"ns-{i}") + "---\n" + NS.format(f"other-{i}"))
    registry = Registry()
    source = FileRegistrySource(tmp_path, registry, rescan_interval=600)
    await source.load_initial()
    assert source.last_read == 20
    version = registry.current.version
    assert not await source.poll_once() and source.last_read == 0  # nothing moved: nothing read
    (tmp_path / "ns-07.yaml").write_text(NS.format("ns-7") + "---\n" + NS.format("renamed-7"))
    assert await source.poll_once()
    assert source.last_read == 1
    assert registry.changes_since(version) == {("Namespace", "", "other-7"), ("Namespace", "", "renamed-7")}
    (tmp_path / "ns-08.yaml").unlink()
    version = registry.current.version
    assert await source.poll_once() and source.last_read == 0
    assert registry.changes_since(version) == {("Namespace", "", "ns-8"), ("Namespace", "", "other-8")}


async def test_a_file_caught_empty_mid_write_keeps_its_objects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # an in-place write (open with O_TRUNC, then write) looked at between the two: no byte, yet no intent to delete
    path = tmp_path / "ns.yaml"
    path.write_text(NS.format("one") + "---\n" + NS.format("two"))
    registry = Registry()
    source = FileRegistrySource(tmp_path, registry, rescan_interval=600)
    first = await source.load_initial()
    path.write_text("")
    with caplog.at_level("INFO", logger="ztcore.mesh.registry.files"):
        assert not await source.poll_once() and not await source.poll_once()
    assert registry.current is first and source.last_errors == ()
    assert caplog.text.count("is empty; its objects stay") == 1  # once per emptying, not per look
    path.write_text(NS.format("one") + "---\n" + NS.format("three"))  # the write lands
    assert await source.poll_once()
    assert registry.changes_since(first.version) == {("Namespace", "", "two"), ("Namespace", "", "three")}
    # emptied by a rename (an atomic write, a ConfigMap swap): meant, so the objects go at once
    second = registry.current
    write_atomic(path, b"")
    assert await source.poll_once()
    assert registry.changes_since(second.version) == {("Namespace", "", "one"), ("Namespace", "", "three")}


async def test_a_file_left_empty_drops_its_objects_after_the_settle_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "EMPTY_SETTLE", 0.2)
    path = tmp_path / "ns.yaml"
    path.write_text(NS.format("one"))
    (tmp_path / "other.yaml").write_text(NS.format("kept"))
    registry = Registry()
    source = FileRegistrySource(tmp_path, registry, rescan_interval=600)
    first = await source.load_initial()
    task = asyncio.create_task(source.run())
    try:
        path.write_text("")  # meant: the watch sees it at once, and the objects go one settle time later
        t0 = asyncio.get_running_loop().time()
        second = await asyncio.wait_for(registry.wait_for_change(first.version), 5)
        assert asyncio.get_running_loop().time() - t0 >= 0.2
        assert [n.name for n in second.namespaces()] == ["kept"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- incremental snapshots ------------------------------------------------------------------------------------


_pod_changes = st.lists(
    st.tuples(
        st.sampled_from(("put", "put", "delete")),
        st.builds(
            lambda i, ns, sa, node, ip, phase, host: Pod(
                ObjectMeta(f"p{i}", ns),
                service_account=sa,
                node_name=node,
                pod_ips=(f"10.0.0.{ip}",) if ip else (),
                phase=phase,
                host_network=host,
            ),
            st.integers(0, 4),
            st.sampled_from(("a", "b")),
            st.sampled_from(("x", "y")),
            st.sampled_from(("n1", "n2")),
            st.integers(0, 3),
            st.sampled_from(("Running", "Failed")),
            st.booleans(),
        ),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(_pod_changes)
def test_an_applied_change_indexes_like_a_snapshot_built_from_scratch(steps: list[tuple[str, Pod]]) -> None:
    registry = Registry([Namespace(ObjectMeta("a")), Namespace(ObjectMeta("b"))])
    for action, pod in steps:
        version = registry.current.version
        before = registry.current
        registry.apply([pod] if action == "put" else [], [pod.key] if action == "delete" else [])
        current = registry.current
        fresh = RegistrySnapshot(current.objects())
        assert current.objects() == fresh.objects() and current.pods() == fresh.pods()
        assert current.digest == fresh.digest
        for ip in (f"10.0.0.{n}" for n in range(4)):
            assert current.pods_by_ip(ip) == fresh.pods_by_ip(ip)
        for ns in ("a", "b"):
            for sa in ("x", "y"):
                for node in ("n1", "n2"):
                    assert current.pods_by_account_on_node(ns, sa, node) == fresh.pods_by_account_on_node(ns, sa, node)
        # the change log names exactly the keys whose content changed
        expected = {k for k in before.keys() | current.keys() if before.get_key(k) != current.get_key(k)}
        assert registry.changes_since(version) == expected
        assert before.version == version  # the previous snapshot is untouched


# --- the folder, file by file ---------------------------------------------------------------------------------

_DOC = st.sampled_from(
    [NS.format("a"), NS.format("b")]
    + [
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: a}}\nstatus: {{podIP: 10.0.0.{ip}}}\n"
        for i in range(3)
        for ip in range(3)
    ]
    + ["apiVersion: v1\nkind: Pod\nmetadata: {name: p0, namespace: a}\nspec: {hostNetwork: true}\n"]
    + ["apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: a}\nspec: {nodeName: [1]}\n"]
)
_FOLDER_STEPS = st.lists(
    st.tuples(st.sampled_from(("f0.yaml", "f1.yaml", "f2.yaml")), st.none() | st.lists(_DOC, max_size=3)),
    min_size=1,
    max_size=12,
)


_POD = "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: a}}\nstatus: {{podIP: 10.0.0.{}}}\n"


@settings(max_examples=150, deadline=None)
@given(_FOLDER_STEPS)
# an object moves to another file through a moment where both hold it
@example([("f1.yaml", [NS.format("a")]), ("f0.yaml", [])])
# a second pod takes an IP, then the first lets go of it
@example(
    [("f1.yaml", [_POD.format("p1", 0)]), ("f0.yaml", [_POD.format("p0", 0)]), ("f1.yaml", [_POD.format("p1", 1)])]
)
def test_the_folder_source_ends_where_a_fresh_read_of_the_folder_does(
    steps: list[tuple[str, list[str] | None]],
) -> None:
    """Files written and deleted at random (duplicate objects across and within files, pods claiming one IP,
    objects moving between files, invalid documents): after each look, the registry holds exactly what a
    fresh read of the folder holds, or, when the folder has errors, what it held before, with the same
    errors a fresh read reports."""
    import tempfile

    async def run() -> None:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            write_atomic(root / "f0.yaml", NS.format("a").encode())
            registry = Registry()
            source = FileRegistrySource(root, registry, rescan_interval=600)
            await source.load_initial()
            for name, docs in steps:
                if docs is None:
                    (root / name).unlink(missing_ok=True)
                else:
                    write_atomic(root / name, "---\n".join(docs).encode())
                before = registry.current
                await source.poll_once()
                fresh = read_dir(root)
                assert source.last_errors == fresh.errors
                if fresh.errors:
                    assert registry.current is before
                else:
                    assert registry.current.objects() == RegistrySnapshot(fresh.objects).objects()

    asyncio.run(run())
