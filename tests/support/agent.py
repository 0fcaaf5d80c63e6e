"""An in-process zt-agent against a running ztd, and a raw SDS client for protocol-level tests."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import struct_pb2

from sds.agent.main import Agent, AgentConfig
from tests.helpers import RunningZtd, until_ready
from ztcore.xds import typeurls

# Pods of three service accounts on node-a, where the agent's ztunnel identity may impersonate them.
MESH = """
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-a, namespace: istio-system}
spec: {serviceAccountName: ztunnel, nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-1, namespace: shop}
spec: {serviceAccountName: frontend, nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {serviceAccountName: cart, nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: other-1, namespace: shop}
spec: {serviceAccountName: other, nodeName: node-a}
"""

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
CART = "spiffe://cluster.local/ns/shop/sa/cart"
OTHER = "spiffe://cluster.local/ns/shop/sa/other"


def short_dir(prefix: str = "zt") -> Path:
    """A folder with a short path: a Unix socket path must fit in 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def agent_config(ztd: RunningZtd, token_file: Path | None, socket_root: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "ca_address": f"127.0.0.1:{ztd.cfg.secure_port}",
        "root_cert": ztd.cfg.published_root,
        "token_file": token_file,
        "socket_root": socket_root,
        "file_poll_interval": 0.1,
    }
    values.update(overrides)
    return AgentConfig(**values)


@contextlib.asynccontextmanager
async def running_agent(cfg: AgentConfig, **kwargs: Any) -> AsyncIterator[Agent]:
    agent = Agent(cfg, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await until_ready(task, agent.ready, "zt-agent")
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def agent_for(ztd: RunningZtd, account: str = "istio-system/ztunnel", **overrides: Any) -> AsyncIterator[Agent]:
    """An agent whose token is `account`'s (by default the node agent's, bound to ztunnel-a on node-a)."""
    root = short_dir()
    try:
        token_file = root / "istio-token"
        pod = "ztunnel-a" if account == "istio-system/ztunnel" else ""
        token_file.write_text(ztd.token(account, pod=pod))
        async with running_agent(agent_config(ztd, token_file, root, **overrides)) as agent:
            yield agent
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


def unpack_secrets(resp: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    out = {}
    for res in resp.resources:
        sec = secret_pb2.Secret()
        res.Unpack(sec)
        out[sec.name] = sec
    return out


def leaf_of(sec: secret_pb2.Secret) -> x509.Certificate:
    return x509.load_pem_x509_certificate(sec.tls_certificate.certificate_chain.inline_bytes)


def uri_sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(ext.get_values_for_type(x509.UniformResourceIdentifier))


class SdsClient:
    """One StreamSecrets stream, driven by hand (what Envoy does, step by step).

    Responses are read by a background task into a queue: cancelling a gRPC read would cancel the RPC.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        namespace: str = "",
        service_account: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self._queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self._call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(self._requests())
        self._inbox: asyncio.Queue[discovery_pb2.DiscoveryResponse | BaseException] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())
        # The node metadata Envoy sends: NAMESPACE and SERVICE_ACCOUNT, unless `metadata` says exactly what to send.
        default = {"NAMESPACE": namespace, "SERVICE_ACCOUNT": service_account} if namespace else {}
        self._meta = dict(metadata) if metadata is not None else default
        self._first = True
        self.names: list[str] = []
        self.held: dict[str, secret_pb2.Secret] = {}
        self.last: discovery_pb2.DiscoveryResponse | None = None

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (req := await self._queue.get()) is not None:
            yield req

    async def _read(self) -> None:
        try:
            async for resp in self._call:
                self._inbox.put_nowait(resp)
            self._inbox.put_nowait(EOFError("stream ended"))
        except BaseException as err:  # handed to the test that reads next
            self._inbox.put_nowait(err)

    def request(self, names: list[str], *, nonce: str = "", version: str = "", error: str = "") -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=typeurls.SECRET, resource_names=names, response_nonce=nonce, version_info=version
        )
        if self._first:
            req.node.id = f"sidecar~127.0.0.1~test.{self._meta.get('NAMESPACE', 'default')}~cluster.local"
            meta = struct_pb2.Struct()
            meta.update(self._meta)
            req.node.metadata.CopyFrom(meta)
            self._first = False
        if error:
            req.error_detail.code = 3
            req.error_detail.message = error
        else:
            self.names = list(names)
        self._queue.put_nowait(req)

    def ack(self) -> None:
        assert self.last is not None
        self.request(self.names, nonce=self.last.nonce, version=self.last.version_info)

    def nack(self, error: str) -> None:
        assert self.last is not None
        self.request(self.names, nonce=self.last.nonce, error=error)

    async def recv(self, within: float = 10.0) -> discovery_pb2.DiscoveryResponse:
        item = await asyncio.wait_for(self._inbox.get(), within)
        if isinstance(item, BaseException):
            raise item
        self.last = item
        self.held.update(unpack_secrets(item))
        return item

    async def until(self, *names: str, within: float = 10.0) -> None:
        """Read (acking each response, as Envoy does) until every name is held."""
        async with asyncio.timeout(within):
            while not all(n in self.held for n in names):
                await self.recv()
                self.ack()

    async def nothing_for(self, seconds: float) -> bool:
        try:
            item = await asyncio.wait_for(self._inbox.get(), seconds)
        except TimeoutError:
            return True
        self._inbox.put_nowait(item)
        return False

    async def error(self, within: float = 5.0) -> grpc.aio.AioRpcError:
        item = await asyncio.wait_for(self._inbox.get(), within)
        if isinstance(item, grpc.aio.AioRpcError):
            return item
        raise AssertionError(f"expected the stream to end with an error, got {item!r}")

    async def close(self) -> None:
        self._queue.put_nowait(None)
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
