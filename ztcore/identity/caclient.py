"""CreateCertificate client, as pilot-agent and ztunnel call it; shared by zt-agent and the IPsec bridge.

Credentials: a bearer token read from a file at every call (projected tokens rotate), or a client
certificate whose files are re-read when they change. Sends `clusterid`, and `ImpersonatedIdentity` when a
node agent asks for a pod's certificate. The returned leaf must name exactly the identity we asked for
(ztunnel's SanError check): a CA that answers with another identity is treated as a failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from ztcore.identity import Identity, IdentityError

log = logging.getLogger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
KEY_TYPES = ("ecdsa-p256", "rsa-2048")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAClientError(Exception):
    """The CA did not give us a usable certificate. The message is safe to log (no token, no key)."""


class SanMismatch(CAClientError):
    """The CA signed a certificate for another identity than the one requested."""


@dataclass(frozen=True, slots=True)
class CAClientOptions:
    address: str
    root_cert: Path | None = None  # trust for the CA's serving certificate; None = system roots
    server_name: str = "istiod.istio-system.svc"
    token_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    cluster_id: str = "Kubernetes"
    timeout: float = 10.0
    plaintext: bool = False  # ztd --ca-plaintext (development only; tokens cross the wire in clear)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both --cert and --key")
        if self.token_file is None and self.cert_file is None:
            raise ValueError("give a token file or a client certificate to authenticate to the CA")
        if self.plaintext and self.cert_file is not None:
            raise ValueError("a client certificate needs TLS; drop the plaintext option")


def generate_key(key_type: str) -> PrivateKey:
    """CPU-bound (RSA especially): call through asyncio.to_thread."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")


def build_csr(key: PrivateKey, identity: Identity) -> str:
    """CSR as pilot-agent builds it: O=<trust domain>, URI SAN = the SPIFFE identity."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.trust_domain)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def verify_identity(chain: Sequence[str], expected: Identity) -> x509.Certificate:
    """The leaf of a CreateCertificate answer, checked to name exactly `expected`. Pure."""
    if len(chain) < 2:
        raise CAClientError(f"CA answered with {len(chain)} certificate(s); expected a leaf and the root bundle")
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
    except ValueError:
        raise CAClientError("CA answered with a leaf that is not a PEM certificate") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SanMismatch("CA answered with a certificate without SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [expected.uri]:
        raise SanMismatch(f"CA signed {', '.join(uris) or 'no identity'}, expected {expected.uri}")
    return leaf


def token_identity(token: str, trust_domain: str) -> Identity | None:
    """The service account a Kubernetes-style token names (read without verification: the CA verifies)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    kube = claims.get("kubernetes.io")
    if isinstance(kube, dict):
        ns, sa = kube.get("namespace"), kube.get("serviceaccount")
        if isinstance(ns, str) and isinstance(sa, dict) and isinstance(sa.get("name"), str):
            try:
                return Identity.for_account(trust_domain, ns, sa["name"])
            except IdentityError:
                return None
    sub = claims.get("sub")
    if isinstance(sub, str):
        parts = sub.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            try:
                return Identity.for_account(trust_domain, parts[2], parts[3])
            except IdentityError:
                return None
    return None


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise CAClientError(f"cannot read {what} {path}: {err.strerror}") from None


class CAClient:
    def __init__(self, options: CAClientOptions) -> None:
        self.options = options
        self._channel: grpc.aio.Channel | None = None
        self._channel_key: tuple[bytes | None, bytes | None, bytes | None] | None = None

    def _credentials(self) -> tuple[bytes | None, bytes | None, bytes | None, str | None]:
        """Files read in a worker thread: root bundle, client chain, client key, token."""
        o = self.options
        token_bytes = _read(o.token_file, "token file")
        token = token_bytes.decode(errors="replace").strip() if token_bytes is not None else None
        if token_bytes is not None and not token:
            raise CAClientError(f"token file {o.token_file} is empty")
        return (
            _read(o.root_cert, "root certificate"),
            _read(o.cert_file, "client certificate"),
            _read(o.key_file, "client key"),
            token,
        )

    async def _channel_for(self, root: bytes | None, chain: bytes | None, key: bytes | None) -> grpc.aio.Channel:
        if self._channel is not None and self._channel_key == (root, chain, key):
            return self._channel
        if self._channel is not None:
            await self._channel.close()
        o = self.options
        if o.plaintext:
            self._channel = grpc.aio.insecure_channel(o.address)
        else:
            creds = grpc.ssl_channel_credentials(root, key, chain)
            self._channel = grpc.aio.secure_channel(
                o.address, creds, options=[("grpc.ssl_target_name_override", o.server_name)]
            )
        self._channel_key = (root, chain, key)
        return self._channel

    async def create_certificate(
        self, csr_pem: str, ttl_seconds: int, *, impersonate: Identity | None = None
    ) -> list[str]:
        """One CreateCertificate call; the chain as the CA returned it (leaf first, root bundle last)."""
        root, chain, key, token = await asyncio.to_thread(self._credentials)
        channel = await self._channel_for(root, chain, key)
        metadata: list[tuple[str, str]] = [("clusterid", self.options.cluster_id)]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        meta = struct_pb2.Struct()
        if impersonate is not None:
            meta.update({IMPERSONATED_IDENTITY: impersonate.uri})
        req = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds, metadata=meta)
        try:
            resp = await ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                req, metadata=metadata, timeout=self.options.timeout
            )
        except grpc.aio.AioRpcError as err:
            raise CAClientError(
                f"CreateCertificate at {self.options.address}: {err.code().name}: {err.details()}"
            ) from None
        return list(resp.cert_chain)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
