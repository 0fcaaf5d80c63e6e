"""L4 authorization decisions, evaluated exactly as ztunnel evaluates them (src/state.rs, src/rbac.rs).

Pure: no IO, no clock. The policies that apply to a destination workload are the NAMESPACE-scoped ones of
its namespace, every GLOBAL one, and those its `authorization_policies` list names (whatever their scope).
Then: any matching DENY denies; otherwise no ALLOW policy means allow; otherwise a matching ALLOW allows;
otherwise deny. Dry-run policies are evaluated and reported but never change the decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ztcore.identity import Identity
from ztcore.model.authz import Action, Authorization, IPAddress, Match, Scope
from ztcore.model.workload import Workload

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Connection:
    """An inbound connection as the destination ztunnel sees it."""

    src_identity: Identity | None  # None: plaintext, the caller presented no certificate
    src_ip: IPAddress | None  # None: unknown; source-IP conditions then never match (as a missing identity)
    dst_ip: IPAddress
    dst_port: int
    dst_workload: Workload


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str | None  # "<namespace>/<name>" of the deciding policy; None when the default decided
    reason: str
    # What dry-run policies would have done, for the operator; never part of the decision.
    dry_run: tuple[str, ...] = ()
    # Names the workload references that are not in the policy set (ztunnel skips them with a warning).
    unknown_policies: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return "ALLOW" if self.allowed else "DENY"


class PolicyIndex:
    """Policies by key and by the namespace they apply to implicitly (GLOBAL ones under ""), as ztunnel's
    policy store indexes them. Build once per policy set and reuse it for many evaluations."""

    __slots__ = ("_by_key", "_by_namespace")

    def __init__(self, policies: Iterable[Authorization]) -> None:
        by_key: dict[str, Authorization] = {}
        by_namespace: dict[str, list[str]] = {}
        for pol in policies:
            by_key[pol.key] = pol
        for key in sorted(by_key):
            pol = by_key[key]
            if pol.scope is Scope.GLOBAL:
                by_namespace.setdefault("", []).append(key)
            elif pol.scope is Scope.NAMESPACE:
                by_namespace.setdefault(pol.namespace, []).append(key)
        self._by_key = by_key
        self._by_namespace = {ns: tuple(keys) for ns, keys in by_namespace.items()}

    def get(self, key: str) -> Authorization | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)

    def applicable(self, workload: Workload) -> tuple[list[Authorization], tuple[str, ...]]:
        """(policies in ztunnel's order: namespace, global, workload-listed; names that were not found)."""
        keys = (
            *self._by_namespace.get(workload.namespace, ()),
            *self._by_namespace.get("", ()),
            *workload.authorization_policies,
        )
        found: list[Authorization] = []
        unknown: list[str] = []
        for key in keys:
            pol = self._by_key.get(key)
            if pol is None:
                unknown.append(key)
            else:
                found.append(pol)
        return found, tuple(unknown)


def evaluate(policies: PolicyIndex | Iterable[Authorization], conn: Connection) -> Decision:
    index = policies if isinstance(policies, PolicyIndex) else PolicyIndex(policies)
    applicable, unknown = index.applicable(conn.dst_workload)
    enforced = [p for p in applicable if not p.dry_run]
    shadow = [p for p in applicable if p.dry_run]
    allow = [p for p in enforced if p.action is Action.ALLOW]
    deny = [p for p in enforced if p.action is Action.DENY]
    notes = _dry_run_notes(shadow, bool(allow), conn)
    target = f"{conn.dst_workload.namespace}/{conn.dst_workload.name}"

    def decide(allowed: bool, policy: str | None, reason: str) -> Decision:
        return Decision(allowed, policy, reason, notes, unknown)

    for pol in deny:
        if matches(pol, conn):
            return decide(False, pol.key, f"DENY policy {pol.key} matched")
    if not allow:
        return decide(True, None, f"no ALLOW policy applies to {target}")
    for pol in allow:
        if matches(pol, conn):
            return decide(True, pol.key, f"ALLOW policy {pol.key} matched")
    names = ", ".join(sorted({p.key for p in allow}))
    return decide(False, None, f"no ALLOW policy matched ({names})")


def _dry_run_notes(shadow: Sequence[Authorization], has_enforced_allow: bool, conn: Connection) -> tuple[str, ...]:
    notes: list[str] = []
    dry_allows = [p for p in shadow if p.action is Action.ALLOW]
    allow_matched = False
    for pol in shadow:
        if matches(pol, conn):
            notes.append(f"dry-run {pol.action.name} policy {pol.key} matched")
            allow_matched = allow_matched or pol.action is Action.ALLOW
    if dry_allows and not has_enforced_allow and not allow_matched:
        # Allowed today only because no ALLOW policy is enforced; enforcing the dry-run ones would deny.
        notes.append("dry-run: no ALLOW policy matched; enforcing the dry-run policies would deny")
    return tuple(notes)


def matches(policy: Authorization, conn: Connection) -> bool:
    """Whether any group of the policy matches the connection (no groups: never)."""
    identity = conn.src_identity
    principal = identity.uri if identity is not None else ""
    namespace = identity.namespace if identity is not None else ""
    for group in policy.groups:
        if all(_rules_match(rules.matches, conn, principal, namespace) for rules in group.rules):
            return True
    return False


def _rules_match(alternatives: Sequence[Match], conn: Connection, principal: str, namespace: str) -> bool:
    if not alternatives:
        return True  # an entry with no matches constrains nothing
    return any(not m.is_empty() and _match(m, conn, principal, namespace) for m in alternatives)


def _match(m: Match, conn: Connection, principal: str, namespace: str) -> bool:
    identity = conn.src_identity
    src_ip = conn.src_ip
    return (
        _field(m.destination_ips, m.not_destination_ips, lambda c: c.contains(conn.dst_ip))
        and _field(m.source_ips, m.not_source_ips, lambda c: src_ip is not None and c.contains(src_ip))
        and _field(m.destination_ports, m.not_destination_ports, lambda p: p == conn.dst_port)
        and _field(
            m.service_accounts,
            m.not_service_accounts,
            lambda sa: (
                identity is not None
                and sa.namespace == identity.namespace
                and sa.service_account == identity.service_account
            ),
        )
        and _field(m.principals, m.not_principals, lambda s: _principal_matches(s.matches, principal))
        and _field(m.namespaces, m.not_namespaces, lambda s: s.matches(namespace))
    )


def _principal_matches(check: Callable[[str], bool], principal: str) -> bool:
    # Istio principals are SPIFFE ids without the scheme; no identity (empty) never matches, not even "*".
    prefix = "spiffe://"
    if not principal.startswith(prefix):
        return False
    return check(principal[len(prefix) :])


def _field(positive: Sequence[T], negative: Sequence[T], predicate: Callable[[T], bool]) -> bool:
    """Any positive value must match (if there are any) and no negative value may."""
    if positive and not any(predicate(v) for v in positive):
        return False
    return not (negative and any(predicate(v) for v in negative))
