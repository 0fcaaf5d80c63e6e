"""Debug as istiod serves it: `istio.io/debug/syncz` and `istio.io/debug/config_dump` over xDS, and
`/debug/syncz`, `/debug/config_dump?proxyID=` over HTTP on the monitoring port.

syncz (istiod pilot/pkg/xds/statusgen.go): one `envoy.service.status.v3.ClientConfig` per connected proxy,
named by the proxy id `<pod>.<namespace>`, with node metadata CLUSTER_ID, NAMESPACE and ISTIO_VERSION and one
`generic_xds_configs` entry per type: LDS, RDS, EDS, CDS and ECDS always (NOT_SENT when an Envoy does not
watch them, UNKNOWN for a ztunnel), then every other type the stream watches. Each entry has the type URL,
the status (ERROR when the last response was rejected, NOT_SENT, SYNCED when the last nonce sent was
acknowledged, else STALE), the acknowledged version, when the type last changed, and the rejection.

config_dump: what the proxy holds from this ztd, per type: Envoy's own admin dump sections for clusters,
listeners, routes and endpoints; a ClientConfig with one generic entry per resource for the others.

Debug streams are answered here, outside the engine: each new request gets a freshly computed response;
ACKs are ignored. On the TLS port a caller outside the system namespace sees only proxies of its own
namespace. Debug streams never appear in syncz themselves.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
from aiohttp import web
from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2

from protos.istio.security import authorization_pb2  # noqa: F401 - registers the type for JSON dumps
from protos.istio.workload import workload_pb2  # noqa: F401 - registers the type for JSON dumps
from xds_server.server import AdsSource
from ztcore.authn import Caller
from ztcore.identity import Identity, IdentityError
from ztcore.untrusted import clip
from ztcore.xds import status as st
from ztcore.xds import typeurls
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.grpc_adapter import StreamInfo, XdsStreams
from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

# The types istiod always reports, in its order.
SYNCZ_TYPES = (
    typeurls.LISTENER,
    typeurls.ROUTE,
    typeurls.ENDPOINT,
    typeurls.CLUSTER,
    typeurls.EXTENSION_CONFIG,
)
SERVED_DEBUG_TYPES = (typeurls.DEBUG_SYNCZ, typeurls.DEBUG_CONFIG_DUMP)
_STATUS = {
    st.SYNCED: csds_pb2.ConfigStatus.SYNCED,
    st.STALE: csds_pb2.ConfigStatus.STALE,
    st.NOT_SENT: csds_pb2.ConfigStatus.NOT_SENT,
    st.ERROR: csds_pb2.ConfigStatus.ERROR,
}


class DebugError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, http_status: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


# -- pure --------------------------------------------------------------------------------------------------


def proxy_id(node_id: str) -> str:
    """istiod's proxy id: the `<pod>.<namespace>` part of `<type>~<ip>~<pod>.<namespace>~<domain>`."""
    parts = node_id.split("~")
    return parts[2] if len(parts) == 4 else node_id


def proxy_type(node_id: str) -> str:
    return node_id.split("~", 1)[0]


def _string_meta(node: base_pb2.Node, key: str) -> str:
    field = node.metadata.fields.get(key)
    return field.string_value if field is not None and field.WhichOneof("kind") == "string_value" else ""


def proxy_namespace(node: base_pb2.Node) -> str:
    """NAMESPACE metadata, else the first label of the node's DNS domain (as istiod)."""
    namespace = _string_meta(node, "NAMESPACE")
    if namespace:
        return namespace
    parts = node.id.split("~")
    labels = parts[3].split(".") if len(parts) == 4 else []
    return labels[0] if len(labels) > 1 else ""


def _timestamp(when: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC).replace(tzinfo=None))
    return ts


def _last_updated(w: st.WatchState) -> dt.datetime | None:
    times = [t for t in (w.last_sent, w.last_acked, w.last_nacked) if t is not None]
    return max(times) if times else None


def generic_config(type_url: str, w: st.WatchState | None, *, ztunnel: bool) -> csds_pb2.ClientConfig.GenericXdsConfig:
    cfg = csds_pb2.ClientConfig.GenericXdsConfig(type_url=type_url)
    if w is None:
        cfg.config_status = csds_pb2.ConfigStatus.UNKNOWN if ztunnel else csds_pb2.ConfigStatus.NOT_SENT
        return cfg
    cfg.config_status = _STATUS[w.status]
    cfg.version_info = w.version_acked
    updated = _timestamp(_last_updated(w))
    if updated is not None:
        cfg.last_updated.CopyFrom(updated)
    if w.last_error:
        cfg.error_state.details = w.last_error
        cfg.error_state.version_info = w.version_sent
        attempt = _timestamp(w.last_nacked)
        if attempt is not None:
            cfg.error_state.last_update_attempt.CopyFrom(attempt)
    return cfg


def node_summary(node: base_pb2.Node, cluster_id: str) -> base_pb2.Node:
    """The node as syncz reports it: proxy id plus CLUSTER_ID, NAMESPACE and ISTIO_VERSION."""
    meta = struct_pb2.Struct()
    meta.update(
        {
            "CLUSTER_ID": _string_meta(node, "CLUSTER_ID") or cluster_id,
            "NAMESPACE": proxy_namespace(node),
            "ISTIO_VERSION": _string_meta(node, "ISTIO_VERSION"),
        }
    )
    return base_pb2.Node(id=proxy_id(node.id), metadata=meta)


def client_config(info: StreamInfo, cluster_id: str) -> csds_pb2.ClientConfig:
    """One syncz entry (pure: reads the stream's current per-type state)."""
    statuses = info.statuses()
    ztunnel = proxy_type(info.node.id) == "ztunnel"
    configs = [generic_config(t, statuses.get(t), ztunnel=ztunnel) for t in SYNCZ_TYPES]
    configs += [generic_config(t, statuses[t], ztunnel=ztunnel) for t in sorted(statuses) if t not in SYNCZ_TYPES]
    return csds_pb2.ClientConfig(node=node_summary(info.node, cluster_id), generic_xds_configs=configs)


def syncz_json(infos: Iterable[StreamInfo], cluster_id: str) -> list[dict[str, Any]]:
    """/debug/syncz: istiod's flat fields per proxy (…_sent/…_acked nonces), plus every watched type."""
    flat = {
        typeurls.CLUSTER: "cluster",
        typeurls.LISTENER: "listener",
        typeurls.ROUTE: "route",
        typeurls.ENDPOINT: "endpoint",
        typeurls.EXTENSION_CONFIG: "extensionconfig",
    }
    out: list[dict[str, Any]] = []
    for info in sorted(infos, key=lambda i: proxy_id(i.node.id)):
        statuses = info.statuses()
        entry: dict[str, Any] = {
            "cluster_id": _string_meta(info.node, "CLUSTER_ID") or cluster_id,
            "proxy": proxy_id(info.node.id),
            "proxy_type": proxy_type(info.node.id),
            "istio_version": _string_meta(info.node, "ISTIO_VERSION"),
            "protocol": info.protocol,
            "peer": info.peer,
            "connected_at": info.connected_at.isoformat(),
        }
        for type_url, prefix in flat.items():
            w = statuses.get(type_url)
            entry[f"{prefix}_sent"] = w.nonce_sent if w else ""
            entry[f"{prefix}_acked"] = w.nonce_acked if w else ""
        entry["types"] = {
            typeurls.short_name(t): {
                "type_url": t,
                "status": w.status,
                "wildcard": w.wildcard,
                "subscribed": sorted(w.names),
                "resources": len(w.sent),
                "nonce_sent": w.nonce_sent,
                "nonce_acked": w.nonce_acked,
                "version_sent": w.version_sent,
                "version_acked": w.version_acked,
                "last_error": w.last_error,
                "last_updated": u.isoformat() if (u := _last_updated(w)) else None,
            }
            for t, w in sorted(statuses.items())
        }
        out.append(entry)
    return out


Lookup = Callable[[str, str], Resource | None]


def _pack(msg: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg, deterministic=True)
    return packed


def config_dump(info: StreamInfo, lookup: Lookup, cluster_id: str) -> list[any_pb2.Any]:
    """What the proxy holds from this ztd, by type (pure given `lookup(type_url, name)`)."""
    configs: list[any_pb2.Any] = []
    generic: list[csds_pb2.ClientConfig.GenericXdsConfig] = []
    for type_url, w in sorted(info.statuses().items(), key=lambda item: _rank(item[0])):
        held: list[Resource] = []
        for name in sorted(w.sent):
            res = lookup(type_url, name)
            if res is not None:
                held.append(res)
        updated = _timestamp(_last_updated(w))
        if type_url == typeurls.CLUSTER:
            configs.append(
                _pack(
                    config_dump_shared_pb2.ClustersConfigDump(
                        version_info=w.version_acked,
                        dynamic_active_clusters=[
                            config_dump_shared_pb2.ClustersConfigDump.DynamicCluster(
                                version_info=r.version, cluster=r.any, last_updated=updated
                            )
                            for r in held
                        ],
                    )
                )
            )
        elif type_url == typeurls.LISTENER:
            configs.append(
                _pack(
                    config_dump_shared_pb2.ListenersConfigDump(
                        version_info=w.version_acked,
                        dynamic_listeners=[
                            config_dump_shared_pb2.ListenersConfigDump.DynamicListener(
                                name=r.name,
                                active_state=config_dump_shared_pb2.ListenersConfigDump.DynamicListenerState(
                                    version_info=r.version, listener=r.any, last_updated=updated
                                ),
                            )
                            for r in held
                        ],
                    )
                )
            )
        elif type_url == typeurls.ROUTE:
            configs.append(
                _pack(
                    config_dump_shared_pb2.RoutesConfigDump(
                        dynamic_route_configs=[
                            config_dump_shared_pb2.RoutesConfigDump.DynamicRouteConfig(
                                version_info=r.version, route_config=r.any, last_updated=updated
                            )
                            for r in held
                        ]
                    )
                )
            )
        elif type_url == typeurls.ENDPOINT:
            configs.append(
                _pack(
                    config_dump_shared_pb2.EndpointsConfigDump(
                        dynamic_endpoint_configs=[
                            config_dump_shared_pb2.EndpointsConfigDump.DynamicEndpointConfig(
                                version_info=r.version, endpoint_config=r.any, last_updated=updated
                            )
                            for r in held
                        ]
                    )
                )
            )
        elif type_url == typeurls.SECRET:
            continue  # ztd's ADS serves no key material, and a dump must never carry any
        else:
            for r in held:
                acked = w.acked.get(r.name)
                generic.append(
                    csds_pb2.ClientConfig.GenericXdsConfig(
                        type_url=type_url,
                        name=r.name,
                        version_info=r.version,
                        xds_config=r.any,
                        last_updated=updated,
                        config_status=csds_pb2.ConfigStatus.SYNCED
                        if acked == r.version
                        else csds_pb2.ConfigStatus.STALE,
                    )
                )
    if generic:
        configs.append(
            _pack(csds_pb2.ClientConfig(node=node_summary(info.node, cluster_id), generic_xds_configs=generic))
        )
    return configs


def _rank(type_url: str) -> int:
    return typeurls.PUSH_ORDER.index(type_url) if type_url in typeurls.PUSH_ORDER else len(typeurls.PUSH_ORDER)


def dump_json(configs: Sequence[any_pb2.Any]) -> str:
    """Envoy's /config_dump document: `{"configs": [...]}` in proto JSON."""
    dump = config_dump_pb2.ConfigDump(configs=list(configs))
    return json_format.MessageToJson(dump, indent=2)


# -- the IO side ---------------------------------------------------------------------------------------------


class DebugService:
    def __init__(
        self,
        streams: XdsStreams,
        source: AdsSource,
        cache: SnapshotCache,
        *,
        cluster_id: str,
        control_plane: str,
        system_namespace: str = "istio-system",
    ) -> None:
        self._streams = streams
        self._source = source
        self._cache = cache
        self._cluster_id = cluster_id
        self._control_plane = base_pb2.ControlPlane(identifier=control_plane) if control_plane else None
        self._system_namespace = system_namespace

    # -- what the caller may see ------------------------------------------------------------------------------

    def _visible(self, caller: Caller | None) -> list[StreamInfo]:
        infos = self._streams.streams()
        namespace = _caller_namespace(caller)
        if namespace is None or namespace == self._system_namespace:
            return infos
        return [i for i in infos if proxy_namespace(i.node) == namespace]

    def syncz(self, caller: Caller | None = None) -> list[csds_pb2.ClientConfig]:
        infos = sorted(self._visible(caller), key=lambda i: proxy_id(i.node.id))
        return [client_config(i, self._cluster_id) for i in infos]

    def config_dump(self, wanted: str, caller: Caller | None = None) -> list[any_pb2.Any]:
        """DebugError NOT_FOUND/404 when no visible proxy has this id (`<pod>.<namespace>` or the node id)."""
        for info in reversed(self._visible(caller)):
            if wanted in (proxy_id(info.node.id), info.node.id):
                binding = self._source.binding_for(info)
                scopes = binding.scopes if binding is not None else ("",)

                def lookup(type_url: str, name: str, scopes: tuple[str, ...] = scopes) -> Resource | None:
                    for scope in scopes:
                        found = self._cache.get(type_url, name, scope)
                        if found is not None:
                            return found
                    return None

                return config_dump(info, lookup, self._cluster_id)
        raise DebugError(grpc.StatusCode.NOT_FOUND, f"no proxy {wanted!r} is connected to this ztd", 404)

    def _answer(self, type_url: str, names: Sequence[str], caller: Caller | None) -> list[tuple[str, any_pb2.Any]]:
        if type_url == typeurls.DEBUG_SYNCZ:
            return [(c.node.id, _pack(c)) for c in self.syncz(caller)]
        if type_url == typeurls.DEBUG_CONFIG_DUMP:
            wanted = [n for n in names if n != typeurls.WILDCARD]
            if len(wanted) != 1:
                raise DebugError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{typeurls.DEBUG_CONFIG_DUMP} takes exactly one resource name, the proxy id <pod>.<namespace>",
                    400,
                )
            return [(f"{wanted[0]}/{i}", a) for i, a in enumerate(self.config_dump(wanted[0], caller))]
        raise DebugError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"debug type {type_url!r} is not served (ztd serves {', '.join(SERVED_DEBUG_TYPES)})",
            404,
        )

    # -- over xDS -----------------------------------------------------------------------------------------------

    async def serve(
        self,
        first: Any,
        rest: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        protocol: str,
        caller: Caller | None,
        peer: str = "",
    ) -> None:
        """`peer`: the client's own address (behind the TLS front, context.peer() is the relay's)."""
        log.info("debug %s stream from %s (%s) asks for %s", protocol, peer or context.peer(),
                 clip(first.node.id, 128), clip(first.type_url, 120))  # fmt: skip
        await self._respond(first, context, protocol, caller, first=True)
        async for req in rest:
            await self._respond(req, context, protocol, caller, first=False)

    async def _respond(
        self, req: Any, context: grpc.aio.ServicerContext, protocol: str, caller: Caller | None, *, first: bool
    ) -> None:
        if not req.type_url.startswith(typeurls.DEBUG_PREFIX):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this stream asked for debug data; {req.type_url!r} needs a stream of its own",
            )
        if req.HasField("error_detail"):
            return
        if protocol == "sotw":
            if req.response_nonce and not first:
                return  # an ACK
            names: Sequence[str] = list(req.resource_names)
        else:
            if req.response_nonce and not req.resource_names_subscribe:
                return  # an ACK
            names = list(req.resource_names_subscribe)
        try:
            answer = self._answer(req.type_url, names, caller)
        except DebugError as err:
            await context.abort(err.code, err.message)
            return
        nonce = secrets.token_hex(8)
        version = dt.datetime.now(dt.UTC).isoformat()
        resp: discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse
        if protocol == "sotw":
            resp = discovery_pb2.DiscoveryResponse(
                type_url=req.type_url, nonce=nonce, version_info=version, resources=[a for _, a in answer]
            )
        else:
            resp = discovery_pb2.DeltaDiscoveryResponse(
                type_url=req.type_url,
                nonce=nonce,
                system_version_info=version,
                resources=[discovery_pb2.Resource(name=n, version=version, resource=a) for n, a in answer],
            )
        if self._control_plane is not None:
            resp.control_plane.CopyFrom(self._control_plane)
        await context.write(resp)

    # -- over HTTP ------------------------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/debug/syncz", self._http_syncz)
        app.router.add_get("/debug/config_dump", self._http_config_dump)

    async def _http_syncz(self, _: web.Request) -> web.Response:
        return web.json_response(syncz_json(self._streams.streams(), self._cluster_id), dumps=_dumps)

    async def _http_config_dump(self, request: web.Request) -> web.Response:
        wanted = request.query.get("proxyID", "")
        if not wanted:
            return web.json_response({"error": "give ?proxyID=<pod>.<namespace>"}, status=400)
        try:
            configs = self.config_dump(wanted)
        except DebugError as err:
            return web.json_response({"error": err.message}, status=err.http_status)
        return web.Response(text=dump_json(configs) + "\n", content_type="application/json")


def _caller_namespace(caller: Caller | None) -> str | None:
    """None: the caller sees every proxy (plaintext port); "": an identity ztd cannot place sees none."""
    if caller is None:
        return None
    for raw in caller.identities:
        try:
            return Identity.parse(raw).namespace
        except IdentityError:
            continue
    return ""


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2)
