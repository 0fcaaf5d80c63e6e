"""CA key material: a plugged-in `cacerts` folder (Istio's layout) or a self-signed root we create once.

`load_material` is the one loader, from name -> bytes, shared by folders (`load_cacerts`) and Kubernetes
Secrets (sds/ca/kubesecret.py), so both follow the same validation rules.

Istio's plug-in layout: ca-cert.pem (signing cert), ca-key.pem, root-cert.pem (trust bundle, may hold
several roots during a root rotation), cert-chain.pem (signing cert up to the root). The Kubernetes
`tls.crt`/`tls.key`/`ca.crt` naming is accepted too, as istiod does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from sds.ca import der
from ztcore.fsutil import ensure_private_dir, write_atomic

log = logging.getLogger(__name__)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_ALGORITHMS = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-4096")


class CAError(Exception):
    """CA material is missing, inconsistent or expired. The message names files, never key bytes."""


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def generate_key(algorithm: str) -> SigningKey:
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm in ("rsa-2048", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    raise CAError(f"unknown key algorithm {algorithm!r} (one of {', '.join(KEY_ALGORITHMS)})")


def hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class CAMaterial:
    """Everything the signer needs; immutable so a rotation swaps the whole object at once."""

    signing_cert: x509.Certificate
    signing_key: SigningKey = field(repr=False)
    # Certificates between the signing cert and a root, signing cert first; empty when we sign with a root.
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    source: str
    chain_pems: tuple[str, ...] = field(init=False)
    root_bundle_pem: str = field(init=False)
    signing_hash: hashes.SHA256 | hashes.SHA384 = field(init=False, repr=False)
    ski: x509.SubjectKeyIdentifier = field(init=False, repr=False)
    issuer_der: bytes = field(init=False, repr=False)
    signature_algorithm_der: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain_pems", tuple(pem(c) for c in self.chain))
        object.__setattr__(self, "root_bundle_pem", "".join(pem(r) for r in self.roots))
        object.__setattr__(self, "signing_hash", hash_for(self.signing_key))
        try:
            ski = self.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(self.signing_cert.public_key())
        object.__setattr__(self, "ski", ski)
        object.__setattr__(self, "issuer_der", self.signing_cert.subject.public_bytes())
        if isinstance(self.signing_key, rsa.RSAPrivateKey):
            algorithm = der.RSA_SHA256
        else:
            algorithm = der.ECDSA_SHA384 if isinstance(self.signing_hash, hashes.SHA384) else der.ECDSA_SHA256
        object.__setattr__(self, "signature_algorithm_der", algorithm)

    def sign_tbs(self, tbs: bytes) -> bytes:
        """Signature over a TBSCertificate with the CA key (PKCS#1 v1.5 for RSA, as istiod's Go x509)."""
        if isinstance(self.signing_key, rsa.RSAPrivateKey):
            return self.signing_key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        return self.signing_key.sign(tbs, ec.ECDSA(self.signing_hash))

    @property
    def not_after(self) -> dt.datetime:
        return self.signing_cert.not_valid_after_utc

    @property
    def root_not_after(self) -> dt.datetime:
        return min(r.not_valid_after_utc for r in self.roots)


def _parse_certs(data: bytes, label: str, what: str) -> list[x509.Certificate]:
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"{what} {label} is not a PEM certificate bundle") from None


def _parse_key(data: bytes, label: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never echo the content: it is a private key.
        raise CAError(f"CA key {label} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"CA key {label} must be ECDSA or RSA")
    return key


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def validate(material: CAMaterial, now: dt.datetime) -> None:
    """The signing key matches, every link is a CA signed by the next, and the path ends at a root."""
    pub = material.signing_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert_pub = material.signing_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != cert_pub:
        raise CAError(f"{material.source}: CA key does not match the CA certificate")
    if not material.roots:
        raise CAError(f"{material.source}: no root certificate")
    path = [material.signing_cert, *material.chain[1:]] if material.chain else [material.signing_cert]
    for cert in path:
        if not _is_ca(cert):
            raise CAError(f"{material.source}: {cert.subject.rfc4514_string()} is not a CA certificate")
        if cert.not_valid_after_utc <= now:
            raise CAError(f"{material.source}: {cert.subject.rfc4514_string()} expired {cert.not_valid_after_utc}")
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            raise CAError(
                f"{material.source}: cert-chain.pem is not a chain: {child.subject.rfc4514_string()} "
                f"is not signed by {parent.subject.rfc4514_string()}"
            )
    top = path[-1]
    if not any(top == r or _issued_by(top, r) for r in material.roots):
        raise CAError(f"{material.source}: the CA certificate does not chain to any certificate in root-cert.pem")


# Istio's plug-in names, then the Kubernetes TLS Secret names istiod also accepts.
CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN = "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"
TLS_CERT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"
MATERIAL_NAMES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN, TLS_CERT, TLS_KEY, TLS_CA)


def load_material(
    items: Mapping[str, bytes], source: str, now: dt.datetime, *, label: Callable[[str], str] | None = None
) -> CAMaterial:
    """CA material from Istio's `cacerts` layout given as name -> bytes (a folder's files or a Secret's keys).

    `label(name)` names an item in error messages (a path, or the Secret key); messages never hold key bytes.
    """
    where = label or (lambda name: f"{source}/{name}")
    if CA_CERT in items:
        cert_name, key_name, root_name, chain_name = CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN
    elif TLS_CERT in items:
        cert_name, key_name, root_name, chain_name = TLS_CERT, TLS_KEY, TLS_CA, TLS_CERT
    else:
        raise CAError(f"{source} has neither {CA_CERT} nor {TLS_CERT}")
    certs = _parse_certs(items[cert_name], where(cert_name), "CA certificate")
    if not certs:
        raise CAError(f"{where(cert_name)} is empty")
    signing = certs[0]
    if key_name not in items:
        raise CAError(f"cannot read CA key {where(key_name)}: it is missing")
    key = _parse_key(items[key_name], where(key_name))
    roots = tuple(_parse_certs(items[root_name], where(root_name), "root bundle")) if root_name in items else ()
    if not roots and signing.issuer == signing.subject:
        roots = (signing,)
    chain_certs = _parse_certs(items[chain_name], where(chain_name), "cert chain") if chain_name in items else certs
    # Keep the signing cert first and drop roots: the response carries the root bundle separately.
    chain: list[x509.Certificate] = []
    if signing not in roots:
        chain.append(signing)
        chain.extend(c for c in chain_certs if c != signing and c not in roots and c not in chain)
    material = CAMaterial(signing, key, tuple(chain), roots, source=source)
    validate(material, now)
    return material


def _read_folder(folder: Path) -> dict[str, bytes]:
    items: dict[str, bytes] = {}
    for name in MATERIAL_NAMES:
        path = folder / name
        try:
            items[name] = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as err:
            what = "CA key" if name in (CA_KEY, TLS_KEY) else "CA file"
            raise CAError(f"cannot read {what} {path}: {err.strerror}") from None
    return items


def load_cacerts(folder: Path, now: dt.datetime) -> CAMaterial:
    """Load a plugged-in CA from Istio's `cacerts` layout in a folder."""
    return load_material(_read_folder(folder), str(folder), now, label=lambda name: str(folder / name))


def material_items(material: CAMaterial) -> dict[str, bytes]:
    """The material in Istio's layout (what `save` writes and istio-ca-secret holds). Contains the key."""
    return {
        CA_CERT: pem(material.signing_cert).encode(),
        CA_KEY: key_pem(material.signing_key),
        CERT_CHAIN: "".join(material.chain_pems).encode(),
        ROOT_CERT: material.root_bundle_pem.encode(),
    }


def _self_signed_cert(key: SigningKey, name: x509.Name, ttl: dt.timedelta, now: dt.datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=2))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hash_for(key))
    )


def create_self_signed(algorithm: str, trust_domain: str, ttl: dt.timedelta, now: dt.datetime) -> CAMaterial:
    key = generate_key(algorithm)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    cert = _self_signed_cert(key, name, ttl, now)
    return CAMaterial(cert, key, (), (cert,), source="self-signed")


def is_self_signed_root(material: CAMaterial) -> bool:
    return not material.chain and material.roots == (material.signing_cert,)


def root_rotation_due(cert: x509.Certificate, now: dt.datetime, grace_percentile: int) -> bool:
    """True once less than `grace_percentile` % of the certificate's lifetime is left (Istio's rule)."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * grace_percentile / 100


def reissue_root(material: CAMaterial, ttl: dt.timedelta, now: dt.datetime) -> CAMaterial:
    """A new self-signed root with the same key and subject, as istiod's root rotator makes: certificates
    issued under the old root verify under the new one, so nothing needs re-issuing at the switch."""
    if not is_self_signed_root(material):
        raise CAError(f"{material.source}: only a self-signed root can be re-issued")
    cert = _self_signed_cert(material.signing_key, material.signing_cert.subject, ttl, now)
    return CAMaterial(cert, material.signing_key, (), (cert,), source=material.source)


def key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def save(material: CAMaterial, folder: Path) -> None:
    """Write in Istio's layout. The key goes first (0600) and ca-cert.pem last, so a crash in between
    leaves a folder that `load_or_create` recognises as incomplete and regenerates."""
    ensure_private_dir(folder)
    items = material_items(material)
    write_atomic(folder / CA_KEY, items[CA_KEY], mode=0o600)
    write_atomic(folder / ROOT_CERT, items[ROOT_CERT])
    write_atomic(folder / CERT_CHAIN, items[CERT_CHAIN])
    write_atomic(folder / CA_CERT, items[CA_CERT])


def load_or_create(
    cacerts_dir: Path | None,
    state_ca_dir: Path,
    *,
    algorithm: str,
    trust_domain: str,
    self_signed_ttl: dt.timedelta,
    now: dt.datetime,
) -> CAMaterial:
    """Plugged-in CA if given, else our self-signed root from the state folder, created on first start."""
    if cacerts_dir is not None:
        material = load_cacerts(cacerts_dir, now)
        log.info(
            "using plugged-in CA from %s (signing cert %s)", cacerts_dir, material.signing_cert.subject.rfc4514_string()
        )
        return material
    if (state_ca_dir / "ca-cert.pem").exists():
        material = load_cacerts(state_ca_dir, now)
        log.info("loaded self-signed root from %s, valid until %s", state_ca_dir, material.not_after.isoformat())
        return material
    material = create_self_signed(algorithm, trust_domain, self_signed_ttl, now)
    save(material, state_ca_dir)
    log.info(
        "created self-signed %s root in %s, valid until %s", algorithm, state_ca_dir, material.not_after.isoformat()
    )
    return material
