"""The RBAC evaluator (ztcore/envoy/rbac_eval.py) over filters built from the envoy_rbac golden cases."""

from __future__ import annotations

from functools import cache

import pytest

from tests.support.rbac_cases import GOLDEN, OPTIONS, ROOT_NAMESPACE, Options, load
from ztcore.envoy import rbac
from ztcore.envoy.rbac_eval import Request, evaluate_http, evaluate_tcp

FOO_SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
BAR_CLIENT = "spiffe://cluster.local/ns/bar/sa/client"


@cache
def built(case: str) -> rbac.RbacFilters:
    pod, policies = load((GOLDEN / f"{case}-in.yaml").read_text(), case)
    assert pod is not None
    opts = OPTIONS.get(case, Options())
    applied = rbac.policies_for(policies, pod.namespace, pod.labels, ROOT_NAMESPACE)
    return rbac.build(applied, trust_domain=opts.trust_domain, trust_domain_aliases=opts.aliases)


def http(
    principal: str | None = FOO_SLEEP, method: str = "GET", path: str = "/", port: int = 8080, **kw: object
) -> Request:
    return Request("10.0.0.5", "10.244.0.7", port, principal, method=method, path=path, **kw)  # type: ignore[arg-type]


def tcp(
    principal: str | None = FOO_SLEEP, port: int = 5432, source_ip: str = "10.0.0.5", remote_ip: str | None = None
) -> Request:
    return Request(source_ip, "10.244.0.7", port, principal, remote_ip=remote_ip)


HTTP_CASES = [
    # (case, request, allowed, deciding policy or None)
    ("allow-principal", http(FOO_SLEEP), True, None),
    ("allow-principal", http("spiffe://cluster.local/ns/foo/sa/blocked"), False, None),
    ("allow-principal", http(None), False, None),  # plaintext never matches an authenticated principal
    ("allow-namespace", http(BAR_CLIENT), True, None),
    ("allow-namespace", http("spiffe://cluster.local/ns/team-a/sa/x"), True, None),
    ("allow-namespace", http("spiffe://cluster.local/ns/team-untrusted/sa/x"), False, None),
    ("allow-namespace", http("spiffe://cluster.local/ns/other/sa/x"), False, None),
    ("deny-and-allow", http(BAR_CLIENT, path="/admin/users"), False, "ns[foo]-policy[deny-admin]-rule[0]"),
    ("deny-and-allow", http(BAR_CLIENT, path="/api?admin/x"), True, None),  # the query is not the path
    ("deny-and-allow", http(None), False, "ns[foo]-policy[deny-plaintext]-rule[0]"),
    ("deny-and-allow", http(FOO_SLEEP), False, None),  # not denied, but no ALLOW matches
    ("allow-nothing", http(FOO_SLEEP), False, None),
    ("allow-all", http(None), True, None),
    ("audit", http(FOO_SLEEP, method="POST"), True, None),  # LOG never enforces
    ("audit", http("spiffe://cluster.local/ns/bad/sa/x"), False, "ns[foo]-policy[deny-bad]-rule[0]"),
    ("dry-run", http(FOO_SLEEP, method="DELETE"), True, None),  # the dry-run DENY is only a shadow
    ("dry-run", http(BAR_CLIENT), False, None),  # the dry-run ALLOW does not let bar in
    ("operations", http(None, path="/exact", host="api.example.com", headers=(("X-Tenant", "acme"),)), True, None),
    ("operations", http(None, path="/private/x", host="api.example.com", headers=(("x-tenant", "acme"),)), False, None),
    ("operations", http(None, method="TRACE", headers=(("x-tenant", "acme"),)), False, None),
    ("operations", http(None, method="POST", headers=(("x-tenant", "evil"),)), False, None),
    ("operations", http(None, method="POST", headers=(("x-tenant", "beta-1"),)), True, None),
    ("operations", http(None, path="/exact", host="internal.example.com", headers=(("x-tenant", "a"),)), False, None),
    ("operations", http(None, path="/exact", port=9090, headers=(("x-tenant", "a"),)), False, None),
    (
        "custom-fail-closed",
        http(FOO_SLEEP, path="/admin/x"),
        False,
        "istio-ext-authz-my-ext-authz-ns[foo]-policy[ext-authz]-rule[0]-deny-due-to-bad-CUSTOM-action",
    ),
    ("custom-fail-closed", http(FOO_SLEEP, path="/admin/x", port=9000), True, None),
    (
        "mesh-wide-root",
        http("spiffe://cluster.local/ns/quarantine/sa/x"),
        False,
        "ns[istio-system]-policy[mesh-deny]-rule[0]",
    ),
    ("mesh-wide-root", http(FOO_SLEEP, port=15000), False, "ns[istio-system]-policy[root-selected]-rule[0]"),
    ("mesh-wide-root", http(FOO_SLEEP), True, None),
    ("trust-domain-aliases", http("spiffe://old.example/ns/bar/sa/a"), True, None),
    ("trust-domain-aliases", http("spiffe://cluster.local/ns/bar/sa/a"), False, None),  # rewritten to local TDs
    ("trust-domain-aliases", http("spiffe://anything/ns/bar/sa/d"), True, None),
    ("service-accounts-and-jwt", http(FOO_SLEEP), True, None),
    ("service-accounts-and-jwt", http("spiffe://cluster.local/ns/bar/sa/blocked"), False, None),
    ("service-accounts-and-jwt", http("spiffe://cluster.local/ns/bar/sa/client-other"), False, None),
]


@pytest.mark.parametrize(("case", "request_", "allowed", "policy"), HTTP_CASES)
def test_http(case: str, request_: Request, allowed: bool, policy: str | None) -> None:
    decision = evaluate_http(built(case).http, request_)
    assert (decision.allowed, decision.policy) == (allowed, policy), decision.reason


TCP_CASES = [
    ("tcp-allow-http-only", tcp("spiffe://cluster.local/ns/ops/sa/x"), True, None),
    ("tcp-allow-http-only", tcp(BAR_CLIENT), False, None),  # its rule has methods: left out on TCP
    (
        "tcp-deny-http-only",
        tcp("spiffe://cluster.local/ns/bar/sa/legacy", port=5432),
        False,
        "ns[foo]-policy[deny-mixed]-rule[0]",
    ),
    ("tcp-deny-http-only", tcp(FOO_SLEEP), False, "ns[foo]-policy[deny-mixed]-rule[1]"),  # hosts-only: any
    ("ip-blocks", tcp(None, source_ip="10.0.0.1", remote_ip="192.168.5.5"), True, None),
    ("ip-blocks", tcp(None, source_ip="10.1.2.3", remote_ip="192.168.5.5"), False, None),  # notIpBlocks
    ("ip-blocks", tcp(None, source_ip="10.1.9.9", remote_ip="192.168.5.5"), True, None),
    ("ip-blocks", tcp(None, source_ip="10.1.9.9", remote_ip="192.168.1.1"), False, None),  # notRemoteIpBlocks
    ("ip-blocks", tcp(None, source_ip="10.1.9.9"), False, None),  # no XFF: the peer is not in remoteIpBlocks
    ("ip-blocks", tcp(None, source_ip="172.16.0.1", remote_ip="192.168.5.5"), False, None),
    ("allow-principal", tcp(FOO_SLEEP), True, None),
]


@pytest.mark.parametrize(("case", "request_", "allowed", "policy"), TCP_CASES)
def test_tcp(case: str, request_: Request, allowed: bool, policy: str | None) -> None:
    decision = evaluate_tcp(built(case).tcp, request_)
    assert (decision.allowed, decision.policy) == (allowed, policy), decision.reason


def test_audit_and_dry_run_are_reported_not_enforced() -> None:
    audit = evaluate_http(built("audit").http, http(FOO_SLEEP, method="PUT"))
    assert audit.allowed and audit.logged == ("ns[foo]-policy[audit-writes]-rule[0]",)
    dry = evaluate_http(built("dry-run").http, http(FOO_SLEEP, method="DELETE"))
    assert dry.allowed and "deny ns[foo]-policy[dry-deny]-rule[0]" in dry.shadow


def test_http_evaluation_needs_a_method() -> None:
    with pytest.raises(ValueError, match="method"):
        evaluate_http(built("allow-all").http, tcp())
