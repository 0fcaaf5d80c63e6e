"""Plugged-in cacerts (with an intermediate) and the self-signed root."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sds.ca import keyring, signer
from tests.cacerts import make_cacerts
from tests.helpers import new_key

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


def test_folder_and_bytes_share_one_loader(tmp_path: Path) -> None:
    root, inter = make_cacerts(tmp_path)
    items = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    material = keyring.load_material(items, "Secret ns/cacerts", NOW, label=lambda k: f"Secret ns/cacerts key {k}")
    assert (material.signing_cert, material.chain, material.roots) == (inter, (inter,), (root,))
    with pytest.raises(keyring.CAError, match=r"^cannot read CA key Secret ns/cacerts key ca-key\.pem: it is missing$"):
        keyring.load_material({k: v for k, v in items.items() if k != "ca-key.pem"}, "Secret ns/cacerts", NOW,
                              label=lambda k: f"Secret ns/cacerts key {k}")  # fmt: skip
    # What save() writes (and istio-ca-secret holds) loads back to the same material.
    created = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(days=1), NOW)
    again = keyring.load_material(keyring.material_items(created), "x", NOW)
    assert again.signing_cert == created.signing_cert and again.roots == created.roots and again.chain == ()


@pytest.mark.parametrize(
    ("left", "lifetime", "percentile", "due"),
    [
        (dt.timedelta(days=3000), dt.timedelta(days=3650), 20, False),
        (dt.timedelta(days=700), dt.timedelta(days=3650), 20, True),
        (dt.timedelta(minutes=30), dt.timedelta(hours=1), 20, False),
        (dt.timedelta(minutes=30), dt.timedelta(hours=1), 60, True),
        (-dt.timedelta(minutes=1), dt.timedelta(hours=1), 1, True),
    ],
)
def test_root_rotation_due(left: dt.timedelta, lifetime: dt.timedelta, percentile: int, due: bool) -> None:
    # create_self_signed backdates notBefore by 2 minutes; place notAfter `left` from NOW.
    now = NOW.replace(microsecond=0)  # certificates hold whole seconds
    start = now + left - lifetime
    root = keyring.create_self_signed(
        "ecdsa-p256", "td", lifetime - dt.timedelta(minutes=2), start + dt.timedelta(minutes=2)
    )
    assert root.signing_cert.not_valid_after_utc - now == left
    assert keyring.root_rotation_due(root.signing_cert, now, percentile) is due


def test_reissued_root_keeps_key_and_subject_so_old_leaves_still_verify(tmp_path: Path) -> None:
    old = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(hours=1), NOW)
    leaf_pem = signer.sign(
        new_key().public_key(), ["spiffe://cluster.local/ns/a/sa/b"], dt.timedelta(minutes=5), old, NOW
    )
    new = keyring.reissue_root(old, dt.timedelta(days=3650), NOW)
    assert new.signing_cert.subject == old.signing_cert.subject and new.signing_key is old.signing_key
    assert new.signing_cert.serial_number != old.signing_cert.serial_number and new.roots == (new.signing_cert,)
    keyring.validate(new, NOW)
    x509.load_pem_x509_certificate(leaf_pem[0].encode()).verify_directly_issued_by(new.signing_cert)
    root, inter = make_cacerts(tmp_path)
    with pytest.raises(keyring.CAError, match="only a self-signed root"):
        keyring.reissue_root(
            keyring.CAMaterial(inter, old.signing_key, (inter,), (root,), "plug"), dt.timedelta(1), NOW
        )
