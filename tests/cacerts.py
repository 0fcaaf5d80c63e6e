"""Build Istio `cacerts` folders (root → intermediate) the way the plug-in CA docs describe."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sds.ca.keyring import key_pem, pem


def _ca_cert(subject: str, key, issuer_name: x509.Name, issuer_key, not_after: dt.datetime, now: dt.datetime):
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                    x509.NameAttribute(NameOID.COMMON_NAME, subject),
                ]
            )
        )
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def make_cacerts(
    folder: Path, *, intermediate_ttl: dt.timedelta = dt.timedelta(days=365), now: dt.datetime | None = None
) -> tuple[x509.Certificate, x509.Certificate]:
    now = now or dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"), x509.NameAttribute(NameOID.COMMON_NAME, "Root CA")]
    )
    root = _ca_cert("Root CA", root_key, root_name, root_key, now + dt.timedelta(days=3650), now)
    int_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca_cert("Intermediate CA", int_key, root.subject, root_key, now + intermediate_ttl, now)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "root-cert.pem").write_text(pem(root))
    (folder / "ca-cert.pem").write_text(pem(inter))
    (folder / "ca-key.pem").write_bytes(key_pem(int_key))
    (folder / "cert-chain.pem").write_text(pem(inter) + pem(root))
    return root, inter
