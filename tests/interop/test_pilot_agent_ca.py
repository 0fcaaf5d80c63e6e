"""A real Istio pilot-agent in VM mode gets (or is refused) its workload certificate from ztd's CA.

Everything is real: the pinned pilot-agent binary (built by scripts/istio-tools.sh on first use), the Envoy it
starts, gRPC over TLS to ztd's secure port, the agent's own SDS socket. See tests/interop/pilot_agent.py for
the VM layout and environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.helpers import RunningZtd, running_ztd
from tests.interop.pilot_agent import (
    PilotAgent,
    VmSpec,
    read_file,
    running_pilot_agent,
    unpack_secret,
    vm_workdir,
    write_token,
)
from tests.support.istio_tools import IstioTools
from ztctl import cli

pytestmark = [pytest.mark.interop, pytest.mark.slow]

VM = VmSpec(namespace="vm", service_account="vm-app")
ISSUED = "citadel_server_success_cert_issuance_count"
AUTHN_FAILURES = "citadel_server_authentication_failure_count"
CA_LOGGER = "sds.ca.server"


@pytest.fixture
async def ztd(tmp_path: Path) -> AsyncIterator[RunningZtd]:
    async with running_ztd(tmp_path) as running:
        yield running


async def counters(ztd: RunningZtd) -> dict[str, float]:
    """citadel_server_* values as an operator scrapes them from the monitoring port."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{ztd.cfg.monitoring_port}/metrics") as resp,
    ):
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("citadel_server_"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def _ztctl(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv), environ={})
    assert code == 0, f"ztctl {' '.join(argv)} exited {code}"
    return out.getvalue().strip()


async def mint(ztd: RunningZtd, audience: str = "istio-ca") -> str:
    """`ztctl token create NS/SA` against ztd's state folder, as an operator provisions a VM."""
    account = f"{VM.namespace}/{VM.service_account}"
    return await asyncio.to_thread(
        _ztctl, "token", "create", account, "--state-dir", str(ztd.cfg.state_dir), "--audience", audience
    )


async def eventually(check: Callable[[], object], agent: PilotAgent, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if agent.process.returncode is not None:
            raise AssertionError(f"pilot-agent exited ({agent.process.returncode}):\n{await agent.log_tail()}")
        if loop.time() > deadline:
            raise AssertionError(f"condition not met in {within}s; pilot-agent log:\n{await agent.log_tail()}")
        await asyncio.sleep(0.1)


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def verify_to_root(chain_pem: bytes, root_pem: bytes) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(chain_pem)
    roots = x509.load_pem_x509_certificates(root_pem)
    intermediates = [c for c in certs[1:] if c not in roots]
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_client_verifier()
    verified = verifier.verify(certs[0], intermediates)
    assert verified.chain[-1] in roots
    return certs[0]


def discovery(ztd: RunningZtd) -> str:
    return f"127.0.0.1:{ztd.cfg.secure_port}"


async def test_pilot_agent_gets_its_certificate_from_ztd(ztd: RunningZtd, istio_tools: IstioTools) -> None:
    before = await counters(ztd)
    token = await mint(ztd)
    async with (
        vm_workdir() as layout,
        running_pilot_agent(
            istio_tools, layout, VM, discovery_address=discovery(ztd), root_pem=ztd.root_pem, token=token
        ) as agent,
    ):
        # The agent warms `default` at start-up and writes it out (OUTPUT_CERTS); no xDS is involved.
        await agent.wait_for(layout.certs / "cert-chain.pem", within=30)
        default = await agent.fetch_secret("default")
        rootca = await agent.fetch_secret("ROOTCA")
        after = await counters(ztd)
        chain_pem = await read_file(layout.certs / "cert-chain.pem")
        key_pem = await read_file(layout.certs / "key.pem")
        key_mode = (await asyncio.to_thread((layout.certs / "key.pem").stat)).st_mode & 0o777

    assert after[ISSUED] - before[ISSUED] == 1, "one CSR for the one identity"
    assert after[AUTHN_FAILURES] == before[AUTHN_FAILURES]
    assert chain_pem is not None and key_pem is not None
    leaf = verify_to_root(chain_pem, ztd.root_pem)
    assert uri_sans(leaf) == [VM.spiffe_id]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == leaf.public_key()
    assert key_mode == 0o600
    # What Envoy would be served over SDS is the very certificate our CA issued.
    assert default.tls_certificate.certificate_chain.inline_bytes == chain_pem
    assert default.tls_certificate.private_key.inline_bytes == key_pem
    trusted = x509.load_pem_x509_certificates(rootca.validation_context.trusted_ca.inline_bytes)
    assert trusted == x509.load_pem_x509_certificates(ztd.root_pem)


async def test_wrong_audience_token_gets_no_certificate(
    ztd: RunningZtd, istio_tools: IstioTools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=CA_LOGGER)
    before = await counters(ztd)
    token = await mint(ztd, audience="not-istio-ca")
    async with (
        vm_workdir() as layout,
        running_pilot_agent(
            istio_tools, layout, VM, discovery_address=discovery(ztd), root_pem=ztd.root_pem, token=token
        ) as agent,
    ):

        async def refused_twice() -> bool:
            return (await counters(ztd))[AUTHN_FAILURES] - before[AUTHN_FAILURES] >= 2

        await eventually(refused_twice, agent)
        with pytest.raises(grpc.aio.AioRpcError) as sds_err:
            await agent.fetch_secret("default")
        after = await counters(ztd)
        cert = await read_file(layout.certs / "cert-chain.pem")
        agent_log = await agent.log_text()

    assert after[ISSUED] == before[ISSUED]
    assert cert is None
    assert "failed to generate secret" in (sds_err.value.details() or "")
    # The agent saw istiod's opaque error; the reason is only in ztd's log.
    assert "request authenticate failure" in agent_log
    reasons = [r.getMessage() for r in caplog.records if r.name == CA_LOGGER]
    assert any("authentication failed" in m and "audience" in m.lower() for m in reasons), reasons


async def test_agent_checks_the_serving_name_of_ztd(ztd: RunningZtd, istio_tools: IstioTools) -> None:
    """ISTIOD_SAN is the name the agent demands of our serving certificate: a name it lacks means no CSR."""
    spec = VmSpec(
        namespace=VM.namespace, service_account=VM.service_account, env={"ISTIOD_SAN": "istiod.elsewhere.svc"}
    )
    before = await counters(ztd)
    token = await mint(ztd)
    async with (
        vm_workdir() as layout,
        running_pilot_agent(
            istio_tools, layout, spec, discovery_address=discovery(ztd), root_pem=ztd.root_pem, token=token
        ) as agent,
    ):

        async def refused_by_tls() -> bool:
            return "not istiod.elsewhere.svc" in await agent.log_text()

        await eventually(refused_by_tls, agent)
        after = await counters(ztd)
        cert = await read_file(layout.certs / "cert-chain.pem")
        agent_log = await agent.log_text()

    assert after["citadel_server_csr_count"] == before["citadel_server_csr_count"]
    assert cert is None
    # Go's verifier lists the names our certificate does carry: the istiod ones.
    assert "certificate is valid for istiod.istio-system.svc" in agent_log


class SdsWatch:
    """Envoy's side of SDS for one name: request, ACK each response, and reconnect when the stream fails."""

    def __init__(self, agent: PilotAgent, name: str) -> None:
        self.agent = agent
        self.name = name
        self.errors: list[str] = []

    async def certificates(self) -> AsyncGenerator[bytes, None]:
        while True:
            async with self.agent.sds_channel() as channel:
                call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
                try:
                    await call.write(self.agent.sds_request([self.name]))
                    while True:
                        response = await call.read()
                        if not isinstance(response, discovery_pb2.DiscoveryResponse):
                            break
                        secret = unpack_secret(response, self.name)
                        await call.write(self.agent.sds_request([self.name], response.version_info, response.nonce))
                        yield secret.tls_certificate.certificate_chain.inline_bytes
                except grpc.aio.AioRpcError as err:
                    self.errors.append(f"{err.code().name}: {err.details()}")
                finally:
                    call.cancel()
            await asyncio.sleep(0.2)


async def test_vm_renews_over_mtls_with_the_certificate_it_was_given(
    ztd: RunningZtd, istio_tools: IstioTools, caplog: pytest.LogCaptureFixture
) -> None:
    """istio-start.sh's VM mode: PROV_CERT=OUTPUT_CERTS=./etc/certs. The first certificate comes with the
    token; once the token is no good, the renewal authenticates with that certificate (ClientCertAuthenticator
    behind our TLS front) and reaches Envoy as an SDS push."""
    caplog.set_level(logging.DEBUG, logger=CA_LOGGER)
    # Rotate 3 s after issue (ratio 0.9 of 30 s), leaving the first cert valid for the mTLS renewal.
    spec = VmSpec(
        namespace=VM.namespace,
        service_account=VM.service_account,
        env={"SECRET_TTL": "30s", "SECRET_GRACE_PERIOD_RATIO": "0.9", "SECRET_GRACE_PERIOD_RATIO_JITTER": "0"},
    )
    before = await counters(ztd)
    token = await mint(ztd)
    async with (
        vm_workdir() as layout,
        running_pilot_agent(
            istio_tools, layout, spec, discovery_address=discovery(ztd), root_pem=ztd.root_pem, token=token
        ) as agent,
    ):
        await agent.wait_for(layout.sds_socket, within=30)
        watch = SdsWatch(agent, "default")
        stream = watch.certificates()
        first = await asyncio.wait_for(anext(stream), 30)
        await write_token(layout, await mint(ztd, audience="not-istio-ca"))
        renewed = await asyncio.wait_for(anext(stream), 30)
        await stream.aclose()
        after = await counters(ztd)
        written = await read_file(layout.certs / "cert-chain.pem")

    old, new = verify_to_root(first, ztd.root_pem), verify_to_root(renewed, ztd.root_pem)
    assert new.serial_number != old.serial_number
    assert uri_sans(new) == uri_sans(old) == [spec.spiffe_id]
    assert written == renewed
    assert after[ISSUED] - before[ISSUED] == 2
    assert after[AUTHN_FAILURES] - before[AUTHN_FAILURES] >= 1, "the renewal was first tried with the bad token"
    issued = [r.getMessage() for r in caplog.records if r.name == CA_LOGGER and "issued certificate" in r.getMessage()]
    assert len(issued) == 2, issued
    assert "LocalIssuerJwtAuthenticator" in issued[0]
    assert "ClientCertAuthenticator" in issued[1]
