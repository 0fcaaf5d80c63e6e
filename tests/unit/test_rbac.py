"""ztunnel-faithful L4 evaluation (ztcore.rbac): the cases of ztunnel's src/rbac.rs tests, then the
policy selection and DENY/ALLOW/default order of src/state.rs assert_rbac, dry-run, and the model's edge."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.istio.security import authorization_pb2 as pb
from ztcore.identity import Identity
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
from ztcore.model.workload import Workload
from ztcore.rbac import Connection, PolicyIndex, evaluate, matches


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


def workload(namespace: str = "namespace", policies: tuple[str, ...] = (), name: str = "dst") -> Workload:
    return Workload(uid=f"//Pod/{namespace}/{name}", name=name, namespace=namespace, authorization_policies=policies)


def conn(
    identity: Identity | None,
    src: str = "127.0.0.1",
    dst: str = "127.0.0.2",
    port: int = 8080,
    dst_workload: Workload | None = None,
) -> Connection:
    return Connection(identity, ip(src), ip(dst), port, dst_workload or workload())


PLAINTEXT = conn(None)
TLS = conn(Identity("td", "namespace", "account"))
TLS_ALT = conn(Identity("td-alt", "ns-alt", "sa=alt"), src="127.0.0.3", dst="127.0.0.4", port=9090)


def allow_policy(*groups: Group, name: str = "pol") -> Authorization:
    return Authorization(name, "namespace", Scope.GLOBAL, Action.ALLOW, groups)


def one(m: Match) -> Authorization:
    return allow_policy(Group((Rules((m,)),)))


# --- rbac.rs: structure ---------------------------------------------------------------------------------------


def test_empty_policy_shapes() -> None:
    # A group whose only entry holds an empty Match: the Match is skipped, so the entry never holds.
    assert not matches(allow_policy(Group((Rules((Match(),)),))), PLAINTEXT)
    # An entry with no matches constrains nothing; a group with no entries matches everything.
    assert matches(allow_policy(Group((Rules(()),))), PLAINTEXT)
    assert matches(allow_policy(Group(())), PLAINTEXT)
    # No groups at all: never matches.
    assert not matches(allow_policy(), PLAINTEXT)


def test_nesting_entries_are_anded_and_matches_ored() -> None:
    pol = allow_policy(
        Group(
            (
                Rules((Match(namespaces=(StringMatch.exact("a"),)), Match(namespaces=(StringMatch.exact("b"),)))),
                Rules((Match(destination_ports=(80,)),)),
            )
        )
    )

    def c(ns: str, port: int) -> Connection:
        return conn(Identity("td", ns, "account"), port=port)

    assert matches(pol, c("a", 80))
    assert matches(pol, c("b", 80))
    assert not matches(pol, c("bad", 80))  # wrong namespace
    assert not matches(pol, c("b", 12345))  # wrong port


def test_multi_group_any_group_matches() -> None:
    pol = allow_policy(
        Group((Rules((Match(namespaces=(StringMatch.exact("a"),)),)),)),
        Group((Rules((Match(namespaces=(StringMatch.exact("b"),)),)),)),
    )
    assert matches(pol, conn(Identity("td", "a", "account"), port=80))
    assert matches(pol, conn(Identity("td", "b", "account"), port=80))
    assert not matches(pol, conn(Identity("td", "bad", "account"), port=80))


# --- rbac.rs: one field at a time (plaintext, tls, tls_alt) -----------------------------------------------------

SA = ServiceAccountMatch("namespace", "account")
FIELD_CASES = [
    ("namespaces", (StringMatch.exact("namespace"),), (False, True, False)),
    ("not_namespaces", (StringMatch.exact("namespace"),), (True, False, True)),
    ("service_accounts", (SA,), (False, True, False)),
    ("not_service_accounts", (SA,), (True, False, True)),
    ("principals", (StringMatch.exact("td/ns/namespace/sa/account"),), (False, True, False)),
    ("not_principals", (StringMatch.exact("td/ns/namespace/sa/account"),), (True, False, True)),
    ("source_ips", (Cidr(ip("127.0.0.1"), 32),), (True, True, False)),
    ("not_source_ips", (Cidr(ip("127.0.0.1"), 32),), (False, False, True)),
    ("destination_ips", (Cidr(ip("127.0.0.2"), 32),), (True, True, False)),
    ("not_destination_ips", (Cidr(ip("127.0.0.2"), 32),), (False, False, True)),
    ("destination_ips", (Cidr(ip("127.0.0.1"), 24),), (True, True, True)),  # cidr_range
    ("destination_ports", (8080,), (True, True, False)),
    ("not_destination_ports", (8080,), (False, False, True)),
]


@pytest.mark.parametrize(
    ("field", "values", "expected"), FIELD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FIELD_CASES)]
)
def test_single_field(field: str, values: tuple[Any, ...], expected: tuple[bool, bool, bool]) -> None:
    pol = one(Match(**{field: values}))
    assert (matches(pol, PLAINTEXT), matches(pol, TLS), matches(pol, TLS_ALT)) == expected


@pytest.mark.parametrize(
    ("matcher", "value", "expected"),
    [
        (StringMatch.exact("foo"), "foo", True),
        (StringMatch.exact("foo"), "not", False),
        (StringMatch.exact("foo"), "", False),
        (StringMatch.prefix("foo"), "foobar", True),
        (StringMatch.prefix("foo"), "notfoo", False),
        (StringMatch.prefix("foo"), "", False),
        (StringMatch.suffix("foo"), "barfoo", True),
        (StringMatch.suffix("foo"), "foonot", False),
        (StringMatch.suffix("foo"), "", False),
        (StringMatch.presence(), "foo", True),
        (StringMatch.presence(), "", False),
    ],
)
def test_string_match(matcher: StringMatch, value: str, expected: bool) -> None:
    assert matcher.matches(value) is expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*", StringMatch.presence()),
        ("*.example", StringMatch.suffix(".example")),
        ("ns-*", StringMatch.prefix("ns-")),
        ("*mid*", StringMatch.suffix("mid*")),  # Istio tests the leading star first
        ("exact", StringMatch.exact("exact")),
        ("", StringMatch.exact("")),
    ],
)
def test_istio_string_syntax(pattern: str, expected: StringMatch) -> None:
    assert StringMatch.from_istio(pattern) == expected


def test_principals_are_matched_without_the_spiffe_scheme() -> None:
    prefix = one(Match(principals=(StringMatch.prefix("td/ns/namespace/"),)))
    assert matches(prefix, TLS)
    # A prefix that includes the scheme never matches: the scheme is stripped before matching.
    assert not matches(one(Match(principals=(StringMatch.prefix("spiffe://td/"),))), TLS)
    # No identity: even "*" (presence) does not match, and notPrincipals "*" does.
    assert not matches(one(Match(principals=(StringMatch.presence(),))), PLAINTEXT)
    assert matches(one(Match(not_principals=(StringMatch.presence(),))), PLAINTEXT)
    assert not matches(one(Match(not_principals=(StringMatch.presence(),))), TLS)


def test_service_account_ignores_trust_domain_and_needs_identity() -> None:
    pol = one(Match(service_accounts=(ServiceAccountMatch("namespace", "account"),)))
    assert matches(pol, conn(Identity("other-td", "namespace", "account")))
    assert not matches(pol, conn(Identity("td", "namespace", "other")))
    assert not matches(pol, PLAINTEXT)


def test_fields_of_one_match_are_anded() -> None:
    pol = one(Match(namespaces=(StringMatch.exact("namespace"),), destination_ports=(9999,)))
    assert not matches(pol, TLS)
    assert matches(pol, conn(Identity("td", "namespace", "account"), port=9999))


def test_cidr_families_and_unknown_source_ip() -> None:
    v6 = one(Match(source_ips=(Cidr(ip("fd00::"), 8),)))
    assert matches(v6, conn(None, src="fd00::1"))
    assert not matches(v6, conn(None, src="127.0.0.1"))  # IPv4 never falls in an IPv6 prefix
    # Host bits are kept as written and ignored for containment.
    assert Cidr.parse("10.1.2.3/8").contains(ip("10.200.0.1"))
    unknown = dataclasses.replace(PLAINTEXT, src_ip=None)
    assert not matches(one(Match(source_ips=(Cidr(ip("127.0.0.1"), 32),))), unknown)
    assert matches(one(Match(not_source_ips=(Cidr(ip("127.0.0.1"), 32),))), unknown)


# --- state.rs assert_rbac: selection and order -------------------------------------------------------------


def policy(name: str, ns: str, scope: Scope, action: Action, *groups: Group, dry_run: bool = False) -> Authorization:
    return Authorization(name, ns, scope, action, groups, dry_run)


MATCH_ALL = Group(())
PORT_80 = Group((Rules((Match(destination_ports=(80,)),)),))


def test_no_policies_allows_by_default() -> None:
    d = evaluate([], TLS)
    assert (d.allowed, d.policy, d.verdict) == (True, None, "ALLOW")
    assert d.reason == "no ALLOW policy applies to namespace/dst"


def test_deny_wins_over_a_matching_allow() -> None:
    pols = [
        policy("allow", "namespace", Scope.NAMESPACE, Action.ALLOW, MATCH_ALL),
        policy("deny", "namespace", Scope.NAMESPACE, Action.DENY, MATCH_ALL),
    ]
    d = evaluate(pols, TLS)
    assert (d.allowed, d.policy, d.reason) == (False, "namespace/deny", "DENY policy namespace/deny matched")


def test_allow_match_and_default_deny() -> None:
    pols = [policy("port-80", "namespace", Scope.NAMESPACE, Action.ALLOW, PORT_80)]
    assert evaluate(pols, conn(None, port=80)).policy == "namespace/port-80"
    d = evaluate(pols, conn(None, port=81))
    assert (d.allowed, d.policy) == (False, None)
    assert d.reason == "no ALLOW policy matched (namespace/port-80)"


def test_allow_nothing_policy_denies_everyone() -> None:
    d = evaluate([policy("nothing", "namespace", Scope.NAMESPACE, Action.ALLOW)], TLS)
    assert (d.allowed, d.policy) == (False, None)


def test_policy_selection_by_scope() -> None:
    pols = [
        policy("other-ns", "elsewhere", Scope.NAMESPACE, Action.DENY, MATCH_ALL),
        policy("selector", "namespace", Scope.WORKLOAD_SELECTOR, Action.DENY, MATCH_ALL),
        policy("mesh", "istio-system", Scope.GLOBAL, Action.ALLOW, PORT_80),
    ]
    index = PolicyIndex(pols)
    # Another namespace's policy and an unreferenced selector policy do not apply; the global one does.
    plain = workload()
    assert evaluate(index, conn(None, port=80, dst_workload=plain)).policy == "istio-system/mesh"
    assert not evaluate(index, conn(None, port=81, dst_workload=plain)).allowed
    # Listed by the workload: applies (whatever its scope).
    listed = workload(policies=("namespace/selector", "namespace/missing"))
    d = evaluate(index, conn(None, port=80, dst_workload=listed))
    assert (d.allowed, d.policy) == (False, "namespace/selector")
    assert d.unknown_policies == ("namespace/missing",)


def test_deny_order_is_namespace_then_global_then_workload() -> None:
    pols = [
        policy("by-workload", "namespace", Scope.WORKLOAD_SELECTOR, Action.DENY, MATCH_ALL),
        policy("global", "istio-system", Scope.GLOBAL, Action.DENY, MATCH_ALL),
        policy("ns", "namespace", Scope.NAMESPACE, Action.DENY, MATCH_ALL),
    ]
    target = workload(policies=("namespace/by-workload",))
    assert evaluate(pols, conn(None, dst_workload=target)).policy == "namespace/ns"
    assert evaluate(pols[:2], conn(None, dst_workload=target)).policy == "istio-system/global"


def test_static_strict_policy_rejects_plaintext_only() -> None:
    strict = policy(
        "istio_converted_static_strict",
        "istio-system",
        Scope.WORKLOAD_SELECTOR,
        Action.DENY,
        Group((Rules((Match(not_principals=(StringMatch.presence(),)),)),)),
    )
    target = workload(policies=(strict.key,))
    assert not evaluate([strict], conn(None, dst_workload=target)).allowed
    assert evaluate([strict], conn(Identity("td", "a", "b"), dst_workload=target)).allowed


def test_dry_run_policies_are_reported_not_enforced() -> None:
    dry_deny = policy("dry-deny", "namespace", Scope.NAMESPACE, Action.DENY, MATCH_ALL, dry_run=True)
    d = evaluate([dry_deny], TLS)
    assert (d.allowed, d.policy) == (True, None)
    assert d.dry_run == ("dry-run DENY policy namespace/dry-deny matched",)

    # A dry-run ALLOW does not turn on default-deny; the note says enforcing it would.
    dry_allow = policy("dry-allow", "namespace", Scope.NAMESPACE, Action.ALLOW, PORT_80, dry_run=True)
    d = evaluate([dry_allow], conn(None, port=81))
    assert (d.allowed, d.policy) == (True, None)
    assert d.dry_run == ("dry-run: no ALLOW policy matched; enforcing the dry-run policies would deny",)
    d = evaluate([dry_allow], conn(None, port=80))
    assert d.dry_run == ("dry-run ALLOW policy namespace/dry-allow matched",)

    # Alongside an enforced ALLOW, the decision is the enforced one.
    enforced = policy("allow", "namespace", Scope.NAMESPACE, Action.ALLOW, PORT_80)
    d = evaluate([dry_allow, enforced], conn(None, port=81))
    assert (d.allowed, d.policy, d.dry_run) == (False, None, ())


# --- the model at the proto edge --------------------------------------------------------------------------------


def test_unknown_enum_values_and_malformed_parts_at_the_edge() -> None:
    msg = pb.Authorization(name="p", namespace="ns", scope=pb.WORKLOAD_SELECTOR, action=pb.DENY)
    rules = msg.groups.add().rules.add()
    m = rules.matches.add()
    m.principals.add()  # no match type: dropped, as ztunnel does
    m.principals.add(exact="a/b")
    m.source_ips.add(address=b"\x01\x02\x03", length=8)  # 3 bytes: dropped
    m.source_ips.add(address=b"\x0a\x00\x00\x00", length=33)  # bad length: dropped
    m.source_ips.add(address=b"\x0a\x00\x00\x00", length=8)
    pol = Authorization.from_pb(msg)
    got = pol.groups[0].rules[0].matches[0]
    assert got.principals == (StringMatch.exact("a/b"),)
    assert got.source_ips == (Cidr(ip("10.0.0.0"), 8),)
    bad = pb.Authorization()
    bad.ParseFromString(b"\x18\x07")  # scope = 7, unknown to us
    with pytest.raises(ValueError, match="7 is not a valid Scope"):
        Authorization.from_pb(bad)


# --- properties ---------------------------------------------------------------------------------------------------

_strings = st.builds(StringMatch.from_istio, st.sampled_from(["*", "a*", "*b", "ab", "td/ns/a/sa/b", "a"]))
_cidrs = st.builds(
    Cidr,
    st.sampled_from([ip("10.0.0.1"), ip("10.0.0.0"), ip("fd00::1")]),
    st.sampled_from([0, 8, 32]),
).filter(lambda c: c.length <= c.address.max_prefixlen)
_sas = st.builds(ServiceAccountMatch, st.sampled_from(["a", "ns"]), st.sampled_from(["b", "sa"]))
_ports = st.sampled_from([80, 443, 8080])
_matches = st.builds(
    Match,
    namespaces=st.lists(_strings, max_size=2).map(tuple),
    not_namespaces=st.lists(_strings, max_size=1).map(tuple),
    service_accounts=st.lists(_sas, max_size=2).map(tuple),
    principals=st.lists(_strings, max_size=2).map(tuple),
    not_principals=st.lists(_strings, max_size=1).map(tuple),
    source_ips=st.lists(_cidrs, max_size=2).map(tuple),
    destination_ips=st.lists(_cidrs, max_size=1).map(tuple),
    destination_ports=st.lists(_ports, max_size=2).map(tuple),
    not_destination_ports=st.lists(_ports, max_size=1).map(tuple),
)
_policies = st.builds(
    Authorization,
    name=st.sampled_from(["p1", "p2"]),
    namespace=st.sampled_from(["a", "ns"]),
    scope=st.sampled_from(list(Scope)),
    action=st.sampled_from(list(Action)),
    groups=st.lists(
        st.builds(Group, st.lists(st.builds(Rules, st.lists(_matches, max_size=2).map(tuple)), max_size=2).map(tuple)),
        max_size=2,
    ).map(tuple),
    dry_run=st.booleans(),
)
_identities = st.one_of(
    st.none(), st.builds(Identity, st.just("td"), st.sampled_from(["a", "ns"]), st.sampled_from(["b", "sa"]))
)
_connections = st.builds(
    Connection,
    src_identity=_identities,
    src_ip=st.sampled_from([ip("10.0.0.7"), ip("192.168.0.1"), ip("fd00::7"), None]),
    dst_ip=st.sampled_from([ip("10.0.0.1"), ip("fd00::1")]),
    dst_port=_ports,
    dst_workload=st.just(workload("ns", ("ns/p1", "a/p2"))),
)


@settings(max_examples=60, deadline=None)
@given(_policies)
def test_proto_roundtrip_is_lossless(pol: Authorization) -> None:
    wire = pol.to_pb().SerializeToString()
    assert Authorization.from_pb(pb.Authorization.FromString(wire)) == pol


@settings(max_examples=60, deadline=None)
@given(_matches, _connections)
def test_negated_field_is_the_complement(m: Match, c: Connection) -> None:
    """For any single non-empty field, `not_X: v` matches exactly when `X: v` does not (ztunnel semantics)."""
    pairs = [
        ("namespaces", "not_namespaces"),
        ("principals", "not_principals"),
        ("service_accounts", "not_service_accounts"),
        ("source_ips", "not_source_ips"),
        ("destination_ips", "not_destination_ips"),
        ("destination_ports", "not_destination_ports"),
    ]
    for pos, neg in pairs:
        values = getattr(m, pos)
        if not values:
            continue
        assert matches(one(Match(**{pos: values})), c) is not matches(one(Match(**{neg: values})), c)


@settings(max_examples=80, deadline=None)
@given(st.lists(_policies, max_size=4), _connections)
def test_decision_invariants(pols: list[Authorization], c: Connection) -> None:
    d = evaluate(pols, c)
    applicable, _ = PolicyIndex(pols).applicable(c.dst_workload)
    enforced = [p for p in applicable if not p.dry_run]
    if any(p.action is Action.DENY and matches(p, c) for p in enforced):
        assert not d.allowed and d.policy is not None
    elif not any(p.action is Action.ALLOW for p in enforced):
        assert d.allowed and d.policy is None
    else:
        assert d.allowed == any(p.action is Action.ALLOW and matches(p, c) for p in enforced)
    if d.policy is not None:
        decider = next(p for p in enforced if p.key == d.policy)
        assert decider.action is (Action.ALLOW if d.allowed else Action.DENY)
