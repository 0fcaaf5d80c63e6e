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
