"""The leaf template and CSR checks, as pure functions (istiod's ca_test / generate_cert_test cases)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509

from sds.ca import keyring, signer
from tests.helpers import make_csr, new_key

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
ID = "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.fixture(scope="module")
def ca() -> keyring.CAMaterial:
    return keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(days=3650), NOW)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        (0, dt.timedelta(hours=24)),
        (-1, dt.timedelta(hours=24)),
        (60, dt.timedelta(minutes=1)),
        (90 * 86400, dt.timedelta(days=90)),
    ],
)
def test_resolve_ttl(requested: int, expected: dt.timedelta) -> None:
    assert signer.resolve_ttl(requested, signer.SignPolicy()) == expected


def test_resolve_ttl_above_max_is_an_error() -> None:
    with pytest.raises(signer.TTLError):
        signer.resolve_ttl(90 * 86400 + 1, signer.SignPolicy())


def test_not_after_is_clamped_to_the_signing_cert(ca: keyring.CAMaterial) -> None:
    short = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(hours=1), NOW)
    key = signer.parse_csr(make_csr(new_key()))
    cert = x509.load_pem_x509_certificate(signer.sign(key, [ID], dt.timedelta(hours=24), short, NOW)[0].encode())
    assert cert.not_valid_after_utc == short.not_after


def test_expired_ca_is_not_ready() -> None:
    old = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(hours=1), NOW)
    key = signer.parse_csr(make_csr(new_key()))
    with pytest.raises(signer.CANotReady):
        signer.sign(key, [ID], dt.timedelta(hours=1), old, NOW + dt.timedelta(hours=2))


@pytest.mark.parametrize(
    ("identities", "kinds"),
    [([ID], [x509.UniformResourceIdentifier]), (["10.0.0.1", "example.com"], [x509.IPAddress, x509.DNSName])],
)
def test_san_kinds(ca: keyring.CAMaterial, identities: list[str], kinds: list[type]) -> None:
    key = signer.parse_csr(make_csr(new_key()))
    cert = x509.load_pem_x509_certificate(signer.sign(key, identities, dt.timedelta(hours=1), ca, NOW)[0].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert [type(n) for n in san.value] == kinds


def test_serials_are_random_and_128_bit(ca: keyring.CAMaterial) -> None:
    key = signer.parse_csr(make_csr(new_key()))
    serials = {
        x509.load_pem_x509_certificate(signer.sign(key, [ID], dt.timedelta(hours=1), ca, NOW)[0].encode()).serial_number
        for _ in range(50)
    }
    assert len(serials) == 50 and all(0 < s < 2**128 for s in serials)
    assert max(serials).bit_length() > 120


@pytest.mark.parametrize("kind", ["ec256", "ec384", "rsa2048"])
def test_accepted_keys(kind: str) -> None:
    signer.parse_csr(make_csr(new_key(kind)))


@pytest.mark.parametrize(
    ("kind", "message"), [("rsa1024", "below the minimum"), ("ec521", "secp521r1"), ("ed25519", "not accepted")]
)
def test_rejected_keys(kind: str, message: str) -> None:
    with pytest.raises(signer.CSRError, match=message):
        signer.parse_csr(make_csr(new_key(kind)))


def test_no_identity_no_certificate(ca: keyring.CAMaterial) -> None:
    with pytest.raises(signer.CSRError):
        signer.sign(signer.parse_csr(make_csr(new_key())), [], dt.timedelta(hours=1), ca, NOW)


@pytest.mark.parametrize("ca_kind", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
@pytest.mark.parametrize("identities", [[ID], ["10.0.0.1", "example.com", ID]])
def test_der_leaf_is_byte_identical_to_certificate_builder(ca_kind: str, identities: list[str]) -> None:
    """The fast DER path must encode exactly what cryptography's CertificateBuilder encodes."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    authority = keyring.create_self_signed(ca_kind, "cluster.local", dt.timedelta(days=3650), NOW)
    key = signer.parse_csr(make_csr(new_key()))
    serial = 0xF0E1D2C3B4A5968778695A4B3C2D1E0F
    ours = x509.load_pem_x509_certificate(
        signer.sign(key, identities, dt.timedelta(hours=5), authority, NOW, serial=serial)[0].encode()
    )
    names = []
    for ident in identities:
        if "://" in ident:
            names.append(x509.UniformResourceIdentifier(ident))
        elif ident[0].isdigit():
            import ipaddress

            names.append(x509.IPAddress(ipaddress.ip_address(ident)))
        else:
            names.append(x509.DNSName(ident))
    reference = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.signing_cert.subject)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(minutes=2))
        .not_valid_after(NOW + dt.timedelta(hours=5))
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority.ski), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .sign(authority.signing_key, authority.signing_hash)
    )
    assert ours.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == reference.signature_algorithm_oid
    ours.verify_directly_issued_by(authority.signing_cert)


def test_huge_ttl_from_the_wire_is_a_ttl_error() -> None:
    with pytest.raises(signer.TTLError):
        signer.resolve_ttl(2**63 - 1, signer.SignPolicy())


def test_validity_after_2049_uses_generalized_time() -> None:
    future = dt.datetime(2049, 12, 31, 23, 0, tzinfo=dt.UTC)
    authority = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(days=10), future)
    key = signer.parse_csr(make_csr(new_key()))
    cert = x509.load_pem_x509_certificate(signer.sign(key, [ID], dt.timedelta(days=2), authority, future)[0].encode())
    assert cert.not_valid_after_utc == future + dt.timedelta(days=2)
