"""CreateCertificate end to end: real gRPC over TLS to an in-process ztd."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers import RunningZtd, bearer, make_csr, new_key, request

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
AUTHN_FAILURE = "request authenticate failure"
IMPERSONATION_FAILURE = "request impersonation authentication failure"


async def issue(ztd: RunningZtd, req, metadata) -> list[str]:
    async with ztd.secure_channel() as ch:
        resp = await ztd.ca(ch).CreateCertificate(req, metadata=metadata)
    return list(resp.cert_chain)


async def refused(ztd: RunningZtd, req, metadata, code=grpc.StatusCode.UNAUTHENTICATED) -> str:
    async with ztd.secure_channel() as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ztd.ca(ch).CreateCertificate(req, metadata=metadata)
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


def leaf_of(chain: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain[0].encode())


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


@pytest.mark.parametrize("kind", ["ec256", "ec384", "rsa2048", "rsa3072"])
async def test_issues_istiod_template_for_each_key_type(ztd: RunningZtd, kind: str) -> None:
    key = new_key(kind)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    chain = await issue(ztd, request(make_csr(key)), bearer(ztd.token("shop/frontend")))
    after = dt.datetime.now(dt.UTC)
    assert len(chain) == 2 and all(pem.endswith("\n") for pem in chain)
    assert chain[-1].encode() == ztd.root_pem
    cert = leaf_of(chain)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and uri_sans(cert) == [FRONTEND]
    assert 0 < cert.serial_number < 2**128
    assert before - dt.timedelta(minutes=2, seconds=1) <= cert.not_valid_before_utc <= after - dt.timedelta(minutes=2)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime - dt.timedelta(hours=24, minutes=2)) < dt.timedelta(seconds=5)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


async def test_csr_sans_are_replaced_by_the_callers_identity(ztd: RunningZtd) -> None:
    csr = make_csr(new_key(), sans=["spiffe://cluster.local/ns/istio-system/sa/istiod", "spiffe://evil/ns/a/sa/b"])
    chain = await issue(ztd, request(csr), bearer(ztd.token("shop/frontend")))
    assert uri_sans(leaf_of(chain)) == [FRONTEND]


async def test_chain_verifies_with_cryptography_and_openssl(ztd: RunningZtd, tmp_path: Path) -> None:
    chain = await issue(ztd, request(make_csr(new_key())), bearer(ztd.token("shop/frontend")))
    roots = x509.load_pem_x509_certificates(ztd.root_pem)
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf_of(chain), [])
    assert verified.subjects is not None
    assert [str(s.value) for s in verified.subjects] == [FRONTEND]
    (tmp_path / "leaf.pem").write_text(chain[0])
    (tmp_path / "root.pem").write_bytes(ztd.root_pem)
    out = await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-purpose",
            "sslclient",
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (0, dt.timedelta(hours=24)),
        (-5, dt.timedelta(hours=24)),
        (3600, dt.timedelta(hours=1)),
        (90 * 86400, dt.timedelta(days=90)),
    ],
)
async def test_ttl_default_and_requested(ztd: RunningZtd, ttl: int, expected: dt.timedelta) -> None:
    chain = await issue(ztd, request(make_csr(new_key()), ttl=ttl), bearer(ztd.token("shop/frontend")))
    cert = leaf_of(chain)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc - dt.timedelta(minutes=2)
    assert abs(lifetime - expected) < dt.timedelta(seconds=5)


async def test_ttl_above_max_is_invalid_argument_not_clamped(ztd: RunningZtd) -> None:
    details = await refused(
        ztd,
        request(make_csr(new_key()), ttl=90 * 86400 + 1),
        bearer(ztd.token("shop/frontend")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("CSR signing error (") and "max allowed TTL" in details


@pytest.mark.parametrize(
    ("csr", "why"),
    [
        ("not a csr", "not PEM"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "could not be parsed"),
        (None, "signature is invalid"),
        ("rsa1024", "below the minimum"),
        ("ec521", "not accepted"),
        ("ed25519", "not accepted"),
    ],
)
async def test_bad_csrs_are_invalid_argument(ztd: RunningZtd, csr: str | None, why: str) -> None:
    if csr is None:
        der = bytearray(x509.load_pem_x509_csr(make_csr(new_key("rsa2048")).encode()).public_bytes(Encoding.DER))
        der[-1] ^= 0x01  # the last byte is inside the signature: still parses, no longer verifies
        csr = x509.load_der_x509_csr(bytes(der)).public_bytes(Encoding.PEM).decode()
    elif csr in ("rsa1024", "ec521", "ed25519"):
        csr = make_csr(new_key(csr))
    details = await refused(ztd, request(csr), bearer(ztd.token("shop/frontend")), grpc.StatusCode.INVALID_ARGUMENT)
    assert why in details


def _foreign_token(ztd: RunningZtd, **claims_override) -> str:
    import jwt as pyjwt

    key = ec.generate_private_key(ec.SECP256R1())
    now = int(dt.datetime.now(dt.UTC).timestamp())
    claims = {
        "iss": "ztd://cluster.local",
        "sub": "system:serviceaccount:shop:frontend",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 600,
    }
    claims.update(claims_override)
    return pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": "foreign"})


@pytest.mark.parametrize(
    "case", ["expired", "wrong-audience", "wrong-issuer", "foreign-key", "garbage", "none-alg", "no-bearer", "empty"]
)
async def test_bad_tokens_are_opaque_unauthenticated(ztd: RunningZtd, case: str) -> None:
    now = dt.datetime.now(dt.UTC)
    if case == "expired":
        md = bearer(ztd.token("shop/frontend", duration=60, now=now - dt.timedelta(hours=1)))
    elif case == "wrong-audience":
        md = bearer(ztd.token("shop/frontend", audience="kubernetes"))
    elif case == "wrong-issuer":
        from sds.ca import issuer

        tokens = issuer.load(ztd.cfg.state_dir / "issuer", "other.domain")
        md = bearer(tokens.mint("shop", "frontend", audiences=["istio-ca"], duration=dt.timedelta(hours=1), now=now))
    elif case == "foreign-key":
        md = bearer(_foreign_token(ztd))
    elif case == "garbage":
        md = bearer("eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.AAAA")
    elif case == "none-alg":
        import base64
        import json

        def b64(d: dict) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

        md = bearer(
            b64({"alg": "none"})
            + "."
            + b64(
                {
                    "iss": "ztd://cluster.local",
                    "aud": "istio-ca",
                    "sub": "system:serviceaccount:shop:frontend",
                    "exp": 4102444800,
                }
            )
            + "."
        )
    elif case == "no-bearer":
        md = [("authorization", ztd.token("shop/frontend"))]
    else:
        md = []
    failures = ztd.ztd.ca_metrics.authn_failure.value()
    issued = ztd.ztd.ca_metrics.success.value()
    assert await refused(ztd, request(make_csr(new_key())), md) == AUTHN_FAILURE
    assert ztd.ztd.ca_metrics.authn_failure.value() == failures + 1
    assert ztd.ztd.ca_metrics.success.value() == issued


def ztunnel_token(ztd: RunningZtd, **kw) -> list[tuple[str, str]]:
    return bearer(ztd.token("istio-system/ztunnel", pod=kw.pop("pod", "ztunnel-a"), **kw))


async def test_impersonation_for_a_pod_on_the_callers_node(ztd: RunningZtd) -> None:
    chain = await issue(ztd, request(make_csr(new_key()), ImpersonatedIdentity=FRONTEND), ztunnel_token(ztd))
    assert uri_sans(leaf_of(chain)) == [FRONTEND]


async def test_impersonation_with_node_bound_token(ztd: RunningZtd) -> None:
    md = bearer(ztd.token("istio-system/ztunnel", node="node-a"))
    chain = await issue(ztd, request(make_csr(new_key()), ImpersonatedIdentity=FRONTEND), md)
    assert uri_sans(leaf_of(chain)) == [FRONTEND]


@pytest.mark.parametrize(
    ("case", "identity"),
    [
        ("not-on-node", "spiffe://cluster.local/ns/shop/sa/cart"),  # cart runs on node-b only
        ("unknown-sa", "spiffe://cluster.local/ns/shop/sa/nobody"),
        ("failed-pod-only", "spiffe://cluster.local/ns/shop/sa/legacy"),
        ("untrusted-caller", FRONTEND),
        ("stale-pod-uid", FRONTEND),
        ("caller-pod-missing", FRONTEND),
        ("unknown-node", FRONTEND),
        ("malformed-identity", "spiffe://cluster.local/shop/frontend"),
        ("non-string", None),
    ],
)
async def test_impersonation_refused(ztd: RunningZtd, case: str, identity: str | None) -> None:
    md = ztunnel_token(ztd)
    if case == "untrusted-caller":
        md = bearer(ztd.token("shop/frontend", pod="frontend-1", pod_uid="6b1f0c0e-0000-4000-8000-000000000001"))
    elif case == "stale-pod-uid":
        md = ztunnel_token(ztd, pod_uid="00000000-dead-4000-8000-000000000000")
    elif case == "caller-pod-missing":
        md = ztunnel_token(ztd, pod="ztunnel-gone")
    elif case == "unknown-node":
        md = bearer(ztd.token("istio-system/ztunnel", node="node-z"))
    req = request(make_csr(new_key()), ImpersonatedIdentity=identity if identity is not None else 42)
    issued = ztd.ztd.ca_metrics.success.value()
    assert await refused(ztd, req, md) == IMPERSONATION_FAILURE
    assert ztd.ztd.ca_metrics.success.value() == issued


async def test_impersonation_refused_without_trusted_accounts(tmp_path: Path, mesh_dir: Path) -> None:
    from tests.helpers import running_ztd

    async with running_ztd(tmp_path, config_dir=mesh_dir, ca_trusted_node_accounts=()) as z:
        details = await refused(z, request(make_csr(new_key()), ImpersonatedIdentity=FRONTEND), ztunnel_token(z))
    assert details == IMPERSONATION_FAILURE


async def test_client_certificate_path(ztd: RunningZtd) -> None:
    key = new_key()
    chain = await issue(ztd, request(make_csr(key)), bearer(ztd.token("shop/frontend")))
    async with ztd.secure_channel(key, "".join(chain[:-1]).encode()) as ch:
        resp = await ztd.ca(ch).CreateCertificate(request(make_csr(new_key("rsa2048"))))
    assert uri_sans(leaf_of(list(resp.cert_chain))) == [FRONTEND]


async def test_client_certificate_from_a_foreign_ca_gets_nothing(ztd: RunningZtd, tmp_path: Path) -> None:
    from tests.helpers import running_ztd

    async with running_ztd(tmp_path / "other") as other:
        key = new_key()
        foreign = await issue(other, request(make_csr(key)), bearer(other.token("shop/frontend")))
    issued = ztd.ztd.ca_metrics.success.value()
    async with ztd.secure_channel(key, "".join(foreign[:-1]).encode()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ztd.ca(ch).CreateCertificate(request(make_csr(new_key())), timeout=5)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert ztd.ztd.ca_metrics.success.value() == issued


async def test_metrics_health_and_reflection(ztd: RunningZtd) -> None:
    await issue(ztd, request(make_csr(new_key())), bearer(ztd.token("shop/frontend")))
    await refused(ztd, request(make_csr(new_key())), [])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{ztd.cfg.monitoring_port}/metrics") as resp:
            text = await resp.text()
        async with http.get(f"http://127.0.0.1:{ztd.cfg.monitoring_port}/ready") as resp:
            assert resp.status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["citadel_server_csr_count"] == 2
    assert values["citadel_server_success_cert_issuance_count"] == 1
    assert values["citadel_server_authentication_failure_count"] == 1
    assert "# TYPE citadel_server_csr_count counter" in text
    assert values["citadel_server_root_cert_expiry_seconds"] > 9 * 365 * 86400
    assert values["citadel_server_cert_chain_expiry_timestamp"] > 0
    async with ztd.secure_channel() as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="istio.v1.auth.IstioCertificateService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo()
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await stream.read()
        await stream.done_writing()
    names = {s.name for s in listed.list_services_response.service}
    assert "istio.v1.auth.IstioCertificateService" in names


async def test_state_files_and_key_modes(ztd: RunningZtd) -> None:
    state = ztd.cfg.state_dir
    assert (state / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert (state / "issuer" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (state / "ca").stat().st_mode & 0o777 == 0o700
    root = x509.load_pem_x509_certificate(ztd.root_pem)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= dt.timedelta(days=3650)
    assert not isinstance(root.public_key(), rsa.RSAPublicKey)
