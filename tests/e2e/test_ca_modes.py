"""ztd's CA in its other configurations: plugged-in intermediate, extra serving names, plaintext dev port, OIDC."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from protos.istio.v1.auth import ca_pb2_grpc
from tests.cacerts import make_cacerts
from tests.helpers import bearer, make_csr, new_key, request, running_ztd

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


async def test_plugged_in_intermediate_chain_verifies_to_the_root(tmp_path: Path) -> None:
    root, inter = make_cacerts(tmp_path / "cacerts", intermediate_ttl=dt.timedelta(hours=3))
    async with running_ztd(tmp_path, cacerts_dir=tmp_path / "cacerts") as z:
        async with z.secure_channel() as ch:
            resp = await z.ca(ch).CreateCertificate(
                request(make_csr(new_key()), ttl=86400), metadata=bearer(z.token("shop/frontend"))
            )
        published = z.root_pem
    chain = list(resp.cert_chain)
    assert len(chain) == 3 and all(p.endswith("\n") for p in chain)
    leaf, middle = (x509.load_pem_x509_certificate(p.encode()) for p in chain[:2])
    assert middle == inter
    assert x509.load_pem_x509_certificates(chain[2].encode()) == [root]
    assert published.decode() == chain[2]
    # 24 h requested, the intermediate ends in 3 h: NotAfter is clamped to the signer.
    assert leaf.not_valid_after_utc == inter.not_valid_after_utc
    for i, pem in enumerate(chain):
        (tmp_path / f"{i}.pem").write_text(pem)
    out = await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "2.pem"),
            "-untrusted",
            str(tmp_path / "1.pem"),
            str(tmp_path / "0.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_serving_certificate_names(tmp_path: Path) -> None:
    async with running_ztd(tmp_path, tls_san=("ztd.example.com",)) as z:
        for name in ("istiod.istio-system.svc", "ztd.example.com", "127.0.0.1"):
            creds = grpc.ssl_channel_credentials(z.root_pem)
            opts = [("grpc.ssl_target_name_override", name)]
            async with grpc.aio.secure_channel(f"127.0.0.1:{z.cfg.secure_port}", creds, options=opts) as ch:
                await ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
                    request(make_csr(new_key())), metadata=bearer(z.token("shop/frontend")), timeout=10
                )
        creds = grpc.ssl_channel_credentials(z.root_pem)
        opts = [("grpc.ssl_target_name_override", "evil.example.com")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{z.cfg.secure_port}", creds, options=opts) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
                    request(make_csr(new_key())), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("enabled", [False, True])
async def test_plaintext_port_serves_the_ca_only_when_asked(tmp_path: Path, enabled: bool) -> None:
    async with running_ztd(tmp_path, ca_plaintext=enabled) as z:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{z.cfg.xds_port}") as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            call = stub.CreateCertificate(request(make_csr(new_key())), metadata=bearer(z.token("shop/frontend")))
            if enabled:
                assert len((await call).cert_chain) == 2
            else:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_oidc_issuer_tokens(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "oidc-1"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {
        "iss": "https://oidc.example.com",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 600,
        "sub": "system:serviceaccount:payments:ledger",
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "oidc-1"})
    async with running_ztd(
        tmp_path, oidc_issuer="https://oidc.example.com", oidc_jwks_file=tmp_path / "jwks.json", local_issuer=False
    ) as z:
        async with z.secure_channel() as ch:
            resp = await z.ca(ch).CreateCertificate(request(make_csr(new_key())), metadata=bearer(token))
            leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://cluster.local/ns/payments/sa/ledger"
            ]
            # With the embedded issuer switched off, its tokens are no longer accepted.
            from sds.ca import issuer

            local = issuer.load_or_create(z.cfg.state_dir / "issuer", "cluster.local").mint(
                "shop",
                "frontend",
                audiences=["istio-ca"],
                duration=dt.timedelta(minutes=5),
                now=dt.datetime.now(dt.UTC),
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await z.ca(ch).CreateCertificate(request(make_csr(new_key())), metadata=bearer(local))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_shutdown_with_open_connections_is_clean(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stopping ztd while clients hold TLS connections closes them without error logs."""
    caplog.set_level("ERROR")
    async with running_ztd(tmp_path) as z:
        ch = z.secure_channel()
        await z.ca(ch).CreateCertificate(request(make_csr(new_key())), metadata=bearer(z.token("shop/frontend")))
    await ch.close()
    assert [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
