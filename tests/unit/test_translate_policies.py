"""AuthorizationPolicy/PeerAuthentication conversion details the goldens do not pin down on their own: which
PeerAuthentication-derived policies a workload references, dry-run spellings, statuses, and that every
converted policy behaves at evaluation time as the original policy says."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from ztcore.identity import Identity
from ztcore.mesh.registry.objects import AuthorizationPolicy, FrozenMap, ObjectMeta, PeerAuthentication
from ztcore.mesh.registry.parse import parse_text
from ztcore.mesh.translate.policies import (
    STATIC_STRICT_POLICY_NAME,
    convert_authorization_policy,
    convert_peer_authentications,
    has_effective_groups,
    peer_authentications_for_workload,
    workload_peer_authentication_keys,
)
from ztcore.model.authz import Action, Group, Match, Rules, Scope
from ztcore.model.workload import Workload
from ztcore.rbac import Connection, evaluate

ROOT = "istio-system"
STATIC = f"{ROOT}/{STATIC_STRICT_POLICY_NAME}"


def pa(
    name: str, ns: str, mode: str = "UNSET", selector: dict[str, str] | None = None, **ports: str
) -> PeerAuthentication:
    return PeerAuthentication(
        ObjectMeta(name, ns),
        FrozenMap(selector) if selector is not None else None,
        mode,
        FrozenMap({int(p.removeprefix("p")): m for p, m in ports.items()}),
    )


def keys(*pas: PeerAuthentication, ns: str = "foo", labels: dict[str, str] | None = None) -> tuple[str, ...]:
    applicable = peer_authentications_for_workload(pas, ns, labels or {"app": "a"}, ROOT)
    return workload_peer_authentication_keys(applicable, ROOT)


CONVERTED = "foo/converted_peer_authentication_w"


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        ((), ()),
        ((pa("m", ROOT, "STRICT"),), (STATIC,)),
        ((pa("m", ROOT, "PERMISSIVE"),), ()),
        ((pa("m", ROOT, "STRICT"), pa("n", "foo", "PERMISSIVE")), ()),  # namespace overrides mesh
        ((pa("m", ROOT, "STRICT"), pa("n", "foo", "UNSET")), (STATIC,)),  # UNSET inherits
        ((pa("m", ROOT, "PERMISSIVE"), pa("n", "foo", "STRICT")), (STATIC,)),
        ((pa("n", "foo", "DISABLE"),), ()),
        ((pa("n", "other", "STRICT"),), ()),  # another namespace's policy
        ((pa("w", "foo", "STRICT", {"app": "a"}),), (STATIC,)),
        ((pa("w", "foo", "STRICT", {"app": "b"}),), ()),  # selects someone else
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "PERMISSIVE", {"app": "a"})), ()),  # workload overrides
        ((pa("w", "foo", "STRICT", {"app": "a"}, p8080="PERMISSIVE"),), (CONVERTED,)),
        ((pa("w", "foo", "STRICT", {"app": "a"}, p8080="DISABLE"),), (CONVERTED,)),
        ((pa("w", "foo", "STRICT", {"app": "a"}, p8080="STRICT"),), (STATIC,)),
        ((pa("w", "foo", "PERMISSIVE", {"app": "a"}, p8080="STRICT"),), (CONVERTED,)),
        ((pa("w", "foo", "PERMISSIVE", {"app": "a"}, p8080="PERMISSIVE"),), ()),
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "UNSET", {"app": "a"}, p8080="PERMISSIVE")), (CONVERTED,)),
        # Under an effective STRICT, Istio only counts PERMISSIVE (not DISABLE) as an exception here.
        ((pa("n", "foo", "STRICT"), pa("w", "foo", "UNSET", {"app": "a"}, p8080="DISABLE")), (STATIC,)),
        ((pa("w", "foo", "UNSET", {"app": "a"}, p8080="STRICT"),), (CONVERTED,)),
        ((pa("m", ROOT, "STRICT"), pa("w", "foo", "UNSET", {"app": "a"}, p8080="STRICT")), (STATIC,)),
        ((pa("r", ROOT, "PERMISSIVE", {"app": "a"}),), ()),  # selector policies in the root are ignored
    ],
)
def test_workload_references(policies: tuple[PeerAuthentication, ...], expected: tuple[str, ...]) -> None:
    assert keys(*policies) == expected


def test_oldest_policy_wins_by_name_when_several_apply() -> None:
    # Without creation timestamps the name order stands in for age (istiod: oldest wins).
    assert keys(pa("a-strict", "foo", "STRICT"), pa("b-permissive", "foo", "PERMISSIVE")) == (STATIC,)
    assert keys(pa("a-permissive", "foo", "PERMISSIVE"), pa("b-strict", "foo", "STRICT")) == ()


def test_static_policy_exists_iff_any_peer_authentication() -> None:
    assert convert_peer_authentications([], ROOT) == ()
    (static,) = convert_peer_authentications([pa("n", "foo", "DISABLE")], ROOT)
    assert (static.key, static.scope, static.action) == (STATIC, Scope.WORKLOAD_SELECTOR, Action.DENY)


def _policy(text: str) -> AuthorizationPolicy:
    result = parse_text(textwrap.dedent(text), "t.yaml")
    assert result.errors == ()
    (obj,) = result.objects
    assert isinstance(obj, AuthorizationPolicy)
    return obj


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_dry_run_accepts_go_booleans(value: str) -> None:
    ap = _policy(
        f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: ns, annotations: {{istio.io/dry-run: "{value}"}}}}
        spec: {{}}
        """
    )
    converted, status = convert_authorization_policy(ap, ROOT, dry_run_enabled=True)
    assert converted is not None and converted.dry_run and status is None
    converted, status = convert_authorization_policy(ap, ROOT)
    assert converted is None and status is not None and "dry-run" in status.message


def test_effective_groups() -> None:
    empty = Rules((Match(),))
    real = Rules((Match(destination_ports=(1,)),))
    assert not has_effective_groups([])
    assert not has_effective_groups([Group((empty,)), Group((real, empty))])
    assert has_effective_groups([Group(())])  # match-all
    assert has_effective_groups([Group((empty,)), Group((real,))])


# --- converted policies behave as the source policy says ---------------------------------------------------------

MTLS = Identity("cluster.local", "ns2", "client")


def _decide(policy_yaml: str, identity: Identity | None, port: int, src: str = "10.0.0.9") -> str:
    converted, _ = convert_authorization_policy(_policy(policy_yaml), ROOT)
    assert converted is not None
    target = Workload("//Pod/ns1/server", "server", "ns1", authorization_policies=(converted.key,))
    conn = Connection(identity, ipaddress.ip_address(src), ipaddress.ip_address("10.0.0.1"), port, target)
    return evaluate([converted], conn).verdict


DENY_MIXED = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns1}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {namespaces: ["ns2"]}}]
    to: [{operation: {ports: ["8080"], methods: ["DELETE"]}}]
"""
ALLOW_MIXED = DENY_MIXED.replace("action: DENY", "action: ALLOW")


def test_deny_with_http_parts_is_more_restrictive() -> None:
    # "DELETE from ns2 on 8080" becomes "anything from ns2 on 8080".
    assert _decide(DENY_MIXED, MTLS, 8080) == "DENY"
    assert _decide(DENY_MIXED, MTLS, 9090) == "ALLOW"
    assert _decide(DENY_MIXED, None, 8080) == "ALLOW"


def test_allow_with_http_parts_allows_nothing() -> None:
    assert _decide(ALLOW_MIXED, MTLS, 8080) == "DENY"


def test_ip_blocks_with_and_without_prefix() -> None:
    text = """
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: p, namespace: ns1}
    spec:
      rules:
      - from: [{source: {ipBlocks: ["192.168.1.7", "10.20.0.0/16"]}}]
    """
    assert _decide(text, None, 80, src="192.168.1.7") == "ALLOW"
    assert _decide(text, None, 80, src="192.168.1.8") == "DENY"
    assert _decide(text, None, 80, src="10.20.99.1") == "ALLOW"
    assert _decide(text, None, 80, src="10.21.0.1") == "DENY"
