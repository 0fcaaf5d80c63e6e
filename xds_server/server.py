"""ADS for Envoy and ztunnel-style clients: `envoy.service.discovery.v3.AggregatedDiscoveryService`.

StreamAggregatedResources (SotW) and DeltaAggregatedResources run on the shared xDS engine
(`ztcore.xds`); this module only decides who may connect and what each stream sees:

- clients are typed by the node id prefix, as istiod does: `ztunnel~` streams see the shared WDS resources
  (`istio.workload.Address`, `istio.security.Authorization`); each `sidecar~` and `router~` stream is bound
  to a cache scope of its own, whose Envoy resources the config side (`ProxyConfigs`, in ztd
  `xds_server.envoy_configs`) builds and keeps current: this module never builds configuration, it serves
  the cache (go-control-plane's split); any other node is refused (InvalidArgument);
- on the TLS port every stream authenticates with the CA's authenticators (client certificate, or a bearer
  token), else Unauthenticated, like istiod with XDS_AUTH; the identity must then belong to the node's
  namespace (and service account, when the node names one), else PermissionDenied. The plaintext port
  needs no credential, as istiod's 15010;
- a stream whose first request asks for an `istio.io/debug/...` type is answered by `xds_server.debug`;
- pushes are throttled (istiod's PILOT_PUSH_THROTTLE): at most `push_throttle` initial syncs are built at
  once, and at most as many heavy responses (HEAVY_PUSH resources or more) are in flight at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ztcore.authn import AuthenticationError, Authenticator, Caller, PeerLookup, authenticate, credentials_from_context
from ztcore.envoy.proxy import Proxy, ProxyError
from ztcore.identity import Identity, IdentityError
from ztcore.untrusted import clip
from ztcore.xds import typeurls
from ztcore.xds.cache import GLOBAL_SCOPE
from ztcore.xds.grpc_adapter import NODE_ID_LIMIT, SourceError, StreamInfo, XdsStreams

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ZTUNNEL = "ztunnel"
ENVOY_NODE_TYPES = ("sidecar", "router")
NODE_TYPES = (*ENVOY_NODE_TYPES, ZTUNNEL)
SERVED_TYPES = frozenset(
    {
        typeurls.CLUSTER,
        typeurls.ENDPOINT,
        typeurls.LISTENER,
        typeurls.ROUTE,
        typeurls.SECRET,
        typeurls.EXTENSION_CONFIG,
        typeurls.ADDRESS,
        typeurls.WORKLOAD,
        typeurls.AUTHORIZATION,
    }
)
META_SERVICE_ACCOUNT = "SERVICE_ACCOUNT"
AUTHN_FAILURE = "authentication failure"


# -- pure helpers ----------------------------------------------------------------------------------------


def parse_node(node: base_pb2.Node) -> Proxy:
    """The node as istiod parses it; ProxyError with a one-line reason when ztd does not serve it."""
    if not node.id:
        raise ProxyError("the first request carries no node id (<type>~<ip>~<pod>.<namespace>~<domain>)")
    proxy = Proxy.from_node(node)
    if proxy.type not in NODE_TYPES:
        raise ProxyError(f"node type {proxy.type!r} is not served by ztd (serves {', '.join(NODE_TYPES)})")
    return proxy


def check_identity(proxy: Proxy, caller: Caller) -> Identity:
    """istiod's checkConnectionIdentity: one of the caller's identities must be in the node's namespace and,
    when the node metadata names a service account, be that account. ValueError says why not."""
    account = proxy.meta(META_SERVICE_ACCOUNT)
    for raw in caller.identities:
        try:
            identity = Identity.parse(raw)
        except IdentityError:
            continue
        if proxy.namespace and identity.namespace != proxy.namespace:
            continue
        if account and identity.service_account != account:
            continue
        return identity
    wanted = f"{proxy.namespace}/{account or '*'}"
    raise ValueError(f"no identity of the caller ({', '.join(caller.identities)}) matches {wanted}")


def control_plane_identifier(instance_id: str, version: str) -> str:
    """istiod's ControlPlane.identifier: JSON {Component, ID, Info{version}} (istioctl reads ID and version)."""
    return json.dumps({"Component": "istiod", "ID": instance_id, "Info": {"version": version}}, sort_keys=True)


# -- the source: node → binding ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class AdsBinding:
    """One stream: its proxy, verified identity, and the cache scopes it reads (its own first)."""

    source: AdsSource
    proxy: Proxy
    identity: Identity | None
    scope: str  # per-proxy scope of Envoy resources; "" for ztunnel
    peer: str
    node_id: str

    @property
    def scopes(self) -> tuple[str, ...]:
        return (self.scope, GLOBAL_SCOPE) if self.scope else (GLOBAL_SCOPE,)

    async def subscribe(self, type_url: str, names: frozenset[str]) -> None:
        refusal = unserved_type(type_url)
        if refusal:
            raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, refusal)

    async def unsubscribe(self, type_url: str, names: frozenset[str]) -> None:
        return None

    async def close(self) -> None:
        self.source.release(self)


class ProxyConfigs(Protocol):
    """The config side of Envoy streams (`xds_server.envoy_configs.EnvoyConfigs` in ztd), told when an Envoy
    binds to its scope and when it leaves, as go-control-plane's callbacks tell the application."""

    async def connect(self, scope: str, proxy: Proxy) -> None:
        """Have `proxy`'s resources installed under `scope` (and kept current) before this returns.
        ProxyError: this proxy cannot be served; any other exception: a bug on the config side."""
        ...

    def disconnect(self, scope: str) -> None:
        """The stream bound to `scope` ended: its resources may go."""
        ...


class AdsSource:
    """ztcore.xds Source for ADS: authorizes nodes and binds streams to scopes; the config side fills them."""

    def __init__(self, configs: ProxyConfigs) -> None:
        self._configs = configs
        self._ids = itertools.count(1)
        self._all: list[AdsBinding] = []
        # Set by the servicer around each stream: the authenticated caller (None on the plaintext port).
        self.caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("xds_caller", default=None)

    async def open_stream(self, node: base_pb2.Node, peer: str) -> AdsBinding:
        try:
            proxy = parse_node(node)
        except ProxyError as err:
            raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        caller = self.caller.get()
        identity = None
        if caller is not None:
            try:
                identity = check_identity(proxy, caller)
            except ValueError as err:
                raise SourceError(grpc.StatusCode.PERMISSION_DENIED, f"authorization failed: {err}") from None
        scope = f"envoy/{next(self._ids)}" if proxy.type in ENVOY_NODE_TYPES else ""
        binding = AdsBinding(self, proxy, identity, scope, peer, node.id)
        if scope:
            try:
                await self._configs.connect(scope, proxy)
            except ProxyError as err:
                raise SourceError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
            except Exception:
                log.exception("building Envoy configuration for %s failed", clip(node.id, NODE_ID_LIMIT))
                raise SourceError(
                    grpc.StatusCode.INTERNAL, "internal error building this proxy's configuration"
                ) from None
        self._all.append(binding)
        return binding

    def release(self, binding: AdsBinding) -> None:
        if binding in self._all:
            self._all.remove(binding)
        if binding.scope:
            self._configs.disconnect(binding.scope)

    def binding_for(self, info: StreamInfo) -> AdsBinding | None:
        """The binding of a live stream (for config dumps), matched by node id and peer."""
        for binding in reversed(self._all):
            if binding.node_id == info.node.id and binding.peer == info.peer:
                return binding
        return None


# -- throttling --------------------------------------------------------------------------------------------


class _Permit:
    """A stream's hold on the push throttle while its initial sync is built and written."""

    GRACE = 1.0  # a first request that yields no response must not hold the permit forever

    def __init__(self, throttle: asyncio.Semaphore) -> None:
        self._throttle = throttle
        self._held = False
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self) -> None:
        await self._throttle.acquire()
        self._held = True
        self._timer = asyncio.get_running_loop().call_later(self.GRACE, self.release)

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._held = False
            self._throttle.release()


def unserved_type(type_url: str) -> str:
    """The refusal for a type ztd does not serve, or "" when it does."""
    if type_url in SERVED_TYPES:
        return ""
    return f"type {clip(type_url, 120)!r} is not served by ztd (serves {', '.join(sorted(SERVED_TYPES))})"


class _Requests:
    """The stream's requests as the engine reads them: the first waits for a push permit, and a request for
    a type ztd does not serve ends the stream (the servicer then answers InvalidArgument)."""

    def __init__(self, first: Any, rest: AsyncIterator[Any], permit: _Permit) -> None:
        self._first = first
        self._rest = rest
        self._permit = permit
        self.refusal = ""

    async def __aiter__(self) -> AsyncIterator[Any]:
        await self._permit.acquire()
        yield self._first
        async for req in self._rest:
            self.refusal = unserved_type(req.type_url)
            if self.refusal:
                return
            yield req


HEAVY_PUSH = 100  # resources in one response: a full sync or a mass change, worth throttling


def _resource_count(resp: Any) -> int:
    count = getattr(resp, "resource_count", None)  # an EncodedDeltaResponse knows without decoding
    return int(count) if count is not None else len(resp.resources)


class _ThrottledContext:
    """The servicer context as the engine sees it: a heavy write (an initial sync, or a response of at least
    HEAVY_PUSH resources) holds a push permit, so that only `push_throttle` of them are built and in flight
    at once. A small incremental push is not queued: it costs less than the wait (each permit hand-over is
    a loop round trip), and waiting would only delay convergence."""

    def __init__(
        self, context: grpc.aio.ServicerContext, throttle: asyncio.Semaphore, permit: _Permit, peer: str
    ) -> None:
        self._context = context
        self._throttle = throttle
        self._permit = permit
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        await self._context.abort(code, details)

    async def write(self, resp: Any) -> None:
        if self._permit.held:
            try:
                await self._context.write(resp)
            finally:
                self._permit.release()
        elif _resource_count(resp) >= HEAVY_PUSH:
            async with self._throttle:
                await self._context.write(resp)
        else:
            await self._context.write(resp)


# -- the servicer ------------------------------------------------------------------------------------------


class DebugHandler(Protocol):
    """xds_server.debug's answer to a stream whose first request asks for an `istio.io/debug/` type."""

    async def serve(
        self,
        first: Any,
        rest: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        protocol: str,
        caller: Caller | None,
        peer: str = "",
    ) -> None: ...


class AdsServicer:
    """One per gRPC server: `tls_peers` is the TLS front's lookup on the secure port, None on plaintext."""

    def __init__(
        self,
        streams: XdsStreams,
        source: AdsSource,
        debug: DebugHandler,
        *,
        authenticators: Sequence[Authenticator] = (),
        tls_peers: PeerLookup | None = None,
        require_auth: bool = True,
        throttle: asyncio.Semaphore,
    ) -> None:
        self._streams = streams
        self._source = source
        self._debug = debug
        self._authenticators = list(authenticators)
        self._tls_peers = tls_peers
        self._require_auth = require_auth and tls_peers is not None
        self._throttle = throttle

    async def StreamAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(request_iterator, context, "sotw")

    async def DeltaAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await self._serve(request_iterator, context, "delta")

    async def _serve(self, requests: Any, context: grpc.aio.ServicerContext, protocol: str) -> None:
        caller = await self._authenticate(context)
        peer = self._peer(context)
        rest = aiter(requests)
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            return
        if first.type_url.startswith(typeurls.DEBUG_PREFIX):
            await self._debug.serve(first, rest, context, protocol, caller, peer)
            return
        refusal = unserved_type(first.type_url)
        if refusal:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        permit = _Permit(self._throttle)
        requests_in = _Requests(first, rest, permit)
        token = self._source.caller.set(caller)
        try:
            wrapped = _ThrottledContext(context, self._throttle, permit, peer)
            if protocol == "sotw":
                await self._streams.sotw(aiter(requests_in), wrapped)
            else:
                await self._streams.delta(aiter(requests_in), wrapped)
        finally:
            permit.release()
            self._source.caller.reset(token)
        if requests_in.refusal:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, requests_in.refusal)

    def _peer(self, context: grpc.aio.ServicerContext) -> str:
        """The client's address in gRPC's form: behind the TLS front, the one the front saw, not its relay's."""
        relayed = str(context.peer() or "unknown")
        tls = self._tls_peers(relayed) if self._tls_peers is not None else None
        if tls is None:
            return relayed
        host, _, port = tls.address.rpartition(":")
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> Caller | None:
        if self._tls_peers is None:
            return None  # plaintext port: istiod serves 15010 without authentication
        creds = credentials_from_context(context, self._tls_peers)
        if creds is None:
            log.warning("xDS stream from %s refused: it did not arrive through the TLS port", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTHN_FAILURE)
            raise AssertionError("abort returned")
        try:
            return await authenticate(self._authenticators, creds)
        except AuthenticationError as err:
            if not self._require_auth:
                return None
            log.warning("xDS stream from %s refused: authentication failed: %s", creds.peer, err)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTHN_FAILURE)
            raise AssertionError("abort returned") from None


def add_ads_to_server(servicer: AdsServicer, server: grpc.aio.Server) -> str:
    """Register both ADS methods; returns the service name (for health and reflection)."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_serialize,
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE, handlers),))
    return ADS_SERVICE


def _serialize(resp: Any) -> bytes:
    out: bytes = resp.SerializeToString()
    return out
