"""Plugged-in cacerts (with an intermediate) and the self-signed root."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sds.ca import keyring
from tests.cacerts import make_cacerts

NOW = dt.datetime.now(dt.UTC)


def test_intermediate_layout(tmp_path: Path) -> None:
    root, inter = make_cacerts(tmp_path)
    material = keyring.load_cacerts(tmp_path, NOW)
    assert material.signing_cert == inter
    assert material.chain == (inter,)
    assert material.roots == (root,)


def test_kubernetes_tls_names(tmp_path: Path) -> None:
    make_cacerts(tmp_path / "src")
    (tmp_path / "tls.crt").write_text((tmp_path / "src" / "cert-chain.pem").read_text())
    (tmp_path / "tls.key").write_bytes((tmp_path / "src" / "ca-key.pem").read_bytes())
    (tmp_path / "ca.crt").write_text((tmp_path / "src" / "root-cert.pem").read_text())
    material = keyring.load_cacerts(tmp_path, NOW)
    assert len(material.chain) == 1 and len(material.roots) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("swap-key", "does not match"),
        ("foreign-root", "does not chain"),
        ("garbage-key", "not an unencrypted PEM private key"),
        ("missing-key", "cannot read CA key"),
        ("garbage-cert", "not a PEM certificate bundle"),
    ],
)
def test_broken_cacerts_are_refused_with_a_clear_message(tmp_path: Path, damage: str, message: str) -> None:
    make_cacerts(tmp_path / "a")
    make_cacerts(tmp_path / "b")
    a = tmp_path / "a"
    if damage == "swap-key":
        (a / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    elif damage == "foreign-root":
        (a / "root-cert.pem").write_bytes((tmp_path / "b" / "root-cert.pem").read_bytes())
        (a / "cert-chain.pem").write_bytes((a / "ca-cert.pem").read_bytes())
    elif damage == "garbage-key":
        (a / "ca-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    elif damage == "missing-key":
        (a / "ca-key.pem").unlink()
    elif damage == "garbage-cert":
        (a / "ca-cert.pem").write_text("hello")
    with pytest.raises(keyring.CAError, match=message) as err:
        keyring.load_cacerts(a, NOW)
    assert "c2VjcmV0" not in str(err.value)


def test_expired_intermediate_is_refused(tmp_path: Path) -> None:
    make_cacerts(tmp_path, intermediate_ttl=dt.timedelta(minutes=30), now=NOW - dt.timedelta(hours=2))
    with pytest.raises(keyring.CAError, match="expired"):
        keyring.load_cacerts(tmp_path, NOW)


def test_self_signed_is_created_once_and_reloaded(tmp_path: Path) -> None:
    args = {
        "algorithm": "ecdsa-p256",
        "trust_domain": "cluster.local",
        "self_signed_ttl": dt.timedelta(days=3650),
        "now": NOW,
    }
    first = keyring.load_or_create(None, tmp_path / "ca", **args)
    second = keyring.load_or_create(None, tmp_path / "ca", **args)
    assert first.signing_cert == second.signing_cert
    assert isinstance(first.signing_key, ec.EllipticCurvePrivateKey)
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert first.signing_cert.subject.rfc4514_string() == "O=cluster.local"


def test_half_written_folder_is_regenerated(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    folder.mkdir()
    (folder / "ca-key.pem").write_text("partial")
    material = keyring.load_or_create(
        None, folder, algorithm="rsa-2048", trust_domain="td", self_signed_ttl=dt.timedelta(days=1), now=NOW
    )
    assert keyring.load_cacerts(folder, NOW).signing_cert == material.signing_cert
