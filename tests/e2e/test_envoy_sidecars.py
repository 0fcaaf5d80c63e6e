"""Real Envoy 1.40 sidecars configured only from `build_for_proxy` output (static form), with certificates from
zt-agent (SDS) and ztd as the CA: requests pass client sidecar -> server sidecar over mTLS, identities checked.

Pods get loopback addresses (127.0.0.2, .3, .4) so that every sidecar binds its own inbound listeners on its
"pod IP" and its outbound listeners on its own `ZTDPU_OUTBOUND_BIND` address, all in one network namespace.
The `billing` sidecar is an impostor: the registry says its pod runs as shop/billing, but its node metadata
makes the agent give it shop/other's certificate, so the frontend's SAN check must refuse it. The mesh itself is
in tests/support/sidecar_mesh.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from tests.helpers import RunningZtd, running_ztd, write_yaml
from tests.support import envoy as ev
from tests.support.agent import agent_for
from tests.support.sidecar_mesh import SIDECARS, App, Ports, applications, get, mesh_yaml, wait_for_secrets
from ztcore.envoy.bootstrap import node, static_bootstrap
from ztcore.envoy.proxy import Proxy
from ztcore.envoy.sidecar import build_for_proxy
from ztcore.mesh.registry.parse import parse_text
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate import translate

pytestmark = pytest.mark.slow

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
CART = "spiffe://cluster.local/ns/shop/sa/cart"
OTHER = "spiffe://cluster.local/ns/shop/sa/other"


@dataclass
class Mesh:
    ztd: RunningZtd
    ports: Ports
    app: App
    envoys: dict[str, ev.EnvoyProcess]
    configs: dict[str, dict[str, Any]]


@contextlib.asynccontextmanager
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    p = Ports()
    text = mesh_yaml(p)
    write_yaml(tmp_path / "mesh", "mesh.yaml", text)
    parsed = parse_text(text, "mesh.yaml")
    assert [str(e) for e in parsed.errors] == []
    translation = translate(RegistrySnapshot(parsed.objects))
    async with (
        running_ztd(tmp_path, config_dir=tmp_path / "mesh") as ztd,
        agent_for(ztd) as agent,
        applications(p) as app,
        contextlib.AsyncExitStack() as stack,
    ):
        envoys: dict[str, ev.EnvoyProcess] = {}
        configs: dict[str, dict[str, Any]] = {}
        for s in SIDECARS:
            built = build_for_proxy(translation, Proxy.parse(s.node_id, s.metadata))
            boot = static_bootstrap(node(s.node_id, s.metadata), built, sds_socket=str(agent.cfg.socket))
            configs[s.pod] = json_format.MessageToDict(boot, preserving_proto_field_name=True)
        starts = [ev.start_envoy(pod, cfg, tmp_path / "envoy") for pod, cfg in configs.items()]
        for envoy in await asyncio.gather(*starts):
            stack.push_async_callback(envoy.stop)
            envoys[envoy.name] = envoy
        await asyncio.gather(*(wait_for_secrets(e) for e in envoys.values()))
        yield Mesh(ztd, p, app, envoys, configs)


def tcp_roundtrip(address: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(payload)
        data = b""
        while chunk := conn.recv(1024):
            data += chunk
    return data


def tls_without_client_cert(address: str, port: int, roots: bytes) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots.decode())
    try:
        with socket.create_connection((address, port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n")
            return tls.recv(4096).decode(errors="replace") or "closed"
    except (OSError, ssl.SSLError) as err:
        return f"refused: {type(err).__name__}"


def plaintext(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n")
        try:
            return conn.recv(4096)
        except ConnectionResetError:
            return b""


async def test_mtls_between_generated_sidecars(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        p, front = m.ports, SIDECARS[0].bind
        # HTTP by every name a shop pod may use; the app sees the caller's identity from the server sidecar.
        for host in ("cart.shop.svc.cluster.local", "cart", f"cart.shop:{p.svc_cart}"):
            status, body = await get(http, front, p.svc_cart, host)
            assert (status, body) == (200, "hello from cart\n"), host
        assert len(m.app.requests) == 3
        for seen in m.app.requests:
            assert f"By={CART}" in seen["xfcc"] and f"URI={FRONTEND}" in seen["xfcc"], seen
        # Only mesh hosts: nothing routes an unknown Host.
        status, _ = await get(http, front, p.svc_cart, "example.com")
        assert status == 404
        # TCP through both sidecars.
        reply = await asyncio.to_thread(tcp_roundtrip, front, p.svc_db, b"ping")
        assert reply == b"echo:ping"
        client, server = m.envoys["frontend-1"], m.envoys["cart-1"]
        db = f"outbound|{p.svc_db}||cart-db.shop.svc.cluster.local"
        assert (await client.stats(f"cluster.{db}.ssl.handshake")).get(f"cluster.{db}.ssl.handshake", 0) >= 1
        inbound = f"listener.127.0.0.3_{p.cart_tcp}.ssl.handshake"
        assert (await server.stats(inbound)).get(inbound, 0) >= 1

        # The impostor presents shop/other where the registry says shop/billing: the SAN check refuses it.
        status, body = await get(http, front, p.svc_billing, "billing.shop.svc.cluster.local")
        assert status == 503, body
        billing = f"outbound|{p.svc_billing}||billing.shop.svc.cluster.local"
        stats = await client.stats(f"cluster.{billing}.ssl")
        assert stats.get(f"cluster.{billing}.ssl.fail_verify_san", 0) >= 1, stats
        assert m.app.billing_requests == 0
        impostor_cert = (await m.envoys["billing-1"].secrets())["dynamic_active_secrets"]
        assert any(s["name"] == "default" for s in impostor_cert)

        # The server sidecar lets nobody in without a mesh client certificate.
        answer = await asyncio.to_thread(tls_without_client_cert, "127.0.0.3", p.cart_http, m.ztd.root_pem)
        assert answer.startswith("refused") or answer == "closed", answer
        assert not (await asyncio.to_thread(plaintext, "127.0.0.3", p.cart_http)).startswith(b"HTTP/")
        errors = await server.stats(f"listener.127.0.0.3_{p.cart_http}.ssl")
        assert errors.get(f"listener.127.0.0.3_{p.cart_http}.ssl.fail_verify_no_cert", 0) >= 1, errors
        assert len(m.app.requests) == 3  # neither probe reached the app

        # What ran was generated: the bootstrap holds only our listeners/clusters plus sds-grpc.
        cfg = m.configs["frontend-1"]["static_resources"]
        assert {c["name"] for c in cfg["clusters"]} >= {"sds-grpc", db, billing}
        assert "dynamic_resources" not in m.configs["frontend-1"]
