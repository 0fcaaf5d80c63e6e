"""A Delta ADS client of ztd (or istiod) for `istio.workload.Address` and `istio.security.Authorization`.

As ztunnel's (src/xds/client.rs): the node is a `ztunnel~...` proxy, each type is subscribed as a wildcard,
every response is handed to the handler of its type and answered -- an ACK, or a NACK whose error_detail
names the rejected resources (the accepted ones still apply). The client keeps `name -> version` of what
it holds and sends it as `initial_resource_versions` when it reconnects, so the server only sends what
changed meanwhile (and removals of what is gone). Reconnects back off from 0.1 s to 15 s with jitter.
The client knows nothing about workloads: handlers (ipsec_bridge.state) decode and store.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]

from ztcore.backoff import Backoff, Streak
from ztcore.xds import typeurls

log = logging.getLogger(__name__)

TYPES = (typeurls.ADDRESS, typeurls.AUTHORIZATION)
MAX_MESSAGE = 64 * 1024 * 1024


class Rejection(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def reason(self) -> str: ...


class Handler(Protocol):
    def apply(self, upserts: Sequence[tuple[str, any_pb2.Any]], removed: Sequence[str]) -> Sequence[Rejection]: ...


@dataclass(frozen=True, slots=True)
class XdsClientOptions:
    address: str
    node_name: str
    node_ip: str = "0.0.0.0"  # noqa: S104 - an address reported in the node id, nothing binds
    namespace: str = "istio-system"
    pod_name: str = ""
    cluster_id: str = "Kubernetes"
    plaintext: bool = False
    root_cert: Path | None = None
    server_name: str = "istiod.istio-system.svc"
    token_file: Path | None = None
    backoff_initial: float = 0.1
    backoff_max: float = 15.0


def build_node(o: XdsClientOptions) -> base_pb2.Node:
    pod = o.pod_name or f"zt-bridge-{o.node_name}"
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAME": pod,
            "NAMESPACE": o.namespace,
            "INSTANCE_IPS": o.node_ip,
            "NODE_NAME": o.node_name,
            "CLUSTER_ID": o.cluster_id,
        }
    )
    return base_pb2.Node(id=f"ztunnel~{o.node_ip}~{pod}.{o.namespace}~{o.namespace}.svc.cluster.local", metadata=meta)


@dataclass(slots=True)
class ClientStatus:
    connected: bool = False
    connects: int = 0
    responses: int = 0
    nacks: int = 0
    last_error: str = ""
    held: dict[str, int] = field(default_factory=dict)


class XdsError(Exception):
    pass


class DeltaXdsClient:
    def __init__(
        self, options: XdsClientOptions, handlers: Mapping[str, Handler], *, rng: random.Random | None = None
    ) -> None:
        self.options = options
        self._handlers = dict(handlers)
        self._versions: dict[str, dict[str, str]] = {t: {} for t in self._handlers}
        self._rng = rng or random.Random()  # noqa: S311 - reconnect jitter, not a secret
        self.status = ClientStatus()

    def _read_token(self) -> str | None:
        path = self.options.token_file
        if path is None:
            return None
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise XdsError(f"cannot read token file {path}: {err.strerror}") from None
        if not token:
            raise XdsError(f"token file {path} is empty")
        return token

    def _read_root(self) -> bytes | None:
        path = self.options.root_cert
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as err:
            raise XdsError(f"cannot read root certificate {path}: {err.strerror}") from None

    async def _channel(self) -> tuple[grpc.aio.Channel, list[tuple[str, str]]]:
        o = self.options
        token = await asyncio.to_thread(self._read_token)
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        opts: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        if o.plaintext:
            return grpc.aio.insecure_channel(o.address, options=opts), metadata
        root = await asyncio.to_thread(self._read_root)
        creds = grpc.ssl_channel_credentials(root)
        opts.append(("grpc.ssl_target_name_override", o.server_name))
        return grpc.aio.secure_channel(o.address, creds, options=opts), metadata

    async def run(self) -> None:
        """Stream until cancelled; reconnect with backoff after every failure."""
        retry = Streak(Backoff(self.options.backoff_initial, self.options.backoff_max, jitter=(0.5, 1.0)), self._rng)
        while True:
            got_response = False
            try:
                got_response = await self._stream()
                self.status.last_error = "the server closed the stream"
            except XdsError as err:
                self.status.last_error = str(err)
            except grpc.aio.AioRpcError as err:
                self.status.last_error = f"{err.code().name}: {err.details()}"
            self.status.connected = False
            if got_response:
                retry.reset()
            delay = retry.next()
            log.warning(
                "xDS stream to %s: %s; reconnecting in %.2fs", self.options.address, self.status.last_error, delay
            )
            await asyncio.sleep(delay)

    async def _stream(self) -> bool:
        """One stream; True if it got at least one response."""
        channel, metadata = await self._channel()
        outbox: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
            while True:
                yield await outbox.get()

        node = build_node(self.options)
        for index, type_url in enumerate(self._handlers):
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
            if index == 0:
                req.node.CopyFrom(node)
            for name, version in self._versions[type_url].items():
                req.initial_resource_versions[name] = version
            outbox.put_nowait(req)
        got = False
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(requests(), metadata=metadata)
            self.status.connects += 1
            async for resp in call:
                if not got:
                    log.info("xDS stream to %s established", self.options.address)
                got = True
                self.status.connected = True
                outbox.put_nowait(self._handle(resp))
        finally:
            await channel.close()
        return got

    def _handle(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        self.status.responses += 1
        answer = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        handler = self._handlers.get(resp.type_url)
        if handler is None:
            answer.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"type {resp.type_url} was not requested")
            )
            self.status.nacks += 1
            return answer
        upserts = [(r.name, r.resource) for r in resp.resources]
        removed = list(resp.removed_resources)
        rejected: list[Rejection]
        try:
            rejected = list(handler.apply(upserts, removed))
        except Exception as err:  # a handler bug must NACK, not kill the stream
            log.exception("applying %s", typeurls.short_name(resp.type_url))
            rejected = [_Rejected(r.name, f"internal error: {err}") for r in resp.resources]
        versions = self._versions.setdefault(resp.type_url, {})
        refused = {r.name for r in rejected}
        # the names the store keyed its objects by (each read of r.name makes a new string: 10,000 of them)
        for (name, _), r in zip(upserts, resp.resources, strict=True):
            if name not in refused:
                versions[name] = r.version
        for name in removed:
            versions.pop(name, None)
        self.status.held[typeurls.short_name(resp.type_url)] = len(versions)
        if rejected:
            self.status.nacks += 1
            message = "; ".join(f"{r.name}: {r.reason}" for r in rejected)
            answer.error_detail.CopyFrom(status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message))
            log.warning("NACK %s: %s", typeurls.short_name(resp.type_url), message)
        return answer


@dataclass(frozen=True, slots=True)
class _Rejected:
    name: str
    reason: str
