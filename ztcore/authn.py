"""Who is calling the CA or xDS. Istio's order: client certificate, then JWT bearer tokens.

Every authenticator returns a `Caller`, returns None when the request carries no credential of its kind,
or raises `AuthenticationError` with a reason for the server log. The reason never reaches the client:
the server answers every failure with the same opaque Unauthenticated, as istiod does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt
from cryptography import x509

from ztcore.filewatch import Signature, signature
from ztcore.identity import Identity, IdentityError
from ztcore.registry import PodDirectory
from ztcore.tlsfront import TlsPeer

log = logging.getLogger(__name__)

BEARER_PREFIX = "Bearer "
AUTHORIZATION_KEY = "authorization"
CLUSTER_ID_KEY = "clusterid"
# Algorithms we verify. "none" and HMAC are never accepted (no alg-confusion with a public key).
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")


class AuthenticationError(Exception):
    """Credentials were present but invalid. The message is for the server log only."""


@dataclass(frozen=True, slots=True)
class Caller:
    identities: tuple[str, ...]
    authenticator: str
    namespace: str = ""
    service_account: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    node_name: str = ""
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request carries: gRPC metadata (keys lower-case) and the TLS-verified client certificate."""

    metadata: Mapping[str, str]
    peer_cert_pem: bytes | None = None
    peer: str = ""


class Authenticator(Protocol):
    name: str

    async def authenticate(self, creds: Credentials) -> Caller | None: ...


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    value = metadata.get(AUTHORIZATION_KEY)
    if not value or not value.startswith(BEARER_PREFIX):
        return None
    token = value[len(BEARER_PREFIX) :].strip()
    return token or None


def unverified_expiry(token: str) -> float | None:
    """The token's `exp`, read without verification; used only to bound how long a cache entry lives."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError):
        return None


class TokenCache:
    """Positive results only, keyed by a hash of the token, each kept until min(token exp, max_age)."""

    def __init__(self, max_entries: int = 10_000, max_age: float = 300.0, clock: Callable[[], float] = time.time):
        self._entries: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()
        self._max_entries = max_entries
        self._max_age = max_age
        self._clock = clock

    @staticmethod
    def _key(token: str, context: str) -> bytes:
        return hashlib.sha256(f"{context}\0{token}".encode()).digest()

    def get(self, token: str, context: str = "") -> Caller | None:
        key = self._key(token, context)
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, token: str, caller: Caller, context: str = "") -> None:
        now = self._clock()
        until = now + self._max_age
        if caller.expires_at is not None:
            until = min(until, caller.expires_at)
        if until <= now:
            return
        key = self._key(token, context)
        self._entries[key] = (until, caller)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def drop(self, token: str, context: str = "") -> None:
        self._entries.pop(self._key(token, context), None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class ClientCertAuthenticator:
    """Identity = the URI SANs of a client certificate that the TLS layer verified against our roots."""

    name = "ClientCertAuthenticator"

    async def authenticate(self, creds: Credentials) -> Caller | None:
        if not creds.peer_cert_pem:
            return None
        try:
            cert = x509.load_pem_x509_certificate(creds.peer_cert_pem)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            raise AuthenticationError("client certificate has no subject alternative names") from None
        uris = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))
        if not uris:
            raise AuthenticationError("client certificate has no URI SAN")
        ns = sa = ""
        try:
            ident = Identity.parse(uris[0])
            ns, sa = ident.namespace, ident.service_account
        except IdentityError:
            pass
        return Caller(
            uris, self.name, namespace=ns, service_account=sa, expires_at=cert.not_valid_after_utc.timestamp()
        )


def _claims_to_caller(claims: Mapping[str, Any], trust_domain: str, authenticator: str) -> Caller:
    """Kubernetes service-account token claims → Caller (pod and node bindings included when present)."""
    kube = claims.get("kubernetes.io")
    pod_name = pod_uid = node_name = ""
    if isinstance(kube, dict):
        ns = str(kube.get("namespace", ""))
        sa_claim = kube.get("serviceaccount") or {}
        sa = str(sa_claim.get("name", "")) if isinstance(sa_claim, dict) else ""
        pod = kube.get("pod") or {}
        if isinstance(pod, dict):
            pod_name, pod_uid = str(pod.get("name", "")), str(pod.get("uid", ""))
        node = kube.get("node") or {}
        if isinstance(node, dict):
            node_name = str(node.get("name", ""))
    else:
        ns, sa = _split_sa_username(str(claims.get("sub", "")))
    if not ns or not sa:
        raise AuthenticationError("token does not name a service account")
    try:
        ident = Identity.for_account(trust_domain, ns, sa)
    except IdentityError as err:
        raise AuthenticationError(f"token names an invalid service account: {err}") from None
    exp = claims.get("exp")
    return Caller(
        (ident.uri,),
        authenticator,
        namespace=ns,
        service_account=sa,
        pod_name=pod_name,
        pod_uid=pod_uid,
        node_name=node_name,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
    )


def _split_sa_username(username: str) -> tuple[str, str]:
    # system:serviceaccount:<ns>:<sa> — exactly four parts, as istiod requires.
    parts = username.split(":")
    if len(parts) != 4 or parts[0] != "system" or parts[1] != "serviceaccount":
        return "", ""
    return parts[2], parts[3]


class JwksFile:
    """A JWKS document on disk, re-read when its mtime or size changes."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None] | None = None,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._stamp: Signature | None = None
        self._checked_at = -float("inf")
        self._check_interval = check_interval
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._on_change = on_change

    def keys(self) -> Mapping[str | None, jwt.PyJWK]:
        # A stat per request would cost more than the cached token check it guards; once a second is enough.
        now = self._clock()
        if self._stamp is not None and now - self._checked_at < self._check_interval:
            return self._keys
        self._checked_at = now
        stamp = signature([self.path])
        if stamp[0] is None:
            try:
                self.path.stat()
            except OSError as err:
                raise AuthenticationError(f"JWKS file {self.path} unreadable: {err.strerror}") from None
        if stamp != self._stamp:
            try:
                jwks = jwt.PyJWKSet.from_json(self.path.read_text())
            except (OSError, jwt.exceptions.PyJWTError, ValueError) as err:
                raise AuthenticationError(f"JWKS file {self.path} invalid: {err}") from None
            self._keys = {k.key_id: k for k in jwks.keys}
            self._stamp = stamp
            if self._on_change:
                self._on_change()
        return self._keys


class JwtAuthenticator:
    """OIDC-style JWT validation against a fixed issuer and a JWKS file.

    Also serves as the embedded token issuer's validator: ztd verifies its own tokens this way.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audiences: Sequence[str],
        jwks: JwksFile,
        trust_domain: str,
        name: str = "JwtAuthenticator",
        cache: TokenCache | None = None,
        leeway: float = 0.0,
    ) -> None:
        self.name = name
        self.issuer = issuer
        self.audiences = list(audiences)
        self.jwks = jwks
        self.trust_domain = trust_domain
        self.cache = cache if cache is not None else TokenCache()
        self.leeway = leeway
        jwks._on_change = self.cache.clear  # a rotated/removed key must not live on in the cache

    async def authenticate(self, creds: Credentials) -> Caller | None:
        token = bearer_token(creds.metadata)
        if token is None:
            return None
        keys = self.jwks.keys()
        cached = self.cache.get(token, self.name)
        if cached is not None:
            return cached
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.PyJWTError as err:
            raise AuthenticationError(f"{self.name}: malformed token: {err}") from None
        key = keys.get(header.get("kid"))
        if key is None:
            if len(keys) == 1 and header.get("kid") is None:
                key = next(iter(keys.values()))
            else:
                raise AuthenticationError(f"{self.name}: token key id {header.get('kid')!r} not in JWKS")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(JWT_ALGORITHMS),
                audience=self.audiences,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.exceptions.PyJWTError as err:
            raise AuthenticationError(f"{self.name}: {err}") from None
        caller = _claims_to_caller(claims, self.trust_domain, self.name)
        self.cache.put(token, caller, self.name)
        return caller


@dataclass(frozen=True, slots=True)
class TokenReviewStatus:
    authenticated: bool
    username: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""


class TokenReviewer(Protocol):
    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus: ...


POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def caller_from_review(status: TokenReviewStatus, trust_domain: str, expires_at: float | None) -> Caller:
    """istiod's reading of a TokenReview (security/pkg/k8s/tokenreview/k8sauthn.go)."""
    if status.error:
        raise AuthenticationError(f"TokenReview error: {status.error}")
    if not status.authenticated:
        raise AuthenticationError("the token is not authenticated")
    if "system:serviceaccounts" not in status.groups:
        raise AuthenticationError("the token is not a service account token")
    ns, sa = _split_sa_username(status.username)
    if not ns:
        raise AuthenticationError(f"invalid username field in the token review result: {status.username!r}")

    def first(key: str) -> str:
        values = status.extra.get(key, ())
        return values[0] if values else ""

    try:
        ident = Identity.for_account(trust_domain, ns, sa)
    except IdentityError as err:
        raise AuthenticationError(str(err)) from None
    return Caller(
        (ident.uri,),
        "KubeJWTAuthenticator",
        namespace=ns,
        service_account=sa,
        pod_name=first(POD_NAME_EXTRA),
        pod_uid=first(POD_UID_EXTRA),
        node_name=first(NODE_NAME_EXTRA),
        expires_at=expires_at,
    )


class KubeJwtAuthenticator:
    """Kubernetes service-account tokens checked by TokenReview, with a cache of positive reviews.

    The `clusterid` metadata picks the cluster; this control plane knows only its own, so an empty value
    or our own cluster id is accepted and anything else is refused.

    A cached review of a pod-bound token is only reused while `pods` still holds that pod with the same uid:
    the API server refuses a deleted pod's token at once, and the cache must not outlive that answer.
    """

    name = "KubeJWTAuthenticator"

    def __init__(
        self,
        reviewer: TokenReviewer,
        *,
        audiences: Sequence[str],
        trust_domain: str,
        cluster_id: str,
        cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time,
        pods: PodDirectory | None = None,
    ) -> None:
        self.reviewer = reviewer
        self.audiences = list(audiences)
        self.trust_domain = trust_domain
        self.cluster_id = cluster_id
        self.cache = cache if cache is not None else TokenCache(clock=clock)
        self._clock = clock
        self._pods = pods

    async def authenticate(self, creds: Credentials) -> Caller | None:
        token = bearer_token(creds.metadata)
        if token is None:
            return None
        cluster = creds.metadata.get(CLUSTER_ID_KEY, "")
        if cluster and cluster != self.cluster_id:
            raise AuthenticationError(f"client claims to be in cluster {cluster!r}, we only serve {self.cluster_id!r}")
        cached = self.cache.get(token, cluster)
        if cached is not None:
            if self._pod_is_gone(cached):
                self.cache.drop(token, cluster)
                raise AuthenticationError(
                    f"the token is bound to pod {cached.namespace}/{cached.pod_name} (uid {cached.pod_uid}), now gone"
                )
            return cached
        expires_at = unverified_expiry(token)
        if expires_at is not None and expires_at <= self._clock():
            raise AuthenticationError("token expired")
        try:
            status = await self.reviewer.review(token, self.audiences)
        except Exception as err:  # the API server being down must read as an auth failure, not a crash
            raise AuthenticationError(f"TokenReview failed: {type(err).__name__}: {err}") from None
        caller = caller_from_review(status, self.trust_domain, expires_at)
        self.cache.put(token, caller, cluster)
        return caller

    def _pod_is_gone(self, caller: Caller) -> bool:
        if self._pods is None or not caller.pod_name or not caller.pod_uid:
            return False
        pod = self._pods.get_pod(caller.namespace, caller.pod_name)
        return pod is None or pod.uid != caller.pod_uid


async def authenticate(authenticators: Sequence[Authenticator], creds: Credentials) -> Caller:
    """First authenticator that succeeds wins (istiod security.Authenticate); else every reason, joined."""
    reasons: list[str] = []
    for authn in authenticators:
        try:
            caller = await authn.authenticate(creds)
        except AuthenticationError as err:
            reasons.append(str(err))
            continue
        if caller is not None and caller.identities:
            return caller
    if not reasons:
        reasons.append("no client certificate and no bearer token")
    raise AuthenticationError("; ".join(reasons))


# --- credentials from a gRPC call -------------------------------------------------------------------------

PeerLookup = Callable[[str], TlsPeer | None]


def credentials_from_context(context: grpc.aio.ServicerContext, tls_peers: PeerLookup | None) -> Credentials | None:
    """Metadata plus, behind the TLS front, the verified client certificate. None: the connection claims
    to be behind the front but is not (someone dialled the internal port directly)."""
    metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    peer = context.peer() or ""
    if tls_peers is None:
        return Credentials(metadata=metadata, peer=peer)
    tls = tls_peers(peer)
    if tls is None:
        return None
    return Credentials(metadata=metadata, peer_cert_pem=tls.cert_pem, peer=tls.address)
