"""The embedded token issuer: without Kubernetes, ztd mints and verifies service-account tokens itself.

Tokens look like Kubernetes projected service-account tokens (`sub` system:serviceaccount:<ns>:<sa>,
`kubernetes.io` claim with namespace, service account, and the pod/node the token is bound to), so the
same claim reading serves both. The ES256 key lives in <state-dir>/issuer/key.pem (0600); the public
JWKS beside it is what ztd validates against.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztcore.fsutil import ensure_private_dir, write_atomic

KEY_FILE = "key.pem"
JWKS_FILE = "jwks.json"


class IssuerError(Exception):
    pass


def issuer_name(trust_domain: str) -> str:
    return f"ztd://{trust_domain}"


@dataclass(frozen=True)
class TokenIssuer:
    issuer: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    kid: str

    def jwks(self) -> dict[str, object]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}

    def mint(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: list[str],
        duration: dt.timedelta,
        now: dt.datetime,
        pod_name: str = "",
        pod_uid: str = "",
        node_name: str = "",
    ) -> str:
        if not namespace or not service_account:
            raise IssuerError("namespace and service account are required")
        if duration.total_seconds() <= 0:
            raise IssuerError("duration must be positive")
        kube: dict[str, object] = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"ztdpu://ServiceAccount/{namespace}/{service_account}")),
            },
        }
        if pod_name:
            kube["pod"] = {"name": pod_name, "uid": pod_uid}
        if node_name:
            kube["node"] = {"name": node_name}
        issued = int(now.timestamp())
        claims = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": audiences,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(duration.total_seconds()),
            "jti": str(uuid.uuid4()),
            "kubernetes.io": kube,
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


def _kid(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize()[:16].hex()


def load(folder: Path, trust_domain: str) -> TokenIssuer:
    path = folder / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IssuerError(f"no token issuer key at {path} (start ztd with this --state-dir once)") from None
    except OSError as err:
        raise IssuerError(f"cannot read {path}: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IssuerError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssuerError(f"{path} must hold an ECDSA P-256 key")
    return TokenIssuer(issuer_name(trust_domain), key, _kid(key))


def load_or_create(folder: Path, trust_domain: str) -> TokenIssuer:
    if not (folder / KEY_FILE).exists():
        ensure_private_dir(folder)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(folder / KEY_FILE, pem, mode=0o600)
    issuer = load(folder, trust_domain)
    write_atomic(folder / JWKS_FILE, json.dumps(issuer.jwks(), indent=2).encode())
    return issuer
