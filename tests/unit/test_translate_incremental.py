"""The incremental translation equals a from-scratch `translate()` after every change, and reports exactly the
outputs that changed.

Hypothesis drives random change sequences over a small universe of objects that touches every dependency
`translate()` has: pods (labels, phase, IPs, node, host network), namespaces (enrollment), nodes (locality),
services (selector, ExternalName, named target ports), EndpointSlices (pod refs and external endpoints),
AuthorizationPolicies (selector or not, root namespace, CUSTOM) and PeerAuthentications (mesh, namespace,
workload, port-level), each added, replaced or deleted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ztcore.mesh.registry.objects import (
    AuthorizationPolicy,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    FrozenMap,
    Namespace,
    Node,
    ObjectMeta,
    ObjectReference,
    PeerAuthentication,
    Pod,
    RegistryObject,
    Rule,
    Service,
    ServicePort,
    Source,
)
from ztcore.mesh.registry.store import Registry
from ztcore.mesh.translate import TranslateOptions, Translation, translate
from ztcore.mesh.translate.incremental import IncrementalTranslation

ROOT = "istio-system"
NAMESPACES = (ROOT, "a", "b")
APPS = ("x", "y")


def labels(**kv: str) -> FrozenMap[str, str]:
    return FrozenMap(sorted(kv.items()))


def namespace(name: str, ambient: bool) -> Namespace:
    return Namespace(ObjectMeta(name, labels=labels(**({"istio.io/dataplane-mode": "ambient"} if ambient else {}))))


def node(name: str, zone: str) -> Node:
    zones = {"topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": zone} if zone else {}
    return Node(ObjectMeta(name, labels=labels(**zones)))


pods = st.builds(
    lambda i, ns, app, version, mode, phase, host, node_name, ip: Pod(
        ObjectMeta(f"p{i}", ns, uid=f"uid-p{i}-{ns}",
                   labels=labels(app=app, version=version, **({"istio.io/dataplane-mode": mode} if mode else {}))),
        service_account=app,
        node_name=node_name,
        pod_ips=(f"10.0.{i}.{ip}",) if ip else (),
        phase=phase,
        host_network=host,
        container_ports=(ContainerPort(8080, "http"),),
    ),
    st.integers(0, 2), st.sampled_from(("a", "a", "b", ROOT)), st.sampled_from(APPS), st.sampled_from(("v1", "v2")),
    st.sampled_from(("", "", "ambient", "none")), st.sampled_from(("Running", "Running", "Pending", "Succeeded")),
    st.sampled_from((False, False, True)), st.sampled_from(("n1", "n2", "")), st.sampled_from((1, 2, 0)),
)  # fmt: skip

services = st.builds(
    lambda i, ns, selector, external, named: Service(
        ObjectMeta(f"s{i}", ns),
        selector=labels(app=selector) if selector else FrozenMap(),
        cluster_ips=(f"10.96.{i}.1",),
        ports=(ServicePort(80, "http" if named else 8080, "http"),),
        type="ExternalName" if external else "ClusterIP",
    ),
    st.integers(0, 1), st.sampled_from(("a", "a", "b", ROOT)), st.sampled_from(("", "", *APPS)),
    st.sampled_from((False, False, True)), st.booleans(),
)  # fmt: skip

slices = st.builds(
    lambda i, ns, svc, pod_ref, external: EndpointSlice(
        ObjectMeta(f"e{i}", ns, labels=labels(**{"kubernetes.io/service-name": f"s{svc}"})),
        address_type="IPv4",
        endpoints=(
            *((Endpoint((f"10.0.{pod_ref}.1",), ObjectReference("Pod", f"p{pod_ref}", ns)),) if pod_ref >= 0 else ()),
            *((Endpoint((f"192.168.{i}.{external}",)),) if external else ()),
        ),
        ports=(EndpointPort(8080, "http"),),
    ),
    st.integers(0, 1), st.sampled_from(("a", "a", "b", ROOT)), st.integers(0, 1), st.integers(-1, 2),
    st.integers(0, 2),
)  # fmt: skip

policies = st.builds(
    lambda i, ns, selector, action, rules: AuthorizationPolicy(
        ObjectMeta(f"ap{i}", ns),
        selector=labels(app=selector) if selector else None,
        action=action,
        rules=rules,
        provider="ext" if action == "CUSTOM" else None,
    ),
    st.integers(0, 3), st.sampled_from(NAMESPACES), st.sampled_from(("", *APPS)),
    st.sampled_from(("ALLOW", "DENY", "AUDIT", "CUSTOM")),
    st.sampled_from(((), (Rule(),), (Rule(from_=(Source(principals=("cluster.local/ns/a/sa/x",)),)),))),
)  # fmt: skip

peer_auths = st.builds(
    lambda i, ns, selector, mode, port_mode: PeerAuthentication(
        ObjectMeta(f"pa{i}", ns),
        selector=labels(app=selector) if selector else None,
        mtls_mode=mode,
        port_level_mtls=FrozenMap(((8080, port_mode),)) if port_mode and selector else FrozenMap(),
    ),
    st.integers(0, 2), st.sampled_from(NAMESPACES), st.sampled_from(("", *APPS)),
    st.sampled_from(("UNSET", "DISABLE", "PERMISSIVE", "STRICT")), st.sampled_from(("", "DISABLE", "STRICT")),
)  # fmt: skip

namespaces = st.builds(namespace, st.sampled_from(NAMESPACES), st.booleans())
nodes = st.builds(node, st.sampled_from(("n1", "n2")), st.sampled_from(("", "z1", "z2")))

objects = st.one_of(pods, services, slices, policies, peer_auths, namespaces, nodes)
# a change: put an object (add or replace), or delete whatever has the key of a generated one
changes = st.lists(st.tuples(st.sampled_from(("put", "put", "put", "delete")), objects), min_size=1, max_size=40)


def by_name(t: Translation) -> dict[str, dict[str, Any]]:
    return {
        "addresses": {**{w.uid: w for w in t.workloads}, **{s.key: s for s in t.services}},
        "authorizations": {a.key: a for a in t.authorizations},
    }


def diff(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


POD = Pod(ObjectMeta("p1", "a", labels=labels(app="x")), node_name="n1", pod_ips=("10.0.1.1",),
          container_ports=(ContainerPort(8080, "http"),))  # fmt: skip
SVC = Service(ObjectMeta("s0", "a"), cluster_ips=("10.96.0.1",), ports=(ServicePort(80, "http", "http"),))
SLICE = EndpointSlice(
    ObjectMeta("e0", "a", labels=labels(**{"kubernetes.io/service-name": "s0"})), address_type="IPv4",
    endpoints=(Endpoint(("10.0.1.1",), ObjectReference("Pod", "p1", "a")), Endpoint(("192.168.0.1",))),
    ports=(EndpointPort(8080, "http"),),
)  # fmt: skip
# Each dependency at least once, whatever the random search finds: the last step of each must fan out.
DEPENDENCIES = [
    [("put", POD), ("put", SVC), ("put", SLICE)],  # a slice naming a pod gives it a service
    [("put", POD), ("put", SLICE), ("put", SVC), ("put", dataclasses.replace(SVC, type="ExternalName"))],
    [("put", POD), ("put", namespace("a", False))],  # enrollment
    [("put", POD), ("put", node("n1", "z1"))],  # locality
    [("put", POD), ("put", AuthorizationPolicy(ObjectMeta("ap0", ROOT), selector=labels(app="x"), rules=(Rule(),)))],
    [("put", POD), ("put", PeerAuthentication(ObjectMeta("pa0", ROOT), mtls_mode="STRICT"))],
    [
        ("put", POD),
        (
            "put",
            PeerAuthentication(
                ObjectMeta("pa0", "a"),
                selector=labels(app="x"),
                mtls_mode="STRICT",
                port_level_mtls=FrozenMap(((8080, "DISABLE"),)),
            ),
        ),
    ],
    [("put", POD), ("put", SVC), ("delete", SVC), ("delete", POD)],
]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes)
@example(DEPENDENCIES[0])
@example(DEPENDENCIES[1])
@example(DEPENDENCIES[2])
@example(DEPENDENCIES[3])
@example(DEPENDENCIES[4])
@example(DEPENDENCIES[5])
@example(DEPENDENCIES[6])
@example(DEPENDENCIES[7])
def test_every_step_equals_a_full_translation_and_names_exactly_what_changed(
    steps: list[tuple[str, RegistryObject]],
) -> None:
    options = TranslateOptions()
    registry = Registry([namespace(ns, ns != ROOT) for ns in NAMESPACES])
    incremental = IncrementalTranslation(options)
    incremental.reset(registry.current)
    previous = translate(registry.current, options)
    assert incremental.translation() == previous
    for action, obj in steps:
        before_version = registry.current.version
        if action == "put":
            registry.apply([obj])
        else:
            registry.apply([], [obj.key])
        changed = registry.changes_since(before_version)
        assert changed is not None
        delta = incremental.update(registry.current, changed)
        full = translate(registry.current, options)
        assert incremental.translation() == full, (action, obj.key)
        old, new = by_name(previous), by_name(full)
        assert delta.addresses == diff(old["addresses"], new["addresses"]), (action, obj.key)
        assert delta.authorizations == diff(old["authorizations"], new["authorizations"]), (action, obj.key)
        assert delta.messages == (previous.messages != full.messages)
        previous = full


def test_a_pod_edit_rebuilds_only_that_pods_workload() -> None:
    """What the cost model promises: one pod changed, one workload rebuilt, even with thousands around."""
    objs: list[RegistryObject] = [namespace("a", True), node("n1", "z1")]
    for i in range(2000):
        meta = ObjectMeta(f"pod-{i}", "a", labels=labels(app="x"))
        objs.append(Pod(meta, node_name="n1", pod_ips=(f"10.1.{i // 250}.{i % 250}",)))
    registry = Registry(objs)
    incremental = IncrementalTranslation()
    incremental.reset(registry.current)
    version = registry.current.version
    registry.apply([Pod(ObjectMeta("pod-7", "a", labels=labels(app="y")), node_name="n1", pod_ips=("10.1.0.7",))])
    delta = incremental.update(registry.current, registry.changes_since(version) or ())
    assert incremental.rebuilt == 1
    assert delta.addresses == {"Kubernetes//Pod/a/pod-7"} and not delta.authorizations
