"""AuthorizationPolicy and PeerAuthentication -> `Authorization`, following istiod's ambient converter.

Rules taken from Istio (pilot/pkg/serviceregistry/ambient/authorization.go, policies.go):

- Only ALLOW and DENY convert; AUDIT and CUSTOM get a status message and nothing is sent. Policies with
  targetRef(s) belong to waypoints and are skipped silently.
- Scope: a selector gives WORKLOAD_SELECTOR; none gives NAMESPACE, or GLOBAL in the root namespace.
- Each rule becomes a Group of: one Rules entry for all `to` operations, one for all `from` sources, one per
  `when` condition. HTTP-only attributes cannot be enforced at L4: an ALLOW rule using any is dropped
  (it could never match), a DENY rule keeps its L4 parts only, so a part that was HTTP-only becomes an
  empty Match that ztunnel skips.
- PeerAuthentication STRICT (mesh, namespace or workload) is enforced through one static DENY policy,
  `<root>/istio_converted_static_strict`, referenced by the workloads it applies to; a workload policy with
  port-level exceptions becomes its own DENY policy `converted_peer_authentication_<name>`. DISABLE is
  treated as PERMISSIVE (ambient cannot turn mTLS off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ztcore.mesh.registry.objects import AuthorizationPolicy, Condition, Operation, PeerAuthentication, Rule, Source
from ztcore.model.authz import (
    Action,
    Authorization,
    Cidr,
    Group,
    Match,
    Rules,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

T = TypeVar("T")

STATIC_STRICT_POLICY_NAME = "istio_converted_static_strict"  # "_" cannot appear in Kubernetes names
CONVERTED_PEER_AUTHENTICATION_PREFIX = "converted_peer_authentication_"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# `when` keys ztunnel can evaluate; any other key is an HTTP attribute.
L4_WHEN_KEYS = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")

_HTTP_RULE = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {consequence}"
)
_DENY_NO_EFFECT = (
    "After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at ztunnel "
    "and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce this policy."
)
_DENY_MIXED = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be more restrictive than requested."
)
_ALLOW_DROPPED = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested."
)
# Go's strconv.ParseBool, which istiod uses for the dry-run annotation.
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """Why a policy was not converted, or was converted differently from what it says (Istio's status)."""

    reason: str
    message: str


# --- AuthorizationPolicy --------------------------------------------------------------------------------------


def convert_authorization_policy(
    policy: AuthorizationPolicy, root_namespace: str, *, dry_run_enabled: bool = False
) -> tuple[Authorization | None, StatusMessage | None]:
    """The policy ztunnel should receive (None: none), and a status message for what could not be honoured.

    `dry_run_enabled` is istiod's AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY (off by default, since ztunnel
    before 1.29 would enforce a dry-run policy).
    """
    notes: list[str] = []
    dry_run = False
    raw = policy.meta.annotations.get(DRY_RUN_ANNOTATION, "")
    if raw in _GO_TRUE:
        dry_run = True
    elif raw and raw not in _GO_FALSE:
        # istiod logs this and enforces the policy; say so where the user looks.
        notes.append(f"annotation {DRY_RUN_ANNOTATION}={raw!r} is not a boolean; the policy is enforced")
    if dry_run and not dry_run_enabled:
        return None, StatusMessage(
            "UnsupportedValue",
            f'found policy "{policy.namespace}/{policy.name}" using dry-run annotation, '
            "but support for ambient dry-run authorizationPolicies isn't enabled",
        )
    if policy.has_target_ref:
        return None, None  # a waypoint enforces it
    if policy.action not in ("ALLOW", "DENY"):
        return None, StatusMessage("UnsupportedValue", f"ztunnel does not support the {policy.action} action")
    action = Action[policy.action]
    if policy.selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif policy.namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    groups: list[Group] = []
    http_found: set[str] = set()
    for rule in policy.rules:
        rules, found = _convert_rule(action, rule, policy.namespace)
        if rules is not None:
            groups.append(Group(rules))
        http_found.update(found)
    converted = Authorization(policy.name, policy.namespace, scope, action, tuple(groups), dry_run)
    if http_found:
        if action is Action.DENY and not has_effective_groups(converted.groups):
            consequence = _DENY_NO_EFFECT
        elif action is Action.DENY:
            consequence = _DENY_MIXED
        else:
            consequence = _ALLOW_DROPPED
        notes.append(_HTTP_RULE.format(found=", ".join(sorted(http_found)), consequence=consequence))
    status = StatusMessage("UnsupportedValue", "; ".join(notes)) if notes else None
    return converted, status


def has_effective_groups(groups: Sequence[Group]) -> bool:
    """Whether any group can ever match at ztunnel (a group whose entries are all empty Matches cannot)."""
    return any(all(any(not m.is_empty() for m in rules.matches) for rules in group.rules) for group in groups)


def _http_operations(op: Operation) -> list[str]:
    pairs = (
        ("hosts", op.hosts),
        ("notHosts", op.not_hosts),
        ("methods", op.methods),
        ("notMethods", op.not_methods),
        ("paths", op.paths),
        ("notPaths", op.not_paths),
    )
    return [name for name, values in pairs if values]


def _http_sources(src: Source) -> list[str]:
    # A Match has no trust-domain field, and folding one into principals would widen the source.
    pairs = (
        ("remoteIpBlocks", src.remote_ip_blocks),
        ("notRemoteIpBlocks", src.not_remote_ip_blocks),
        ("requestPrincipals", src.request_principals),
        ("notRequestPrincipals", src.not_request_principals),
        ("trustDomains", src.trust_domains),
        ("notTrustDomains", src.not_trust_domains),
    )
    return [name for name, values in pairs if values]


def _convert_rule(action: Action, rule: Rule, namespace: str) -> tuple[tuple[Rules, ...] | None, set[str]]:
    """(the rule's Rules entries, or None if the rule is dropped; the HTTP attributes it used)."""
    http_found: set[str] = set()
    to_matches: list[Match] = []
    for op in rule.to:
        http_found.update(_http_operations(op))
        to_matches.append(Match(destination_ports=_ports(op.ports), not_destination_ports=_ports(op.not_ports)))
    from_matches: list[Match] = []
    for src in rule.from_:
        http_found.update(_http_sources(src))
        from_matches.append(
            Match(
                source_ips=_cidrs(src.ip_blocks),
                not_source_ips=_cidrs(src.not_ip_blocks),
                namespaces=_strings(src.namespaces),
                not_namespaces=_strings(src.not_namespaces),
                service_accounts=_service_accounts(src.service_accounts, namespace),
                not_service_accounts=_service_accounts(src.not_service_accounts, namespace),
                principals=_strings(src.principals),
                not_principals=_strings(src.not_principals),
            )
        )
    rules: list[Rules] = []
    if to_matches:
        rules.append(Rules(tuple(to_matches)))
    if from_matches:
        rules.append(Rules(tuple(from_matches)))
    for cond in rule.when:
        if cond.key not in L4_WHEN_KEYS:
            http_found.add(cond.key)
        rules.append(Rules((_when_match(cond),)))
    if action is Action.ALLOW and http_found:
        return None, http_found  # an HTTP condition never holds at L4, so the rule never matches
    return tuple(rules), http_found


def _when_match(cond: Condition) -> Match:
    def pick(key: str, convert: Callable[[Sequence[str]], tuple[T, ...]], negate: bool) -> tuple[T, ...]:
        if cond.key != key:
            return ()
        return convert(cond.not_values if negate else cond.values)

    return Match(
        namespaces=pick("source.namespace", _strings, False),
        principals=pick("source.principal", _strings, False),
        source_ips=pick("source.ip", _cidrs, False),
        destination_ports=pick("destination.port", _port_strings, False),
        destination_ips=pick("destination.ip", _cidrs, False),
        not_namespaces=pick("source.namespace", _strings, True),
        not_principals=pick("source.principal", _strings, True),
        not_source_ips=pick("source.ip", _cidrs, True),
        not_destination_ports=pick("destination.port", _port_strings, True),
        not_destination_ips=pick("destination.ip", _cidrs, True),
    )


def _strings(values: Sequence[str]) -> tuple[StringMatch, ...]:
    return tuple(StringMatch.from_istio(v) for v in values)


def _service_accounts(values: Sequence[str], namespace: str) -> tuple[ServiceAccountMatch, ...]:
    """Each value is `ns/sa`, or a bare `sa` of the policy's own namespace."""
    out = []
    for v in values:
        ns, sep, sa = v.partition("/")
        out.append(ServiceAccountMatch(ns, sa) if sep else ServiceAccountMatch(namespace, v))
    return tuple(out)


def _ports(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(p for p in values if 0 <= p <= 65535)


def _port_strings(values: Sequence[str]) -> tuple[int, ...]:
    # Invalid values are skipped, as istiod does (the parser has already rejected them for our registry).
    return _ports([int(v) for v in values if v.isdigit()])


def _cidrs(values: Sequence[str]) -> tuple[Cidr, ...]:
    out = []
    for v in values:
        try:
            out.append(Cidr.parse(v))
        except ValueError:
            continue  # skipped, as istiod does
    return tuple(out)


# --- PeerAuthentication ---------------------------------------------------------------------------------------


def _mode(pa: PeerAuthentication | None) -> str:
    return "UNSET" if pa is None else pa.mtls_mode


def _strict(pa: PeerAuthentication | None) -> bool:
    return _mode(pa) == "STRICT"


def _unset(pa: PeerAuthentication | None) -> bool:
    return _mode(pa) == "UNSET"


def _relaxed(mode: str) -> bool:
    return mode in ("PERMISSIVE", "DISABLE")


def _not_principals_presence() -> Match:
    return Match(not_principals=(StringMatch.presence(),))


def static_strict_policy(root_namespace: str) -> Authorization:
    """DENY any connection without a peer identity; referenced by every workload under effective STRICT."""
    group = Group((Rules((_not_principals_presence(),)),))
    return Authorization(STATIC_STRICT_POLICY_NAME, root_namespace, Scope.WORKLOAD_SELECTOR, Action.DENY, (group,))


def converted_peer_authentication_name(name: str) -> str:
    return CONVERTED_PEER_AUTHENTICATION_PREFIX + name


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    # istiod picks the oldest by creationTimestamp; the registry has none, so the name order decides.
    ordered = sorted(policies, key=lambda p: (p.namespace, p.name))
    return ordered[0] if ordered else None


def convert_peer_authentication(
    pa: PeerAuthentication,
    namespace_pa: PeerAuthentication | None,
    root_pa: PeerAuthentication | None,
    root_namespace: str,
) -> Authorization | None:
    """The DENY policy carrying a workload PeerAuthentication's port-level modes, or None if none is needed.

    `namespace_pa` and `root_pa` are the effective namespace-wide and mesh-wide policies (or None).
    """
    if pa.namespace == root_namespace or pa.selector is None or not pa.port_level_mtls:
        return None
    mode = pa.mtls_mode
    rules: list[Rules] = []
    groups: list[Group] = []
    if mode == "STRICT":
        rules.append(Rules((_not_principals_presence(),)))
    found_relaxed_port = False
    for port, port_mode in sorted(pa.port_level_mtls.items()):
        if port_mode == "STRICT":
            # Istio's condition, grouped as Go groups it: the mesh-wide clause is not conditioned on the
            # workload mode being UNSET.
            parent_strict = _strict(pa) or (
                (_unset(pa) and namespace_pa is not None and _strict(namespace_pa))
                or ((namespace_pa is None or _unset(namespace_pa)) and root_pa is not None and _strict(root_pa))
            )
            if parent_strict:
                continue  # the parent policy already enforces it
            strict_port = Match(not_principals=(StringMatch.presence(),), destination_ports=(port,))
            groups.append(Group((Rules((strict_port,)),)))
        elif _relaxed(port_mode):
            if _relaxed(mode):
                continue
            if mode == "UNSET" and (
                (namespace_pa is not None and not _strict(namespace_pa))
                or (namespace_pa is None and root_pa is not None and not _strict(root_pa))
                or (namespace_pa is None and root_pa is None)
            ):
                continue  # the effective mode is not STRICT, so the exception changes nothing
            found_relaxed_port = True
            # Deny unless the connection is to this port (which has no identity requirement).
            rules.append(Rules((Match(not_destination_ports=(port,)),)))
    if mode == "STRICT" and not found_relaxed_port:
        return None  # plain STRICT: the static strict policy covers it
    if not rules and not groups:
        return None
    merge_strict = (
        root_pa is not None
        and _strict(root_pa)
        and (namespace_pa is None or _unset(namespace_pa) or _strict(namespace_pa))
    ) or (namespace_pa is not None and _strict(namespace_pa))
    if merge_strict and found_relaxed_port:
        # The workload must not also reference the static strict policy (any DENY wins), so carry it here.
        rules.append(Rules((_not_principals_presence(),)))
    if rules:
        groups.append(Group(tuple(rules)))
    return Authorization(
        converted_peer_authentication_name(pa.name), pa.namespace, Scope.WORKLOAD_SELECTOR, Action.DENY, tuple(groups)
    )


def convert_peer_authentications(
    peer_authentications: Sequence[PeerAuthentication], root_namespace: str
) -> tuple[Authorization, ...]:
    """Every policy PeerAuthentications produce: the static strict one (if any PeerAuthentication exists)
    and one per workload policy with port-level modes that need it."""
    if not peer_authentications:
        return ()
    namespace_wide: dict[str, list[PeerAuthentication]] = {}
    for pa in peer_authentications:
        if pa.selector is None:
            namespace_wide.setdefault(pa.namespace, []).append(pa)
    out = [static_strict_policy(root_namespace)]
    for pa in sorted(peer_authentications, key=lambda p: (p.namespace, p.name)):
        converted = convert_peer_authentication(
            pa,
            _oldest(namespace_wide.get(pa.namespace, ())),
            _oldest(namespace_wide.get(root_namespace, ())),
            root_namespace,
        )
        if converted is not None:
            out.append(converted)
    return tuple(out)


def peer_authentications_for_workload(
    peer_authentications: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str,
) -> list[PeerAuthentication]:
    """Those that may apply to a workload: the mesh-wide ones, and its namespace's whole-namespace or
    selecting ones."""

    def applies(pa: PeerAuthentication) -> bool:
        if pa.namespace == root_namespace and pa.selector is None:
            return True
        if pa.namespace != namespace:
            return False
        return pa.selector is None or all(labels.get(k) == v for k, v in pa.selector.items())

    return [pa for pa in peer_authentications if applies(pa)]


def workload_peer_authentication_keys(applicable: Sequence[PeerAuthentication], root_namespace: str) -> tuple[str, ...]:
    """Names of the PeerAuthentication-derived policies a workload must reference, given those that apply
    to it (see peer_authentications_for_workload): the static strict one when the effective mode is
    STRICT, and the workload policy's converted form when it has port-level exceptions."""
    mesh: list[PeerAuthentication] = []
    namespace_wide: list[PeerAuthentication] = []
    workload: list[PeerAuthentication] = []
    for pa in applicable:
        if not pa.selector:  # no selector, or an empty one: whole namespace (or mesh)
            (mesh if pa.namespace == root_namespace else namespace_wide).append(pa)
        elif pa.namespace != root_namespace:
            workload.append(pa)
    mesh_pa, namespace_pa, workload_pa = _oldest(mesh), _oldest(namespace_wide), _oldest(workload)

    strict = False
    if mesh_pa is not None:
        strict = _strict(mesh_pa)
    if namespace_pa is not None and not _unset(namespace_pa):
        strict = _strict(namespace_pa)
    port_level_key = ""
    if workload_pa is not None:
        own_key = f"{workload_pa.namespace}/{converted_peer_authentication_name(workload_pa.name)}"
        mode = workload_pa.mtls_mode
        port_modes = list(workload_pa.port_level_mtls.values())
        if mode == "STRICT":
            strict = True
        elif _relaxed(mode):
            strict = False
        if port_modes:
            if mode == "STRICT":
                if any(_relaxed(m) for m in port_modes):
                    # The converted policy carries STRICT itself, with the exceptions.
                    port_level_key, strict = own_key, False
            elif _relaxed(mode):
                if "STRICT" in port_modes:
                    port_level_key = own_key
            elif strict:
                if "PERMISSIVE" in port_modes:
                    port_level_key, strict = own_key, False
            elif "STRICT" in port_modes:
                port_level_key = own_key
    keys = set()
    if strict:
        keys.add(f"{root_namespace}/{STATIC_STRICT_POLICY_NAME}")
    if port_level_key:
        keys.add(port_level_key)
    return tuple(sorted(keys))
