"""xDS clients for the ADS tests: a ztunnel-faithful Delta client and a plain SotW client.

The Delta client behaves as ztunnel's (src/xds/client.rs): node `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`
with NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, CLUSTER_ID and ISTIO_VERSION metadata; one initial request per
type (Address, then Authorization; wildcard, or ztunnel's on-demand "subscribe * + unsubscribe *"); on
reconnect every held `name -> version` in `initial_resource_versions`; every response decoded, applied to its
store and answered: an ACK, or a NACK whose error_detail joins the rejection reasons with "; ".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from protos.istio.security import authorization_pb2
from protos.istio.workload import workload_pb2
from ztcore.xds import typeurls

ADDRESS, AUTHORIZATION = typeurls.ADDRESS, typeurls.AUTHORIZATION
MAX_MESSAGE = 200 * 1024 * 1024


def ztunnel_node(ip: str = "10.244.1.2", pod: str = "ztunnel-node-a", namespace: str = "istio-system",
                 node_name: str = "node-a") -> base_pb2.Node:  # fmt: skip
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAME": pod,
            "NAMESPACE": namespace,
            "INSTANCE_IPS": ip,
            "NODE_NAME": node_name,
            "CLUSTER_ID": "Kubernetes",
            "ISTIO_VERSION": "1.28.0",
        }
    )
    return base_pb2.Node(id=f"ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local", metadata=meta)


def decode(type_url: str, res: discovery_pb2.Resource) -> Any:
    """The resource as ztunnel's handler sees it; ValueError if it is not the message its type says."""
    msg: Any = workload_pb2.Address() if type_url == ADDRESS else authorization_pb2.Authorization()
    if res.resource.type_url != type_url or not res.resource.Unpack(msg):
        raise ValueError(f"{res.name}: not a {type_url}")
    return msg


@dataclass
class Received:
    response: discovery_pb2.DeltaDiscoveryResponse
    at: float  # time.monotonic() when it arrived
    nacked: str = ""


@dataclass
class ZtunnelClient:
    channel: grpc.aio.Channel
    node: base_pb2.Node = field(default_factory=ztunnel_node)
    metadata: Sequence[tuple[str, str]] = ()
    # name -> (version, decoded message), per type: ztunnel's stores.
    stores: dict[str, dict[str, tuple[str, Any]]] = field(default_factory=lambda: {ADDRESS: {}, AUTHORIZATION: {}})
    # Called for each response; a non-empty string rejects it (NACK with that reason).
    reject: Callable[[discovery_pb2.DeltaDiscoveryResponse], str] | None = None
    received: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    _out: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = field(default_factory=asyncio.Queue)
    _call: Any = None
    _reader: asyncio.Task[None] | None = None
    error: grpc.aio.AioRpcError | None = None

    async def _requests(self) -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            req = await self._out.get()
            if req is None:
                return
            yield req

    def send(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        self._out.put_nowait(req)

    async def start(
        self,
        *,
        on_demand: bool = False,
        initial: Mapping[str, Mapping[str, str]] | None = None,
        types: Sequence[str] = (ADDRESS, AUTHORIZATION),
    ) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self._call = stub.DeltaAggregatedResources(self._requests(), metadata=list(self.metadata))
        for i, type_url in enumerate(types):
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
            if i == 0:
                req.node.CopyFrom(self.node)
            if on_demand and type_url == ADDRESS:
                req.resource_names_subscribe.append("*")
                req.resource_names_unsubscribe.append("*")
            for name, version in (initial or {}).get(type_url, {}).items():
                req.initial_resource_versions[name] = version
            self.send(req)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    return
                reason = self.reject(resp) if self.reject is not None else ""
                if not reason:
                    reason = self._apply(resp)
                ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
                if reason:
                    ack.error_detail.CopyFrom(status_pb2.Status(code=3, message=reason))
                self.send(ack)
                self.received.put_nowait(Received(resp, time.monotonic(), reason))
        except grpc.aio.AioRpcError as err:
            self.error = err
        except asyncio.CancelledError:
            pass

    def _apply(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> str:
        store = self.stores.setdefault(resp.type_url, {})
        rejected: list[str] = []
        for res in resp.resources:
            try:
                store[res.name] = (res.version, decode(resp.type_url, res))
            except ValueError as err:
                rejected.append(str(err))
        for name in resp.removed_resources:
            store.pop(name, None)
        return "; ".join(rejected)

    async def next(self, type_url: str | None = None, within: float = 5.0) -> Received:
        """The next response (of this type; others are skipped)."""
        async with asyncio.timeout(within):
            while True:
                item = await self.received.get()
                if type_url is None or item.response.type_url == type_url:
                    return item

    async def quiet(self, seconds: float = 0.3) -> list[Received]:
        """Whatever arrives within `seconds` (expected: nothing)."""
        await asyncio.sleep(seconds)
        out = []
        while not self.received.empty():
            out.append(self.received.get_nowait())
        return out

    @property
    def open(self) -> bool:
        """The stream is up: started, and its reader has not seen it end."""
        return self._reader is not None and not self._reader.done()

    def versions(self) -> dict[str, dict[str, str]]:
        return {t: {n: v for n, (v, _) in store.items()} for t, store in self.stores.items()}

    async def wait_closed(self, within: float = 5.0) -> grpc.aio.AioRpcError | None:
        assert self._reader is not None
        await asyncio.wait_for(self._reader, within)
        return self.error

    async def close(self) -> None:
        self._out.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@contextlib.asynccontextmanager
async def ztunnel(channel: grpc.aio.Channel, **kwargs: Any) -> AsyncIterator[ZtunnelClient]:
    start_args = {k: kwargs.pop(k) for k in ("on_demand", "initial", "types") if k in kwargs}
    client = ZtunnelClient(channel, **kwargs)
    await client.start(**start_args)
    try:
        yield client
    finally:
        await client.close()


async def sotw_exchange(
    channel: grpc.aio.Channel, requests: Sequence[discovery_pb2.DiscoveryRequest], metadata: Sequence[Any] = ()
) -> tuple[Any, asyncio.Queue[discovery_pb2.DiscoveryRequest | None]]:
    """Open a SotW stream with these first requests; returns (call, queue for further requests)."""
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)

    async def gen() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
        gen(), metadata=list(metadata)
    )
    return call, queue
