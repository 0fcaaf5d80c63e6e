"""Fuzz CreateCertificate over real gRPC: bad input never crashes the CA and never gets a certificate.

Bounded (max_examples) and derandomized so CI is repeatable; run with ZTDPU_FUZZ_EXAMPLES=5000 for longer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protos.istio.v1.auth import ca_pb2, ca_pb2_grpc
from tests.e2e.conftest import MESH
from tests.helpers import ISTIOD_NAME, RunningZtd, make_csr, new_key, running_ztd, write_yaml

EXAMPLES = int(os.environ.get("ZTDPU_FUZZ_EXAMPLES", "300"))
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
VALID_CSR = make_csr(new_key())
MAX_TTL = 90 * 86400


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningZtd, grpc.Channel]]:
    """ztd on its own event loop in a thread, so hypothesis can drive a plain synchronous client."""
    tmp = tmp_path_factory.mktemp("fuzz")
    write_yaml(tmp / "mesh", "mesh.yaml", MESH)
    started: dict[str, RunningZtd] = {}
    ready, done = threading.Event(), threading.Event()

    async def serve() -> None:
        async with running_ztd(tmp, config_dir=tmp / "mesh") as z:
            started["z"] = z
            ready.set()
            await asyncio.to_thread(done.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    z = started["z"]
    channel = grpc.secure_channel(
        f"127.0.0.1:{z.cfg.secure_port}",
        grpc.ssl_channel_credentials(z.root_pem),
        options=[("grpc.ssl_target_name_override", ISTIOD_NAME)],
    )
    yield z, channel
    channel.close()
    done.set()
    thread.join(15)


def _mutate(data: bytes, positions: list[int], values: list[int]) -> bytes:
    buf = bytearray(data)
    for pos, val in zip(positions, values, strict=False):
        buf[pos % len(buf)] = val
    return bytes(buf)


def _der_pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


VALID_DER = x509.load_pem_x509_csr(VALID_CSR.encode()).public_bytes(Encoding.DER)

csrs = st.one_of(
    st.just(VALID_CSR),
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.builds(
        lambda p, v: _der_pem(_mutate(VALID_DER, p, v)),
        st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
        st.lists(st.integers(0, 255), min_size=1, max_size=4),
    ),
    st.builds(lambda n: VALID_CSR[:n], st.integers(0, len(VALID_CSR) - 1)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=6,
)
metadatas = st.dictionaries(
    st.sampled_from(["ImpersonatedIdentity", "WorkloadName", "WorkloadIP", "ClusterID", "CertSigner"])
    | st.text(max_size=15),
    st.one_of(json_values, st.sampled_from([FRONTEND, "spiffe://cluster.local/ns/shop/sa/cart", "", "spiffe://x"])),
    max_size=4,
)
ttls = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-10, MAX_TTL + 10), st.just(0))
tokens = st.sampled_from(["valid", "ztunnel", "garbage", "none", "bearer-only", "binary"])
HEADER_NOISE = st.dictionaries(
    st.sampled_from(["clusterid", "x-forwarded-client-cert", "x-b3-traceid"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    max_size=2,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(csr=csrs, metadata=metadatas, ttl=ttls, token=tokens, noise=HEADER_NOISE)
# the valid CSR wrapped at 76 columns instead of 64 (a no-op mutation): valid, and signed
@example(csr=_der_pem(VALID_DER), metadata={}, ttl=0, token="valid", noise={})
def test_no_certificate_for_invalid_input(
    live: tuple[RunningZtd, grpc.Channel], csr: str, metadata: dict, ttl: int, token: str, noise: dict[str, str]
) -> None:
    z, channel = live
    meta = struct_pb2.Struct()
    meta.update(metadata)
    headers: list[tuple[str, str | bytes]] = list(noise.items())
    if token == "valid":
        headers.append(("authorization", f"Bearer {z.token('shop/frontend')}"))
    elif token == "ztunnel":
        headers.append(("authorization", f"Bearer {z.token('istio-system/ztunnel', pod='ztunnel-a')}"))
    elif token == "garbage":
        headers.append(("authorization", "Bearer x.y.z"))
    elif token == "bearer-only":
        headers.append(("authorization", "Bearer "))
    elif token == "binary":
        headers.append(("authorization-bin", b"\x00\xff"))
    stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
    request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl, metadata=meta)
    impersonate = metadata.get("ImpersonatedIdentity")
    try:
        response = stub.CreateCertificate(request, metadata=headers, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED), (
            err.code(),
            err.details(),
        )
        return
    # Issued: then everything about the request was valid, and the identity is the authenticated one.
    # Only the valid CSR may be signed: a "mutation" that rewrote a byte to its own value is that CSR again (the
    # PEM differs only in line wrapping), so the DER is what must match.
    assert x509.load_pem_x509_csr(csr.encode()).public_bytes(Encoding.DER) == VALID_DER
    assert ttl <= MAX_TTL
    leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    own = {"valid": FRONTEND, "ztunnel": "spiffe://cluster.local/ns/istio-system/sa/ztunnel"}
    if impersonate in (None, ""):
        assert uris == [own[token]]
    else:
        # Only the node agent may impersonate, and only a service account with a pod on its node.
        assert token == "ztunnel" and impersonate == FRONTEND and uris == [FRONTEND]
