"""Where a workload certificate is signed. Pure: CSR + identities + TTL + CA material + now → PEM chain.

The template is istiod's (security/pkg/pki/util/generate_cert.go): empty subject, a critical SAN holding
the *authenticated* identities (the CSR's own SANs are ignored), random 128-bit serial, NotBefore two
minutes in the past for clock skew, NotAfter clamped to the signing certificate, DigitalSignature |
KeyEncipherment, ServerAuth + ClientAuth, not a CA.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sds.ca import der
from sds.ca.keyring import CAMaterial

CLOCK_SKEW_GRACE = dt.timedelta(minutes=2)
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class SignError(Exception):
    """Base of the signing errors; each maps to one gRPC status as istiod maps them."""


class CSRError(SignError):
    """The CSR is unusable (maps to InvalidArgument)."""


class TTLError(SignError):
    """The requested lifetime exceeds the maximum (maps to InvalidArgument; never clamped)."""


class CANotReady(SignError):
    """The CA cannot sign right now, e.g. its certificate expired (maps to Internal)."""


@dataclass(frozen=True, slots=True)
class SignPolicy:
    default_ttl: dt.timedelta = dt.timedelta(hours=24)
    max_ttl: dt.timedelta = dt.timedelta(days=90)


def parse_csr(csr_pem: str | bytes) -> PublicKey:
    """Parse and check a CSR (PEM only, valid self-signature, accepted key type and size); return its key.

    Nothing else of the CSR is used: subject and SANs come from the authenticated caller."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data and b"-----BEGIN NEW CERTIFICATE REQUEST-----" not in data:
        raise CSRError("CSR is not PEM encoded")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CSRError("CSR could not be parsed") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType):
        raise CSRError("CSR carries an unsupported public key") from None
    if not valid:
        raise CSRError("CSR signature is invalid")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRError(f"RSA key of {key.key_size} bits is below the minimum of {MIN_RSA_BITS}")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CSRError(f"elliptic curve {key.curve.name} is not accepted (P-256 or P-384)")
    else:
        raise CSRError(
            f"{type(key).__name__.removeprefix('_')} keys are not accepted (ECDSA P-256/P-384 or RSA >= 2048)"
        )
    return key


def resolve_ttl(requested_seconds: int, policy: SignPolicy) -> dt.timedelta:
    if requested_seconds <= 0:
        return policy.default_ttl
    max_seconds = int(policy.max_ttl.total_seconds())
    # Compare as integers first: an int64 from the wire can overflow timedelta.
    if requested_seconds > max_seconds:
        raise TTLError(f"requested TTL {requested_seconds}s is greater than the max allowed TTL {max_seconds}s")
    return dt.timedelta(seconds=requested_seconds)


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def _san_names(identities: Sequence[str]) -> list[bytes]:
    names: list[bytes] = []
    for ident in identities:
        if "://" in ident:
            names.append(der.general_name("uri", ident.encode("ascii")))
            continue
        try:
            names.append(der.general_name("ip", ipaddress.ip_address(ident).packed))
        except ValueError:
            names.append(der.general_name("dns", ident.encode("idna")))
    return names


def sign(
    public_key: PublicKey,
    identities: Sequence[str],
    ttl: dt.timedelta,
    ca: CAMaterial,
    now: dt.datetime,
    *,
    serial: int | None = None,
) -> list[str]:
    """Issue the leaf and return [leaf, *chain] as PEM strings, each ending in a newline (no roots)."""
    if not identities:
        raise CSRError("no identity to put in the certificate")
    if ca.not_after <= now:
        raise CANotReady("the CA signing certificate has expired")
    try:
        sans = _san_names(identities)
    except (UnicodeError, ValueError):
        raise CSRError("identity is not encodable in a certificate") from None
    now = now.replace(microsecond=0)
    tbs = der.leaf_tbs(
        # 128 random bits as istiod (a zero serial is not allowed, hence `or 1`).
        serial=serial if serial is not None else (secrets.randbits(128) or 1),
        signature_algorithm=ca.signature_algorithm_der,
        issuer_der=ca.issuer_der,
        not_before=now - CLOCK_SKEW_GRACE,
        not_after=min(now + ttl, ca.not_after),
        spki_der=public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        authority_key_id=ca.ski.digest,
        san_names=sans,
    )
    signature = ca.sign_tbs(tbs)
    return [_pem(der.certificate(tbs, ca.signature_algorithm_der, signature)), *ca.chain_pems]
