"""A whole registry snapshot -> everything ztunnel receives: workloads, services, policies (and statuses)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from ztcore.mesh.registry.objects import (
    EMPTY_LABELS,
    AuthorizationPolicy,
    EndpointSlice,
    Labels,
    Node,
    ObjectKey,
    PeerAuthentication,
)
from ztcore.mesh.registry.objects import Service as KubeService
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate.policies import (
    StatusMessage,
    convert_authorization_policy,
    convert_peer_authentications,
    peer_authentications_for_workload,
    workload_peer_authentication_keys,
)
from ztcore.mesh.translate.workloads import (
    NamespaceServices,
    SelectorPolicy,
    WorkloadSettings,
    build_endpoint_slice_workloads,
    build_pod_workload,
    build_service,
    pod_uid,
    selector_policy_keys,
)
from ztcore.model.authz import Authorization
from ztcore.model.workload import Service, Workload

ALLOW_ANY, REGISTRY_ONLY = "ALLOW_ANY", "REGISTRY_ONLY"  # meshConfig.outboundTrafficPolicy.mode values


@dataclass(frozen=True, slots=True)
class TranslateOptions:
    """Mesh settings translation depends on; defaults are istiod's."""

    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    network: str = ""
    domain_suffix: str = "cluster.local"
    root_namespace: str = "istio-system"  # meshConfig.rootNamespace: where mesh-wide policies live
    # istiod's AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY: send `istio.io/dry-run` policies as dry-run.
    dry_run_policies: bool = False
    # meshConfig.outboundTrafficPolicy.mode: where a sidecar sends traffic to a destination the registry does
    # not know (ALLOW_ANY: passed through; REGISTRY_ONLY: blackholed).
    outbound_traffic_policy: str = ALLOW_ANY

    @property
    def workload_settings(self) -> WorkloadSettings:
        return WorkloadSettings(
            self.cluster_id, self.trust_domain, self.network, self.domain_suffix, self.root_namespace
        )


@dataclass(frozen=True, slots=True)
class Translation:
    options: TranslateOptions
    workloads: tuple[Workload, ...]  # by uid
    services: tuple[Service, ...]  # by key
    authorizations: tuple[Authorization, ...]  # by key
    # ("ns/name", status) for AuthorizationPolicies not converted, or converted with a caveat.
    messages: tuple[tuple[str, StatusMessage], ...] = ()
    # The policy objects themselves, sorted by (namespace, name): Envoy sidecars enforce them at L7 and resolve
    # PeerAuthentication per port, which the ztunnel form above cannot carry. Not part of `to_dict()`.
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    # The registry snapshot translated (immutable), for what Envoy builders read beyond the outputs: pod labels
    # for policy selectors. Not compared: two translations of equal content are equal.
    source: RegistrySnapshot | None = field(default=None, compare=False, repr=False)

    def pod_labels(self, namespace: str, name: str) -> Labels:
        pod = self.source.pod(namespace, name) if self.source is not None else None
        return pod.labels if pod is not None else EMPTY_LABELS

    def pod_workload(self, namespace: str, name: str) -> Workload | None:
        uid = pod_uid(self.options.cluster_id, namespace, name)
        return next((w for w in self.workloads if w.uid == uid), None)

    def to_dict(self) -> dict[str, Any]:
        """Proto-JSON (the field names and encodings Istio's own YAML dumps use), for goldens and debugging."""
        addresses: list[dict[str, Any]] = []
        for w in self.workloads:
            addresses.append({"name": w.uid, "aliases": list(w.aliases()), "workload": _json(w.to_pb())})
        for s in self.services:
            addresses.append({"name": s.key, "aliases": list(s.aliases()), "service": _json(s.to_pb())})
        out: dict[str, Any] = {}
        if addresses:
            out["addresses"] = addresses
        if self.authorizations:
            out["authorizations"] = [_json(a.to_pb()) for a in self.authorizations]
        if self.messages:
            out["messages"] = {key: status.message for key, status in self.messages}
        return out


def _json(msg: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(msg)
    return result


def translate(snapshot: RegistrySnapshot, options: TranslateOptions | None = None) -> Translation:
    opts = options or TranslateOptions()
    settings = opts.workload_settings
    root = opts.root_namespace

    authorizations: list[Authorization] = []
    messages: list[tuple[str, StatusMessage]] = []
    selector_policies: list[SelectorPolicy] = []
    for ap in snapshot.authorization_policies():
        converted, status = convert_authorization_policy(ap, root, dry_run_enabled=opts.dry_run_policies)
        if status is not None:
            messages.append((f"{ap.namespace}/{ap.name}", status))
        if converted is None:
            continue
        authorizations.append(converted)
        if ap.selector:
            selector_policies.append(SelectorPolicy(converted.key, ap.namespace, ap.selector))
    peer_authentications = snapshot.peer_authentications()
    authorizations.extend(convert_peer_authentications(peer_authentications, root))

    kube_services = [s for s in snapshot.services() if s.type != "ExternalName"]
    services = [svc for s in kube_services if (svc := build_service(s, settings)) is not None]

    # Per-namespace indexes, so that each pod only looks at what can apply to it.
    slices_by_ns: dict[str, list[EndpointSlice]] = defaultdict(list)
    for es in snapshot.endpoint_slices():
        slices_by_ns[es.namespace].append(es)
    services_by_ns: dict[str, list[KubeService]] = defaultdict(list)
    for s in kube_services:
        services_by_ns[s.namespace].append(s)
    namespace_services: dict[str, NamespaceServices] = {}
    selector_policies_by_ns: dict[str, list[SelectorPolicy]] = defaultdict(list)
    for sp in selector_policies:
        selector_policies_by_ns[sp.namespace].append(sp)
    peer_authentications_by_ns: dict[str, list[PeerAuthentication]] = defaultdict(list)
    for pa in peer_authentications:
        peer_authentications_by_ns[pa.namespace].append(pa)
    mesh_peer_authentications = [pa for pa in peer_authentications_by_ns[root] if pa.selector is None]
    peer_keys: dict[tuple[ObjectKey, ...], tuple[str, ...]] = {}

    workloads: list[Workload] = []
    for pod in snapshot.pods():
        ns = pod.namespace
        if ns not in namespace_services:
            namespace_services[ns] = NamespaceServices.build(services_by_ns[ns], slices_by_ns[ns])
        candidates = [] if ns == root else mesh_peer_authentications
        applicable = peer_authentications_for_workload(
            [*candidates, *peer_authentications_by_ns[ns]], ns, pod.labels, root
        )
        cache_key = tuple(pa.key for pa in applicable)
        if cache_key not in peer_keys:
            peer_keys[cache_key] = workload_peer_authentication_keys(applicable, root)
        own_and_root = selector_policies_by_ns[ns] + (selector_policies_by_ns[root] if ns != root else [])
        node: Node | None = snapshot.get(Node, "", pod.node_name) if pod.node_name else None
        workload = build_pod_workload(
            pod,
            namespace=snapshot.namespace(ns),
            node=node,
            services=namespace_services[ns].for_pod(pod),
            policies=[*selector_policy_keys(pod.labels, own_and_root), *peer_keys[cache_key]],
            settings=settings,
        )
        if workload is not None:
            workloads.append(workload)
    for es in snapshot.endpoint_slices():
        owner = snapshot.get(KubeService, es.namespace, es.service_name) if es.service_name else None
        workloads.extend(build_endpoint_slice_workloads(es, owner, settings))

    return Translation(
        options=opts,
        workloads=tuple(sorted(workloads, key=lambda w: w.uid)),
        services=tuple(sorted(services, key=lambda s: s.key)),
        authorizations=tuple(sorted(authorizations, key=lambda a: a.key)),
        messages=tuple(sorted(messages, key=lambda m: m[0])),
        authorization_policies=snapshot.authorization_policies(),
        peer_authentications=peer_authentications,
        source=snapshot,
    )
