"""The node authorization matrix of istiod's node_auth_test.go, as a table."""

from __future__ import annotations

import pytest

from sds.ca.nodeauthz import ImpersonationDenied, NodeAuthorizer, parse_trusted_accounts
from ztcore.authn import Caller
from ztcore.registry import PodRef

PODS = {
    ("istio-system", "ztunnel-a"): PodRef("istio-system", "ztunnel-a", "uid-z", "ztunnel", "node-a"),
    ("shop", "frontend-1"): PodRef("shop", "frontend-1", "uid-f", "frontend", "node-a"),
    ("shop", "cart-1"): PodRef("shop", "cart-1", "uid-c", "cart", "node-b"),
    ("shop", "gone-1"): PodRef("shop", "gone-1", "uid-g", "gone", "node-a", phase="Failed"),
}


class Directory:
    def get_pod(self, namespace: str, name: str) -> PodRef | None:
        pod = PODS.get((namespace, name))
        return pod if pod is not None and pod.phase != "Failed" else None

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        return sum(
            1
            for p in PODS.values()
            if (p.namespace, p.service_account, p.node_name) == (namespace, service_account, node_name)
            and p.phase != "Failed"
        )

    def has_node(self, name: str) -> bool:
        return name in {"node-a", "node-b"}


ZT = Caller(
    ("spiffe://cluster.local/ns/istio-system/sa/ztunnel",),
    "t",
    namespace="istio-system",
    service_account="ztunnel",
    pod_name="ztunnel-a",
    pod_uid="uid-z",
)
AUTHZ = NodeAuthorizer(parse_trusted_accounts(["istio-system/ztunnel"]), Directory())


def caller(**kw: str) -> Caller:
    fields = {
        "namespace": ZT.namespace,
        "service_account": ZT.service_account,
        "pod_name": ZT.pod_name,
        "pod_uid": ZT.pod_uid,
        "node_name": "",
    }
    fields.update(kw)
    return Caller(ZT.identities, "t", **fields)


@pytest.mark.parametrize(
    ("name", "who", "requested", "error"),
    [
        ("on node", caller(), "spiffe://cluster.local/ns/shop/sa/frontend", None),
        ("other trust domain is not compared", caller(), "spiffe://other.td/ns/shop/sa/frontend", None),
        (
            "node-bound token",
            caller(pod_name="", pod_uid="", node_name="node-b"),
            "spiffe://cluster.local/ns/shop/sa/cart",
            None,
        ),
        ("off node", caller(), "spiffe://cluster.local/ns/shop/sa/cart", "no pod runs as shop/cart"),
        ("failed pods do not count", caller(), "spiffe://cluster.local/ns/shop/sa/gone", "no pod runs"),
        (
            "untrusted caller",
            caller(namespace="shop", service_account="frontend", pod_name="frontend-1", pod_uid="uid-f"),
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "not allowed to impersonate",
        ),
        ("invalid requested", caller(), "spiffe://cluster.local/ns/shop", "requested identity is invalid"),
        ("not spiffe", caller(), "shop/frontend", "requested identity is invalid"),
        ("unknown caller pod", caller(pod_name="ztunnel-x"), "spiffe://cluster.local/ns/shop/sa/frontend", "not found"),
        ("bad uid", caller(pod_uid="uid-old"), "spiffe://cluster.local/ns/shop/sa/frontend", "has UID"),
        ("no uid", caller(pod_uid=""), "spiffe://cluster.local/ns/shop/sa/frontend", "no pod UID"),
        (
            "bad account",
            caller(pod_name="frontend-1", pod_uid="uid-f", namespace="shop"),
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "not allowed",
        ),
        (
            "node claim disagrees with pod",
            caller(node_name="node-b"),
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "bound to node node-b",
        ),
        (
            "unknown node",
            caller(pod_name="", pod_uid="", node_name="node-z"),
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "not in the registry",
        ),
        (
            "unbound token",
            caller(pod_name="", pod_uid=""),
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "neither a pod nor a node",
        ),
    ],
)
def test_node_authorization(name: str, who: Caller, requested: str, error: str | None) -> None:
    if error is None:
        assert AUTHZ.authorize(who, requested).uri == requested
    else:
        with pytest.raises(ImpersonationDenied, match=error):
            AUTHZ.authorize(who, requested)


@pytest.mark.parametrize("bad", ["ztunnel", "/ztunnel", "istio-system/", "a/b/c"])
def test_trusted_account_syntax(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_trusted_accounts([bad])
