"""Renewal timing (pilot-agent's rotateTime), backoff, and the CA-answer checks of the SDS agent."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from tests.helpers import make_csr, new_key
from ztcore.backoff import Backoff
from ztcore.identity import Identity
from ztcore.identity.caclient import (
    CAClientError,
    CAClientOptions,
    SanMismatch,
    build_csr,
    generate_key,
    token_identity,
    verify_identity,
)
from ztcore.identity.manager import RotationPolicy, jittered_ratio, rotate_delay

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
M = dt.timedelta(minutes=1)
FRONTEND = Identity("cluster.local", "shop", "frontend")


# istio security/pkg/nodeagent/cache/secretcache_test.go TestRotateTimeNoJitter: a 1h cert created now.
@pytest.mark.parametrize(
    ("created", "expire", "ratio", "delay"),
    [
        (NOW, NOW + H, 0.5, 30 * M),
        (NOW, NOW + H, 0.25, 45 * M),
        (NOW, NOW + H, 0.75, 15 * M),
        (NOW, NOW + H, 1.0, dt.timedelta(0)),
        (NOW, NOW + H, 0.0, H),
        (NOW + 30 * M, NOW + 90 * M, 0.25, 75 * M),
        (NOW - 2 * H, NOW - H, 0.5, dt.timedelta(0)),  # already expired: renew at once
    ],
)
def test_rotate_time_no_jitter(created: dt.datetime, expire: dt.datetime, ratio: float, delay: dt.timedelta) -> None:
    assert rotate_delay(created, expire, NOW, ratio) == delay


@given(
    ratio=hs.floats(0, 1),
    jitter=hs.floats(0, 1),
    seed=hs.integers(0, 2**32),
)
def test_jitter_stays_within_its_bounds(ratio: float, jitter: float, seed: int) -> None:
    got = jittered_ratio(ratio, jitter, random.Random(seed))
    assert max(ratio - jitter, 0.0) - 1e-12 <= got <= min(ratio + jitter, 1.0) + 1e-12


def test_jitter_goes_both_ways_around_half_life() -> None:
    rng = random.Random(7)
    draws = [jittered_ratio(0.5, 0.01, rng) for _ in range(400)]
    assert min(draws) < 0.5 < max(draws)
    assert all(0.49 <= d <= 0.51 for d in draws)
    # 24h certificate: renewal between 11h45.6m and 12h14.4m after issue ("~15 minutes over 24 hours").
    delays = [rotate_delay(NOW, NOW + 24 * H, NOW, r) for r in draws]
    assert all(dt.timedelta(hours=11, minutes=45) <= d <= dt.timedelta(hours=12, minutes=15) for d in delays)


def test_backoff_doubles_from_half_a_second_to_150s() -> None:
    policy = RotationPolicy()
    steps = [Backoff(policy.backoff_initial, policy.backoff_max).delay(n) for n in range(1, 13)]
    assert steps[:5] == [0.5, 1, 2, 4, 8]
    assert steps[-1] == 150 and max(steps) == 150


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": dt.timedelta(0)}, "at least 1s"),
        ({"grace_ratio": 1.5}, "grace ratio"),
        ({"grace_jitter": -0.1}, "jitter"),
        ({"key_type": "dsa"}, "key type"),
    ],
)
def test_rotation_policy_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RotationPolicy(**kwargs)  # type: ignore[arg-type]


# -- CA client helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-2048"])
def test_csr_carries_the_identity_and_the_key(key_type: str) -> None:
    from cryptography import x509

    key = generate_key(key_type)
    csr = x509.load_pem_x509_csr(build_csr(key, FRONTEND).encode())
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [FRONTEND.uri]


def _signed_chain(identities: list[str]) -> list[str]:
    """A real leaf signed by a throwaway CA, as CreateCertificate returns it."""
    from sds.ca import keyring, signer

    material = keyring.create_self_signed("ecdsa-p256", "cluster.local", dt.timedelta(days=1), dt.datetime.now(dt.UTC))
    public_key = signer.parse_csr(make_csr(new_key()))
    chain = signer.sign(public_key, identities, dt.timedelta(hours=1), material, dt.datetime.now(dt.UTC))
    return [*chain, material.root_bundle_pem]


def test_verify_identity_accepts_exactly_the_requested_identity() -> None:
    leaf = verify_identity(_signed_chain([FRONTEND.uri]), FRONTEND)
    assert leaf.serial_number > 0
    with pytest.raises(SanMismatch, match=r"expected spiffe://cluster\.local/ns/shop/sa/cart"):
        verify_identity(_signed_chain([FRONTEND.uri]), Identity("cluster.local", "shop", "cart"))
    with pytest.raises(SanMismatch):
        verify_identity(_signed_chain([FRONTEND.uri, "spiffe://cluster.local/ns/shop/sa/cart"]), FRONTEND)
    with pytest.raises(CAClientError, match="expected a leaf and the root bundle"):
        verify_identity(_signed_chain([FRONTEND.uri])[:1], FRONTEND)
    with pytest.raises(CAClientError, match="not a PEM"):
        verify_identity(["junk", "root"], FRONTEND)


def _jwt(claims: dict[str, object]) -> str:
    import base64
    import json

    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'ES256'})}.{b64(claims)}.sig"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (_jwt({"kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "frontend"}}}), FRONTEND),
        (_jwt({"sub": "system:serviceaccount:shop:frontend"}), FRONTEND),
        (_jwt({"sub": "alice@example.com"}), None),
        (_jwt({"sub": "system:serviceaccount:shop"}), None),
        ("not-a-jwt", None),
        ("a.!!!.c", None),
    ],
)
def test_token_identity(token: str, expected: Identity | None) -> None:
    assert token_identity(token, "cluster.local") == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "token file or a client certificate"),
        ({"cert_file": "c.pem"}, "both --cert and --key"),
        ({"cert_file": "c.pem", "key_file": "k.pem", "plaintext": True}, "needs TLS"),
    ],
)
def test_ca_client_options_are_checked(kwargs: dict[str, object], message: str) -> None:
    from pathlib import Path

    args = {k: Path(v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        CAClientOptions(address="127.0.0.1:1", **args)  # type: ignore[arg-type]
