"""zt-agent over its real Unix socket, against a real in-process ztd: SDS protocol rules, identities,
files, failures and the console script. (Envoy itself is in test_sds_envoy.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import shutil
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.helpers import (
    RunningZtd,
    bearer,
    free_port,
    key_pem,
    make_csr,
    new_key,
    request,
    running_ztd,
    write_yaml,
)
from tests.support.agent import (
    CART,
    FRONTEND,
    MESH,
    SdsClient,
    agent_config,
    agent_for,
    leaf_of,
    running_agent,
    short_dir,
    uri_sans,
)
from tests.support.wait import eventually
from xds_server.main import Ztd, ZtdConfig
from ztcore.identity import Identity
from ztcore.identity.manager import SecretEvent
from ztcore.xds import status as st


@pytest.fixture
async def zt(tmp_path: Path) -> AsyncIterator[RunningZtd]:
    write_yaml(tmp_path / "mesh", "mesh.yaml", MESH)
    async with running_ztd(tmp_path, config_dir=tmp_path / "mesh") as running:
        yield running


@contextlib.asynccontextmanager
async def channel(agent) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"unix:{agent.cfg.socket}") as ch:
        yield ch


def sync_state(agent, identity: str, name: str) -> st.WatchState:
    for info in agent.streams.streams():
        w = next(iter(info.statuses().values()), None)
        meta = info.node.metadata.fields
        who = f"spiffe://cluster.local/ns/{meta['NAMESPACE'].string_value}/sa/{meta['SERVICE_ACCOUNT'].string_value}"
        if w is not None and who == identity and name in w.names:
            return w
    raise AssertionError(f"no stream of {identity} watches {name}")


async def test_default_and_rootca_for_the_streams_identity(zt: RunningZtd) -> None:
    port = free_port()
    async with agent_for(zt, monitoring_port=port) as agent, channel(agent) as ch:
        client = SdsClient(ch, "shop", "frontend")
        client.request(["default", "ROOTCA"])
        await client.until("default", "ROOTCA")
        default, root = client.held["default"], client.held["ROOTCA"]
        leaf = leaf_of(default)
        assert uri_sans(leaf) == [FRONTEND]
        key = serialization.load_pem_private_key(default.tls_certificate.private_key.inline_bytes, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
        assert root.validation_context.trusted_ca.inline_bytes == zt.root_pem
        # Every response was acked: a plain ACK never gets a resend, and the stream is SYNCED.
        assert await client.nothing_for(0.5)
        await eventually(lambda: sync_state(agent, FRONTEND, "default").status == st.SYNCED)
        w = sync_state(agent, FRONTEND, "default")
        assert w.status == st.SYNCED and set(w.acked) == {"default", "ROOTCA"}
        # The monitoring port: readiness, Istio-named metrics, per-stream sync state, certificates (no keys).
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/ready") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/debug/syncz") as resp:
                syncz = await resp.json()
            async with http.get(f"http://127.0.0.1:{port}/debug/certs") as resp:
                certs = await resp.text()
        assert 'num_outgoing_requests{request_type="csr"}' in metrics and "pilot_xds_pushes{" in metrics
        sds = [s["types"]["SDS"] for s in syncz if s["node"].startswith("sidecar~")]
        assert sds and sds[0]["status"] == "SYNCED" and sds[0]["names"] == ["ROOTCA", "default"]
        assert FRONTEND in certs and f"{leaf.serial_number:x}" in certs and "PRIVATE" not in certs
        await client.close()


async def test_nack_is_logged_kept_and_not_resent(zt: RunningZtd, caplog: pytest.LogCaptureFixture) -> None:
    async with agent_for(zt) as agent, channel(agent) as ch:
        client = SdsClient(ch, "shop", "frontend")
        client.request(["default"])
        await client.until("default")
        await eventually(lambda: "default" in sync_state(agent, FRONTEND, "default").acked)
        good = sync_state(agent, FRONTEND, "default").acked["default"]
        agent.secrets.renew_now(Identity.parse(FRONTEND))
        await client.recv()
        client.nack("Failed to load certificate chain: bad")
        assert await client.nothing_for(0.5), "a NACK is never answered"
        w = sync_state(agent, FRONTEND, "default")
        assert w.status == st.ERROR and w.last_error == "Failed to load certificate chain: bad"
        assert w.acked["default"] == good, "the last accepted version is kept"
        assert "NACK" in caplog.text and "Failed to load certificate chain: bad" in caplog.text
        assert agent.metrics.render().count("pilot_total_xds_rejects{") == 1
        # The next renewal is pushed; its ACK clears the error.
        agent.secrets.renew_now(Identity.parse(FRONTEND))
        await client.recv()
        client.ack()
        await eventually(lambda: sync_state(agent, FRONTEND, "default").status == st.SYNCED)
        await client.close()


async def test_push_goes_only_to_streams_watching_the_renewed_name(zt: RunningZtd) -> None:
    async with agent_for(zt) as agent, channel(agent) as ch:
        front = SdsClient(ch, "shop", "frontend")
        front_root = SdsClient(ch, "shop", "frontend")
        cart = SdsClient(ch, "shop", "cart")
        front.request(["default"])
        front_root.request(["ROOTCA"])
        cart.request(["default"])
        await asyncio.gather(front.until("default"), front_root.until("ROOTCA"), cart.until("default"))
        # Each identity has its own certificate and key.
        assert uri_sans(leaf_of(front.held["default"])) == [FRONTEND]
        assert uri_sans(leaf_of(cart.held["default"])) == [CART]
        assert (
            front.held["default"].tls_certificate.private_key.inline_bytes
            != cart.held["default"].tls_certificate.private_key.inline_bytes
        )
        before = leaf_of(front.held["default"]).serial_number
        agent.secrets.renew_now(Identity.parse(FRONTEND))
        await front.recv()
        assert leaf_of(front.held["default"]).serial_number != before
        assert await front_root.nothing_for(0.3) and await cart.nothing_for(0.3)
        for c in (front, front_root, cart):
            await c.close()


async def test_bad_requests_end_the_stream_with_a_clear_status(zt: RunningZtd) -> None:
    async with agent_for(zt) as agent, channel(agent) as ch:
        unknown = SdsClient(ch, "shop", "frontend")
        unknown.request(["kubernetes://my-tls"])
        err = await unknown.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown SDS resource" in (err.details() or "")
        half = SdsClient(ch, metadata={"NAMESPACE": "shop"})  # no SERVICE_ACCOUNT
        half.request(["default"])
        err = await half.error()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "SERVICE_ACCOUNT" in (err.details() or "")
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as fetch:
            await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(resource_names=["default"]))
        assert fetch.value.code() == grpc.StatusCode.UNIMPLEMENTED
        delta = stub.DeltaSecrets()
        # The refusal may land before our first write does: either call then raises the same status.
        with pytest.raises(grpc.aio.AioRpcError) as d:
            await delta.write(discovery_pb2.DeltaDiscoveryRequest())
            await delta.read()
        assert d.value.code() == grpc.StatusCode.UNIMPLEMENTED
        for c in (unknown, half):
            await c.close()


async def test_the_ca_decides_who_may_be_impersonated(zt: RunningZtd) -> None:
    """`nobody` runs on no node: the CA refuses, the stream gets no certificate, failures are counted."""
    async with agent_for(zt) as agent, channel(agent) as ch:
        failures: list[SecretEvent] = []
        agent.secrets.add_listener(lambda e: failures.append(e) if e.kind == "failed" else None)
        client = SdsClient(ch, "shop", "nobody")
        client.request(["default", "ROOTCA"])
        await client.until("ROOTCA")
        await eventually(lambda: bool(failures))
        assert "UNAUTHENTICATED" in failures[0].error and "default" not in client.held
        await client.close()


def _start_ztd(state: Path, secure_port: int) -> tuple[Ztd, asyncio.Event, asyncio.Task[None]]:
    cfg = ZtdConfig(
        listen_address="127.0.0.1",
        secure_port=secure_port,
        xds_port=free_port(),
        monitoring_port=free_port(),
        state_dir=state,
    )
    ztd, stop = Ztd(cfg), asyncio.Event()
    return ztd, stop, asyncio.create_task(ztd.run(stop))


async def test_backoff_keeps_the_old_certificate_then_recovers(tmp_path: Path) -> None:
    secure = free_port()
    ztd, stop_ztd, task = _start_ztd(tmp_path / "state", secure)
    await asyncio.wait_for(ztd.ready.wait(), 20)
    running = RunningZtd(ztd, ztd.cfg, ztd.cfg.published_root.read_bytes())
    root = short_dir()
    token = root / "istio-token"
    token.write_text(running.token("shop/frontend"))
    events: list[SecretEvent] = []
    try:
        async with running_agent(agent_config(running, token, root)) as agent, channel(agent) as ch:
            agent.secrets.add_listener(events.append)
            client = SdsClient(ch, "shop", "frontend")
            client.request(["default"])
            await client.until("default")
            held = leaf_of(client.held["default"]).serial_number
            stop_ztd.set()
            await task
            agent.secrets.renew_now()
            await eventually(lambda: sum(e.kind == "failed" for e in events) >= 3, within=5)
            fails = [e.at for e in events if e.kind == "failed"]
            gaps = [b - a for a, b in itertools.pairwise(fails)]
            assert 0.4 < gaps[0] < 0.9 and 0.9 < gaps[1] < 1.6, f"backoff 0.5s then 1s, got {gaps}"
            assert "UNAVAILABLE" in next(e.error for e in events if e.kind == "failed")
            # The old certificate stays served: nothing was pushed, the manager still holds it.
            assert await client.nothing_for(0.1)
            assert agent.secrets.current(Identity.parse(FRONTEND)).serial == held
            # The CA comes back on the same port: a later retry succeeds and is pushed.
            ztd, stop_ztd, task = _start_ztd(tmp_path / "state", secure)
            await client.recv(within=10)
            assert leaf_of(client.held["default"]).serial_number != held
            await client.close()
    finally:
        stop_ztd.set()
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(shutil.rmtree, root, True)


async def test_file_names_are_served_and_follow_the_files(zt: RunningZtd) -> None:
    files = short_dir()
    try:
        async with agent_for(zt) as agent, channel(agent) as ch:
            certs = []
            for _ in range(2):
                key = new_key()
                async with zt.secure_channel() as ca:
                    resp = await zt.ca(ca).CreateCertificate(
                        request(make_csr(key)), metadata=bearer(zt.token("shop/cart"))
                    )
                certs.append((key_pem(key), resp.cert_chain[0].encode()))
            (files / "key.pem").write_bytes(certs[0][0])
            (files / "cert.pem").write_bytes(certs[0][1])
            (files / "root.pem").write_bytes(zt.root_pem)
            cert_name = f"file-cert:{files}/cert.pem~{files}/key.pem"
            root_name = f"file-root:{files}/root.pem"
            client = SdsClient(ch, "shop", "frontend")
            client.request([cert_name, root_name])
            await client.until(cert_name, root_name)
            assert client.held[cert_name].tls_certificate.private_key.inline_bytes == certs[0][0]
            assert client.held[root_name].validation_context.trusted_ca.inline_bytes == zt.root_pem
            first = leaf_of(client.held[cert_name]).serial_number
            tmp = files / ".cert.pem.new"
            tmp.write_bytes(certs[1][1])
            os.replace(tmp, files / "cert.pem")  # atomic swap, as kubelet does
            (files / "key.pem").write_bytes(certs[1][0])
            async with asyncio.timeout(5):
                while leaf_of(client.held[cert_name]).serial_number == first or (
                    client.held[cert_name].tls_certificate.private_key.inline_bytes != certs[1][0]
                ):
                    await client.recv()
                    client.ack()
            await client.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, files, True)


async def test_socket_is_private_and_keys_stay_in_memory(zt: RunningZtd) -> None:
    async with agent_for(zt) as agent, channel(agent) as ch:
        client = SdsClient(ch, "shop", "frontend")
        client.request(["default"])
        await client.until("default")
        sock = agent.cfg.socket
        assert stat.S_ISSOCK(sock.stat().st_mode) and sock.stat().st_mode & 0o777 == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700
        written = [p for p in agent.cfg.socket_root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
        assert written == []
        await client.close()
    assert not sock.exists(), "the socket is removed on stop"


async def test_client_certificate_credential_and_rsa_keys(zt: RunningZtd) -> None:
    root = short_dir()
    try:
        key = new_key()
        async with zt.secure_channel() as ca:
            resp = await zt.ca(ca).CreateCertificate(request(make_csr(key)), metadata=bearer(zt.token("shop/frontend")))
        (root / "cert.pem").write_text("".join(resp.cert_chain[:-1]))
        (root / "key.pem").write_bytes(key_pem(key))
        cfg = agent_config(zt, None, root, cert=root / "cert.pem", key=root / "key.pem", key_type="rsa-2048")
        async with running_agent(cfg) as agent, channel(agent) as ch:
            assert agent.default_identity == Identity.parse(FRONTEND)
            client = SdsClient(ch)  # no node metadata: the agent's own identity
            client.request(["default"])
            await client.until("default")
            leaf = leaf_of(client.held["default"])
            assert uri_sans(leaf) == [FRONTEND] and isinstance(leaf.public_key(), rsa.RSAPublicKey)
            assert leaf.public_key().key_size == 2048
            await client.close()
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--grace-ratio", "2", "--token-file", "t"], 2, "grace ratio 2.0 is not within [0, 1]"),
        (["--secret-ttl", "soon", "--token-file", "t"], 2, "invalid duration 'soon'"),
        ([], 2, "give --token-file or --cert/--key"),
        (["--cert", "c.pem"], 2, "--cert and --key go together"),
        (["--token-file", "/nonexistent/token"], 1, "zt-agent: cannot read token file /nonexistent/token"),
    ],
)
def test_console_entry_point_errors_are_one_line(
    args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sds.agent.main import main

    try:
        rc = main(args)
    except SystemExit as exit_:
        rc = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert rc == code and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


async def test_console_script_serves_and_stops_on_sigterm(zt: RunningZtd) -> None:
    root = short_dir()
    try:
        (root / "token").write_text(zt.token("shop/frontend"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sds.agent.main",
            "--ca-address",
            f"127.0.0.1:{zt.cfg.secure_port}",
            "--root-cert",
            str(zt.cfg.published_root),
            "--token-file",
            str(root / "token"),
            "--socket-root",
            str(root),
            stderr=asyncio.subprocess.PIPE,
        )
        sock = root / "var/run/secrets/workload-spiffe-uds/socket"
        await eventually(sock.exists, within=15)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            client = SdsClient(ch)
            client.request(["default"])
            await client.until("default")
            assert uri_sans(leaf_of(client.held["default"])) == [FRONTEND]
            assert leaf_of(client.held["default"]).not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(
                hours=23
            )
            await client.close()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err.decode()
        assert not sock.exists()
        assert b"PRIVATE KEY" not in err
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


def test_identity_from_token_or_flags(tmp_path: Path) -> None:
    from sds.agent.main import AgentConfig, AgentError, resolve_identities

    token = tmp_path / "t"
    token.write_text("opaque-token")
    with pytest.raises(AgentError, match="give --namespace and --service-account"):
        resolve_identities(AgentConfig(token_file=token))
    cred, default = resolve_identities(AgentConfig(token_file=token, namespace="shop", service_account="cart"))
    assert cred is None and default == Identity.parse(CART)
