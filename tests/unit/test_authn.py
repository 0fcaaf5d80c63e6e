"""Caller authentication: bearer extraction, JWKS validation, TokenReview reading and its cache."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sds.ca import issuer
from ztcore import authn
from ztcore.registry import PodRef

TD = "cluster.local"


def creds(token: str | None = None, **md: str) -> authn.Credentials:
    metadata = dict(md)
    if token is not None:
        metadata["authorization"] = f"Bearer {token}"
    return authn.Credentials(metadata=metadata)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("Bearer  abc ", "abc"),
        ("bearer abc", None),
        ("Istio abc", None),
        ("abc", None),
        ("Bearer ", None),
    ],
)
def test_bearer_extraction(value: str, token: str | None) -> None:
    assert authn.bearer_token({"authorization": value}) == token


class FakeReviewer:
    def __init__(self, status: authn.TokenReviewStatus) -> None:
        self.status = status
        self.calls = 0

    async def review(self, token: str, audiences: Sequence[str]) -> authn.TokenReviewStatus:
        self.calls += 1
        assert list(audiences) == ["istio-ca"]
        return self.status


def unsigned(exp: float) -> str:
    # TokenReview authenticates the token; we read exp only to bound the cache.
    return jwt.encode({"exp": int(exp)}, "k" * 32, algorithm="HS256")


GOOD = authn.TokenReviewStatus(
    authenticated=True,
    username="system:serviceaccount:shop:frontend",
    groups=("system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"),
    extra={authn.POD_NAME_EXTRA: ("frontend-1",), authn.POD_UID_EXTRA: ("uid-1",)},
)


async def test_token_review_success_and_cache_bounded_by_expiry() -> None:
    now = [1000.0]
    reviewer = FakeReviewer(GOOD)
    kube = authn.KubeJwtAuthenticator(
        reviewer, audiences=["istio-ca"], trust_domain=TD, cluster_id="Kubernetes", clock=lambda: now[0]
    )
    token = unsigned(1060)
    caller = await kube.authenticate(creds(token))
    assert caller is not None
    assert caller.identities == ("spiffe://cluster.local/ns/shop/sa/frontend",)
    assert (caller.pod_name, caller.pod_uid) == ("frontend-1", "uid-1")
    await kube.authenticate(creds(token))
    assert reviewer.calls == 1  # cached
    now[0] = 1061  # past the token's exp: the cached review must not outlive the token
    with pytest.raises(authn.AuthenticationError, match="expired"):
        await kube.authenticate(creds(token))
    assert reviewer.calls == 1


class Pods:
    """The registry's view of pods, as the CA reads it (ztcore.registry.PodDirectory)."""

    def __init__(self, *pods: PodRef) -> None:
        self.pods = {(p.namespace, p.name): p for p in pods}

    def get_pod(self, namespace: str, name: str) -> PodRef | None:
        return self.pods.get((namespace, name))

    def count_pods_on_node(self, namespace: str, service_account: str, node_name: str) -> int:
        return 0

    def has_node(self, name: str) -> bool:
        return False


async def test_a_cached_review_dies_with_its_pod() -> None:
    reviewer = FakeReviewer(GOOD)
    pods = Pods(PodRef("shop", "frontend-1", "uid-1", "frontend", "node-a"))
    kube = authn.KubeJwtAuthenticator(
        reviewer, audiences=["istio-ca"], trust_domain=TD, cluster_id="Kubernetes", pods=pods
    )
    token = unsigned(time.time() + 600)
    assert await kube.authenticate(creds(token)) is not None
    assert await kube.authenticate(creds(token)) is not None
    assert reviewer.calls == 1
    # Recreated under the same name: a new uid is another pod, and the cached review is dropped.
    pods.pods[("shop", "frontend-1")] = PodRef("shop", "frontend-1", "uid-2", "frontend", "node-a")
    with pytest.raises(authn.AuthenticationError, match="gone"):
        await kube.authenticate(creds(token))
    del pods.pods[("shop", "frontend-1")]
    reviewer.status = authn.TokenReviewStatus(authenticated=False, error="pod not found")
    with pytest.raises(authn.AuthenticationError, match="pod not found"):
        await kube.authenticate(creds(token))  # not cached any more: the API server is asked again
    assert reviewer.calls == 2


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (authn.TokenReviewStatus(authenticated=False), "not authenticated"),
        (
            authn.TokenReviewStatus(authenticated=True, username="system:serviceaccount:shop:frontend"),
            "not a service account token",
        ),
        (
            authn.TokenReviewStatus(authenticated=True, username="alice", groups=("system:serviceaccounts",)),
            "invalid username",
        ),
        (
            authn.TokenReviewStatus(
                authenticated=True, username="system:serviceaccount:a:b:c", groups=("system:serviceaccounts",)
            ),
            "invalid username",
        ),
        (
            authn.TokenReviewStatus(authenticated=False, error="[invalid bearer token, token audiences]"),
            "TokenReview error",
        ),
    ],
)
async def test_token_review_failures_are_not_cached(status: authn.TokenReviewStatus, message: str) -> None:
    reviewer = FakeReviewer(status)
    kube = authn.KubeJwtAuthenticator(reviewer, audiences=["istio-ca"], trust_domain=TD, cluster_id="Kubernetes")
    token = unsigned(time.time() + 600)
    for _ in range(2):
        with pytest.raises(authn.AuthenticationError, match=message):
            await kube.authenticate(creds(token))
    assert reviewer.calls == 2


async def test_token_review_cluster_id_routing() -> None:
    reviewer = FakeReviewer(GOOD)
    kube = authn.KubeJwtAuthenticator(reviewer, audiences=["istio-ca"], trust_domain=TD, cluster_id="Kubernetes")
    token = unsigned(time.time() + 600)
    assert await kube.authenticate(creds(token, clusterid="Kubernetes")) is not None
    assert await kube.authenticate(creds(token)) is not None
    with pytest.raises(authn.AuthenticationError, match="cluster 'remote'"):
        await kube.authenticate(creds(token, clusterid="remote"))


async def test_token_review_api_failure_is_an_auth_failure() -> None:
    class Broken:
        async def review(self, token: str, audiences: Sequence[str]) -> authn.TokenReviewStatus:
            raise ConnectionError("apiserver down")

    kube = authn.KubeJwtAuthenticator(Broken(), audiences=["istio-ca"], trust_domain=TD, cluster_id="Kubernetes")
    with pytest.raises(authn.AuthenticationError, match="apiserver down"):
        await kube.authenticate(creds(unsigned(time.time() + 600)))


def rsa_jwks(tmp_path: Path, kid: str = "k1") -> tuple[rsa.RSAPrivateKey, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, path


def oidc_token(key: rsa.RSAPrivateKey, kid: str = "k1", **over: object) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "https://issuer.example",
        "aud": "istio-ca",
        "iat": now,
        "exp": now + 600,
        "sub": "system:serviceaccount:payments:ledger",
    }
    claims.update(over)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


async def test_oidc_jwks_and_key_rotation(tmp_path: Path) -> None:
    key, path = rsa_jwks(tmp_path)
    clock = [0.0]
    jwks = authn.JwksFile(path, clock=lambda: clock[0])
    oidc = authn.JwtAuthenticator(issuer="https://issuer.example", audiences=["istio-ca"], jwks=jwks, trust_domain=TD)
    token = oidc_token(key)
    caller = await oidc.authenticate(creds(token))
    assert caller is not None and caller.identities == ("spiffe://cluster.local/ns/payments/sa/ledger",)
    # The key is rotated out of the JWKS: within the re-check interval (1 s) the cached token stops working.
    rsa_jwks(tmp_path, kid="k2")
    clock[0] = 1.0
    with pytest.raises(authn.AuthenticationError, match="not in JWKS"):
        await oidc.authenticate(creds(token))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"iss": "https://other"}, "(?i)issuer"),
        ({"aud": "kube"}, "(?i)audience"),
        ({"exp": 1}, "(?i)expired"),
        ({"sub": "alice"}, "does not name a service account"),
    ],
)
async def test_oidc_rejections(tmp_path: Path, over: dict[str, object], message: str) -> None:
    key, path = rsa_jwks(tmp_path)
    oidc = authn.JwtAuthenticator(
        issuer="https://issuer.example", audiences=["istio-ca"], jwks=authn.JwksFile(path), trust_domain=TD
    )
    with pytest.raises(authn.AuthenticationError, match=message):
        await oidc.authenticate(creds(oidc_token(key, **over)))


async def test_hmac_with_public_key_is_refused(tmp_path: Path) -> None:
    """Algorithm confusion: an HS256 token keyed with the public JWK must never verify."""
    _, path = rsa_jwks(tmp_path)
    oidc = authn.JwtAuthenticator(
        issuer="https://issuer.example", audiences=["istio-ca"], jwks=authn.JwksFile(path), trust_domain=TD
    )
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = b64(
        json.dumps(
            {
                "iss": "https://issuer.example",
                "aud": "istio-ca",
                "exp": int(time.time()) + 60,
                "sub": "system:serviceaccount:a:b",
            }
        ).encode()
    )
    mac = hmac.new(path.read_bytes(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{b64(mac)}"
    with pytest.raises(authn.AuthenticationError):
        await oidc.authenticate(creds(forged))


async def test_local_issuer_claims_carry_pod_and_node(tmp_path: Path) -> None:
    tokens = issuer.load_or_create(tmp_path, TD)
    local = authn.JwtAuthenticator(
        issuer=tokens.issuer, audiences=["istio-ca"], jwks=authn.JwksFile(tmp_path / issuer.JWKS_FILE), trust_domain=TD
    )
    token = tokens.mint(
        "istio-system",
        "ztunnel",
        audiences=["istio-ca"],
        duration=dt.timedelta(minutes=5),
        now=dt.datetime.now(dt.UTC),
        pod_name="ztunnel-a",
        pod_uid="u-1",
        node_name="node-a",
    )
    caller = await local.authenticate(creds(token))
    assert caller is not None
    assert (caller.namespace, caller.service_account, caller.pod_name, caller.pod_uid, caller.node_name) == (
        "istio-system",
        "ztunnel",
        "ztunnel-a",
        "u-1",
        "node-a",
    )


async def test_first_success_wins_and_failures_are_joined() -> None:
    class Fails:
        name = "fails"

        async def authenticate(self, c: authn.Credentials) -> authn.Caller | None:
            raise authn.AuthenticationError("first said no")

    class Works:
        name = "works"

        async def authenticate(self, c: authn.Credentials) -> authn.Caller | None:
            return authn.Caller(("spiffe://td/ns/a/sa/b",), "works")

    assert (await authn.authenticate([Fails(), Works()], creds("t"))).authenticator == "works"
    with pytest.raises(authn.AuthenticationError, match="first said no"):
        await authn.authenticate([Fails(), Fails()], creds("t"))
    with pytest.raises(authn.AuthenticationError, match="no client certificate and no bearer token"):
        await authn.authenticate([authn.ClientCertAuthenticator()], creds())
