"""TokenReview response -> TokenReviewStatus (pure; the real API server's answers are in test_kube_ca.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sds.ca.tokenreview import review_status
from ztcore.authn import AuthenticationError, caller_from_review

POD_REVIEW: dict[str, Any] = {
    "apiVersion": "authentication.k8s.io/v1",
    "kind": "TokenReview",
    "spec": {"token": "secret", "audiences": ["istio-ca"]},
    "status": {
        "authenticated": True,
        "audiences": ["istio-ca"],
        "user": {
            "username": "system:serviceaccount:shop:frontend",
            "uid": "9c1e",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
            "extra": {
                "authentication.kubernetes.io/pod-name": ["frontend-1"],
                "authentication.kubernetes.io/pod-uid": ["6b1f"],
                "authentication.kubernetes.io/node-name": ["node-a"],
                "authentication.kubernetes.io/credential-id": ["JTI=abc"],
            },
        },
    },
}


def test_pod_bound_review_maps_to_a_caller() -> None:
    status = review_status(POD_REVIEW, ["istio-ca"])
    assert status.authenticated and not status.error
    assert status.extra["authentication.kubernetes.io/pod-uid"] == ("6b1f",)
    caller = caller_from_review(status, "cluster.local", expires_at=123.0)
    assert caller.identities == ("spiffe://cluster.local/ns/shop/sa/frontend",)
    assert (caller.pod_name, caller.pod_uid, caller.node_name, caller.expires_at) == (
        "frontend-1",
        "6b1f",
        "node-a",
        123.0,
    )


def test_review_matching_none_of_our_audiences_is_not_authenticated() -> None:
    # A server that ignored spec.audiences must not let another audience's token through.
    body = {"status": {**POD_REVIEW["status"], "audiences": ["vault"]}}
    status = review_status(body, ["istio-ca"])
    assert not status.authenticated and "none of ['istio-ca']" in status.error
    with pytest.raises(AuthenticationError):
        caller_from_review(status, "cluster.local", None)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"status": None},
        {"status": "weird"},
        {"status": {"authenticated": False, "error": "token has been invalidated"}},
        {"status": {"authenticated": "true", "user": {"username": "system:serviceaccount:a:b"}}},
        {"status": {"authenticated": True, "audiences": ["istio-ca"], "user": "nobody"}},
    ],
)
def test_malformed_or_negative_reviews_never_authenticate(body: dict[str, Any]) -> None:
    status = review_status(body, ["istio-ca"])
    with pytest.raises(AuthenticationError):
        caller_from_review(status, "cluster.local", None)
