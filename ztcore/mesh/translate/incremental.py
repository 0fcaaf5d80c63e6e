"""`translate()`, kept current one registry change at a time, as istiod's krt collections keep theirs.

`IncrementalTranslation.update(snapshot, changed_keys)` recomputes only what depends on the changed objects
and returns the output names whose content changed. Dependencies (the same inputs `translate` reads):

- a pod's workload: the pod; its namespace (enrollment labels); its node (locality); its namespace's services
  and EndpointSlices; the selector AuthorizationPolicies of its namespace and of the root namespace; the
  PeerAuthentications of its namespace and the mesh-wide ones;
- a service: the Service only;
- an EndpointSlice's (non-pod) workloads: the slice and the Service that owns it;
- an AuthorizationPolicy's Authorization: the policy only; PeerAuthentication-derived ones: all
  PeerAuthentications (few, recomputed together).

So a pod edit rebuilds one workload; a Service, EndpointSlice or selector-policy edit rebuilds its namespace's
workloads (all of them when it is in the root namespace); a Node edit the workloads on that node. Rule-only
policy edits rebuild no workload: workloads name policies, they do not embed them. The result is always equal
to `translate()` of the same snapshot (tests/unit/test_translate_incremental.py drives random change
sequences and checks it after every step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ztcore.mesh.registry.objects import (
    AuthorizationPolicy,
    EndpointSlice,
    Namespace,
    Node,
    ObjectKey,
    PeerAuthentication,
    Pod,
)
from ztcore.mesh.registry.objects import Service as KubeService
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate.mesh import TranslateOptions, Translation
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
    build_endpoint_slice_workloads,
    build_pod_workload,
    build_service,
    selector_policy_keys,
)
from ztcore.model.authz import Authorization
from ztcore.model.workload import Service, Workload

T = TypeVar("T", Workload, Service)

_POD, _NS, _NODE, _SVC, _SLICE, _AP, _PA = (
    Pod.kind,
    Namespace.kind,
    Node.kind,
    KubeService.kind,
    EndpointSlice.kind,
    AuthorizationPolicy.kind,
    PeerAuthentication.kind,
)


@dataclass(frozen=True, slots=True)
class Delta:
    """Output names whose content changed (added, updated or removed) in one update."""

    addresses: frozenset[str] = frozenset()  # workload uids and service keys
    authorizations: frozenset[str] = frozenset()
    messages: bool = False  # the status messages changed

    @property
    def empty(self) -> bool:
        return not (self.addresses or self.authorizations or self.messages)


class TranslationOutputs:
    """One update's outputs, frozen (shallow copies: pointers only), readable while the next update runs."""

    __slots__ = (
        "_authorizations",
        "_messages",
        "_options",
        "_peer_authentications",
        "_policies",
        "_services",
        "_source",
        "_workloads",
    )

    def __init__(
        self,
        options: TranslateOptions,
        workloads: Mapping[str, Workload],
        services: Mapping[str, Service],
        authorizations: Mapping[str, Authorization],
        messages: Mapping[str, StatusMessage],
        policies: tuple[AuthorizationPolicy, ...] = (),
        peer_authentications: tuple[PeerAuthentication, ...] = (),
        source: RegistrySnapshot | None = None,
    ) -> None:
        self._source = source
        self._options = options
        self._policies = policies  # the snapshot's own (immutable, sorted) tuples
        self._peer_authentications = peer_authentications
        self._workloads = dict(workloads)
        self._services = dict(services)
        self._authorizations = dict(authorizations)
        self._messages = dict(messages)

    def status_messages(self) -> dict[str, StatusMessage]:
        """AuthorizationPolicies ztunnel does not get as written, by "namespace/name" (istiod's status)."""
        return dict(self._messages)

    def sizes(self) -> tuple[int, int, int]:
        return len(self._workloads), len(self._services), len(self._authorizations)

    def translation(self) -> Translation:
        """As `translate()` returns it: sorted tuples."""
        return Translation(
            options=self._options,
            workloads=tuple(self._workloads[k] for k in sorted(self._workloads)),
            services=tuple(self._services[k] for k in sorted(self._services)),
            authorizations=tuple(self._authorizations[k] for k in sorted(self._authorizations)),
            messages=tuple(sorted(self._messages.items())),
            authorization_policies=self._policies,
            peer_authentications=self._peer_authentications,
            source=self._source,
        )


@dataclass
class _Outputs:
    workloads: dict[str, Workload] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    authorizations: dict[str, Authorization] = field(default_factory=dict)


class IncrementalTranslation:
    """The translation of the latest snapshot, and indexes to update it by the keys that changed."""

    def __init__(self, options: TranslateOptions | None = None) -> None:
        self.options = options or TranslateOptions()
        self._settings = self.options.workload_settings
        self._root = self.options.root_namespace
        self.snapshot = RegistrySnapshot()
        # indexes over the snapshot
        self._pods_by_ns: dict[str, set[ObjectKey]] = defaultdict(set)
        self._pods_by_node: dict[str, set[ObjectKey]] = defaultdict(set)
        self._services_by_ns: dict[str, dict[str, KubeService]] = defaultdict(dict)  # non-ExternalName
        self._slices_by_ns: dict[str, dict[str, EndpointSlice]] = defaultdict(dict)
        self._slices_by_service: dict[tuple[str, str], set[ObjectKey]] = defaultdict(set)
        self._selector_policies: dict[str, dict[str, SelectorPolicy]] = defaultdict(dict)  # ns -> key -> policy
        # outputs by their source object
        self._pod_out: dict[ObjectKey, Workload] = {}
        self._slice_out: dict[ObjectKey, tuple[Workload, ...]] = {}
        self._service_out: dict[ObjectKey, Service] = {}
        self._policy_out: dict[ObjectKey, Authorization] = {}
        self._messages: dict[str, StatusMessage] = {}
        self._pa_out: tuple[Authorization, ...] = ()
        self._out = _Outputs()
        self._translation: Translation | None = None
        self.rebuilt = 0  # workloads the last update rebuilt (pods and slices): what a change cost

    # --- the result -----------------------------------------------------------------------------------------

    @property
    def workloads(self) -> Mapping[str, Workload]:
        return self._out.workloads

    @property
    def services(self) -> Mapping[str, Service]:
        return self._out.services

    @property
    def authorizations(self) -> Mapping[str, Authorization]:
        return self._out.authorizations

    def outputs(self) -> TranslationOutputs:
        """A frozen copy of the current outputs (cost: one pointer per output)."""
        return TranslationOutputs(
            self.options,
            self._out.workloads,
            self._out.services,
            self._out.authorizations,
            self._messages,
            self.snapshot.authorization_policies(),
            self.snapshot.peer_authentications(),
            self.snapshot,
        )

    def translation(self) -> Translation:
        """As `translate()` returns it (sorted); built once per update, when asked for."""
        if self._translation is None:
            self._translation = self.outputs().translation()
        return self._translation

    # --- updates --------------------------------------------------------------------------------------------

    def reset(self, snapshot: RegistrySnapshot) -> Delta:
        """Everything from scratch (the first snapshot, or after the change history was lost)."""
        old = self.snapshot
        keys = old.keys() | snapshot.keys()
        return self.update(snapshot, keys)

    def update(self, snapshot: RegistrySnapshot, changed: Iterable[ObjectKey]) -> Delta:
        """Bring the translation to `snapshot`, given the keys that changed since the previous one."""
        old, new = self.snapshot, snapshot
        changed = set(changed)
        by_kind: dict[str, list[ObjectKey]] = defaultdict(list)
        for key in changed:
            by_kind[key[0]].append(key)

        # 1. indexes first, so that fan-out below sees where pods are now (and were before)
        dirty_pods: set[ObjectKey] = set()
        for key in by_kind[_POD]:
            self._index_pod(old.get_key(key), new.get_key(key))
            dirty_pods.add(key)
        dirty_slices: set[ObjectKey] = set()
        for key in by_kind[_SVC]:
            self._index_service(key, new.get(KubeService, key[1], key[2]))
            dirty_pods |= self._pods_by_ns.get(key[1], set())
            dirty_slices |= self._slices_by_service.get((key[1], key[2]), set())
        for key in by_kind[_SLICE]:
            self._index_slice(key, old.get(EndpointSlice, key[1], key[2]), new.get(EndpointSlice, key[1], key[2]))
            dirty_pods |= self._pods_by_ns.get(key[1], set())
            dirty_slices.add(key)
        for key in by_kind[_NS]:
            dirty_pods |= self._pods_by_ns.get(key[2], set())
        for key in by_kind[_NODE]:
            dirty_pods |= self._pods_by_node.get(key[2], set())

        # 2. policies: their own outputs, and the workloads whose policy names they change
        messages_before = dict(self._messages)
        policy_names: set[str] = set()
        for key in by_kind[_AP]:
            namespaces = self._update_policy(key, new.get(AuthorizationPolicy, key[1], key[2]), policy_names)
            for ns in namespaces:
                dirty_pods |= self._pods_in(ns)
        if by_kind[_PA]:
            before = {a.key: a for a in self._pa_out}
            self._pa_out = convert_peer_authentications(new.peer_authentications(), self._root)
            after = {a.key: a for a in self._pa_out}
            policy_names |= {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            for key in by_kind[_PA]:
                dirty_pods |= self._pods_in(key[1])

        self.snapshot = new
        self._translation = None
        addresses: set[str] = set()

        # 3. services
        for key in by_kind[_SVC]:
            svc = new.get(KubeService, key[1], key[2])
            built = build_service(svc, self._settings) if svc is not None else None
            addresses |= _swap(self._service_out, self._out.services, key, built)

        # 4. the rebuilt workloads
        self.rebuilt = len(dirty_pods) + len(dirty_slices)
        namespace_services: dict[str, NamespaceServices] = {}
        for key in dirty_pods:
            pod = new.get(Pod, key[1], key[2])
            workload = self._pod_workload(pod, namespace_services) if pod is not None else None
            addresses |= _swap(self._pod_out, self._out.workloads, key, workload)
        for key in dirty_slices:
            addresses |= self._replace_slice(key, new)

        # 5. the policies as ztunnel receives them
        authorizations: set[str] = set()
        for name in policy_names:
            current = self._policy_by_name(name)
            if self._out.authorizations.get(name) != current:
                authorizations.add(name)
                if current is None:
                    del self._out.authorizations[name]
                else:
                    self._out.authorizations[name] = current
        return Delta(frozenset(addresses), frozenset(authorizations), self._messages != messages_before)

    # --- indexes ----------------------------------------------------------------------------------------------

    def _index_pod(self, old: object, new: object) -> None:
        if isinstance(old, Pod):
            self._pods_by_ns[old.namespace].discard(old.key)
            self._pods_by_node[old.node_name].discard(old.key)
        if isinstance(new, Pod):
            self._pods_by_ns[new.namespace].add(new.key)
            self._pods_by_node[new.node_name].add(new.key)

    def _index_service(self, key: ObjectKey, svc: KubeService | None) -> None:
        if svc is None or svc.type == "ExternalName":
            self._services_by_ns[key[1]].pop(key[2], None)
        else:
            self._services_by_ns[key[1]][key[2]] = svc

    def _index_slice(self, key: ObjectKey, old: EndpointSlice | None, new: EndpointSlice | None) -> None:
        if old is not None:
            self._slices_by_service[(old.namespace, old.service_name)].discard(key)
        if new is None:
            self._slices_by_ns[key[1]].pop(key[2], None)
        else:
            self._slices_by_ns[key[1]][key[2]] = new
            self._slices_by_service[(new.namespace, new.service_name)].add(key)

    def _pods_in(self, namespace: str) -> set[ObjectKey]:
        """The pods a namespace-wide input of `namespace` reaches: all of them for the root namespace."""
        if namespace == self._root:
            return {k for keys in self._pods_by_ns.values() for k in keys}
        return self._pods_by_ns.get(namespace, set())

    # --- per-output builders (the same calls, with the same inputs, as translate()) ---------------------------

    def _update_policy(self, key: ObjectKey, ap: AuthorizationPolicy | None, names: set[str]) -> set[str]:
        """Convert one AuthorizationPolicy; returns the namespaces whose workloads' policy lists may change."""
        ns, label = key[1], f"{key[1]}/{key[2]}"
        old = self._policy_out.pop(key, None)
        if old is not None:
            names.add(old.key)
        self._messages.pop(label, None)
        converted = None
        if ap is not None:
            converted, status = convert_authorization_policy(
                ap, self._root, dry_run_enabled=self.options.dry_run_policies
            )
            if status is not None:
                self._messages[label] = status
        if converted is not None:
            self._policy_out[key] = converted
            names.add(converted.key)
        selector = SelectorPolicy(converted.key, ns, ap.selector) if converted and ap and ap.selector else None
        previous = self._selector_policies[ns].pop(label, None)
        if selector is not None:
            self._selector_policies[ns][label] = selector
        return {ns} if previous != selector else set()

    def _policy_by_name(self, name: str) -> Authorization | None:
        """An AuthorizationPolicy's Authorization is "<namespace>/<name>" of it; the rest come from
        PeerAuthentications."""
        ns, _, rest = name.partition("/")
        found = self._policy_out.get((_AP, ns, rest))
        if found is not None:
            return found
        return next((a for a in self._pa_out if a.key == name), None)

    def _pod_workload(self, pod: Pod, namespace_services: dict[str, NamespaceServices]) -> Workload | None:
        snapshot, ns, root = self.snapshot, pod.namespace, self._root
        if ns not in namespace_services:
            namespace_services[ns] = NamespaceServices.build(
                sorted(self._services_by_ns[ns].values(), key=lambda s: s.key),
                sorted(self._slices_by_ns[ns].values(), key=lambda s: s.key),
            )
        pas = snapshot.peer_authentications()  # sorted, few
        mesh = [pa for pa in pas if pa.namespace == root and pa.selector is None] if ns != root else []
        applicable = peer_authentications_for_workload([*mesh, *(pa for pa in pas if pa.namespace == ns)], ns,
                                                       pod.labels, root)  # fmt: skip
        own_and_root = [*self._selector_policies[ns].values()]
        if ns != root:
            own_and_root += self._selector_policies[root].values()
        node = snapshot.get(Node, "", pod.node_name) if pod.node_name else None
        return build_pod_workload(
            pod,
            namespace=snapshot.namespace(ns),
            node=node,
            services=namespace_services[ns].for_pod(pod),
            policies=[*selector_policy_keys(pod.labels, own_and_root), *workload_peer_authentication_keys(
                applicable, root)],
            settings=self._settings,
        )  # fmt: skip

    def _replace_slice(self, key: ObjectKey, snapshot: RegistrySnapshot) -> set[str]:
        es = snapshot.get(EndpointSlice, key[1], key[2])
        built: tuple[Workload, ...] = ()
        if es is not None:
            owner = snapshot.get(KubeService, es.namespace, es.service_name) if es.service_name else None
            built = tuple(build_endpoint_slice_workloads(es, owner, self._settings))
        old = self._slice_out.pop(key, ())
        if built:
            self._slice_out[key] = built
        now = {w.uid: w for w in built}
        changed = set()
        for w in old:
            if w.uid not in now:
                self._out.workloads.pop(w.uid, None)
                changed.add(w.uid)
        for uid, w in now.items():
            if self._out.workloads.get(uid) != w:
                self._out.workloads[uid] = w
                changed.add(uid)
        return changed


def _swap(by_source: dict[ObjectKey, T], out: dict[str, T], key: ObjectKey, built: T | None) -> set[str]:
    """Swap one source object's output; the output names that changed."""
    old = by_source.pop(key, None)
    changed: set[str] = set()
    if old is not None and (built is None or _name(old) != _name(built)):
        out.pop(_name(old), None)
        changed.add(_name(old))
    if built is not None:
        by_source[key] = built
        if out.get(_name(built)) != built:
            out[_name(built)] = built
            changed.add(_name(built))
    return changed


def _name(out: Workload | Service) -> str:
    return out.uid if isinstance(out, Workload) else out.key
