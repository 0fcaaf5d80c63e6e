"""Where a workload certificate is signed. Pure: CSR + identities + TTL + CA material + now → PEM chain.

The template is istiod's (security/pkg/pki/util/generate_cert.go): empty subject, a critical SAN holding
the *authenticated* identities (the CSR's own SANs are ignored), random 128-bit serial, NotBefore two
minutes in the past for clock skew, NotAfter clamped to the signing certificate, DigitalSignature |
KeyEncipherment, ServerAuth + ClientAuth, not a CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from sds.ca.keyring import CAMaterial, pem

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
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
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
    ttl = dt.timedelta(seconds=requested_seconds)
    if ttl > policy.max_ttl:
        max_seconds = int(policy.max_ttl.total_seconds())
        raise TTLError(f"requested TTL {requested_seconds}s is greater than the max allowed TTL {max_seconds}s")
    return ttl


def san_entries(identities: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for ident in identities:
        if "://" in ident:
            names.append(x509.UniformResourceIdentifier(ident))
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ident)))
        except ValueError:
            names.append(x509.DNSName(ident))
    return names


_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_EXT_KEY_USAGE = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_NOT_CA = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME = x509.Name([])


def sign(
    public_key: PublicKey,
    identities: Sequence[str],
    ttl: dt.timedelta,
    ca: CAMaterial,
    now: dt.datetime,
) -> list[str]:
    """Issue the leaf and return [leaf, *chain] as PEM strings, each ending in a newline (no roots)."""
    if not identities:
        raise CSRError("no identity to put in the certificate")
    if ca.not_after <= now:
        raise CANotReady("the CA signing certificate has expired")
    not_after = min(now + ttl, ca.not_after)
    # Serial: 128 random bits as istiod (a zero serial is not allowed, hence `or 1`).
    serial = secrets.randbits(128) or 1
    cert = (
        x509.CertificateBuilder()
        .subject_name(_EMPTY_NAME)
        .issuer_name(ca.signing_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(not_after)
        .add_extension(_KEY_USAGE, critical=True)
        .add_extension(_EXT_KEY_USAGE, critical=False)
        .add_extension(_NOT_CA, critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.ski), critical=False)
        # Critical because the subject is empty (RFC 5280 4.2.1.6, SPIFFE X509-SVID).
        .add_extension(x509.SubjectAlternativeName(san_entries(identities)), critical=True)
        .sign(ca.signing_key, ca.signing_hash)
    )
    return [pem(cert), *ca.chain_pems]
