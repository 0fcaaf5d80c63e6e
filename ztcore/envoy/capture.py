"""Listeners of a sidecar whose traffic iptables redirects to it (interception REDIRECT or TPROXY), in istiod's
shape (pilot/pkg/networking/core listener_inbound.go, filterchain_options.go, listener_builder.go):

- `virtualOutbound` on 0.0.0.0:15001 hands each connection to the listener of its original destination
  (`use_original_dst`): `0.0.0.0_<port>` for an HTTP service port (Host-based routes, RDS `<port>`),
  `<vip>_<port>` for a TCP one; both only exist virtually (`bind_to_port: false`). What matches none goes to
  `PassthroughCluster` (ALLOW_ANY) or `BlackHoleCluster` (REGISTRY_ONLY); a connection to 15001 itself is
  blackholed, so it cannot loop.
- `virtualInbound` on 0.0.0.0:15006 takes everything redirected to the pod: per target port of its services,
  filter chains chosen by the port's PeerAuthentication mode (STRICT: mTLS only; PERMISSIVE: mTLS told from
  plaintext by the TLS inspector and ALPN; DISABLE: plaintext only), then the authorization filters and the
  app (`inbound|<port>||`, the original destination, from 127.0.0.6); ports no service declares go to
  `InboundPassthroughCluster` through the same kind of chains, with the workload's mode.

Istio's own Envoy build adds metadata-exchange, ALPN and stats filters; upstream Envoy (what ztdpu runs) has none
of them, so they are not generated. tests/interop/test_sidecar_vs_istiod.py compares the rest of the structure
(listener, cluster and chain names, matches, filters, RBAC policy names) with the real istiod's for the same pods.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import range_pb2
from google.protobuf import message, wrappers_pb2

from ztcore.envoy.common import (
    BLACKHOLE_CLUSTER,
    HCM_FILTER,
    INBOUND_CAPTURE_PORT,
    INBOUND_PASSTHROUGH_CLUSTER,
    OUTBOUND_CAPTURE_PORT,
    PASSTHROUGH_CLUSTER,
    VIRTUAL_INBOUND,
    VIRTUAL_OUTBOUND,
    common_tls_context,
    downstream_tls,
    inbound_cluster_name,
    listener_name,
    network_filter,
    pack,
    seconds,
    socket_address,
    uri_san_prefix,
)
from ztcore.envoy.listeners import HCM, http_filters, tcp_proxy_filter
from ztcore.envoy.mesh import InboundPort
from ztcore.envoy.peerauth import EffectivePeerAuthentication, MtlsMode
from ztcore.envoy.routes import inbound_route_config

WILDCARD = "0.0.0.0"  # noqa: S104 -- captured traffic arrives for any of the pod's addresses
TLS = "tls"
RAW = "raw_buffer"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR = "envoy.filters.listener.http_inspector"
BLACKHOLE_CHAIN_IN = "virtualInbound-blackhole"
BLACKHOLE_CHAIN_OUT = "virtualOutbound-blackhole"
CATCH_ALL_TCP_CHAIN_OUT = "virtualOutbound-catchall-tcp"
CATCH_ALL_HTTP_CHAIN_IN = "virtualInbound-catchall-http"

# ALPN values (pilot/pkg/networking/util): what an in-mesh client offers over mTLS, and plaintext HTTP.
MTLS_HTTP_ALPNS = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
MTLS_TCP_ALPNS = ("istio-peer-exchange", "istio")
ALL_ISTIO_MTLS_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
# istiod leaves http/1.0 out unless its HTTP10 feature is on (a 1.0 request would be rejected; as raw TCP
# it at least passes).
PLAINTEXT_HTTP_ALPNS = ("http/1.1", "h2c")


@dataclass(frozen=True, slots=True)
class ChainOption:
    """One filter chain of a port: what it matches and whether it terminates mTLS."""

    http: bool
    transport: str
    alpns: tuple[str, ...] = ()
    terminate: bool = False


def _o(http: bool, transport: str, alpns: tuple[str, ...] = (), terminate: bool = False) -> ChainOption:
    return ChainOption(http, transport, alpns, terminate)


# istiod's tables, by (listener protocol, mode). "auto" is the passthrough chains' protocol (unknown port).
_OPTIONS: dict[tuple[str, MtlsMode], tuple[ChainOption, ...]] = {
    ("http", MtlsMode.STRICT): (_o(True, TLS, terminate=True),),
    ("http", MtlsMode.PERMISSIVE): (_o(True, TLS, ALL_ISTIO_MTLS_ALPNS, True), _o(True, RAW)),
    ("http", MtlsMode.DISABLE): (_o(True, RAW),),
    ("tcp", MtlsMode.STRICT): (_o(False, TLS, terminate=True),),
    ("tcp", MtlsMode.PERMISSIVE): (_o(False, TLS, ALL_ISTIO_MTLS_ALPNS, True), _o(False, RAW), _o(False, TLS)),
    ("tcp", MtlsMode.DISABLE): (_o(False, RAW),),
    ("auto", MtlsMode.STRICT): (_o(True, TLS, MTLS_HTTP_ALPNS, True), _o(False, TLS, terminate=True)),
    ("auto", MtlsMode.PERMISSIVE): (
        _o(True, TLS, MTLS_HTTP_ALPNS, True),
        _o(True, RAW, PLAINTEXT_HTTP_ALPNS),
        _o(False, TLS, MTLS_TCP_ALPNS, True),
        _o(False, RAW),
        _o(False, TLS),
    ),
    ("auto", MtlsMode.DISABLE): (_o(True, RAW, PLAINTEXT_HTTP_ALPNS), _o(False, RAW)),
}


@dataclass(frozen=True, slots=True)
class InboundAuthz:
    """The authorization filters every inbound chain of one workload carries (from its policies): HTTP ones
    before the router, network ones before the TCP proxy."""

    http: tuple[hcm_pb2.HttpFilter, ...] = ()
    network: tuple[listener_components_pb2.Filter, ...] = ()
    # ("namespace/name", what the sidecar does differently from what the policy says, or why it is left out)
    notes: tuple[tuple[str, str], ...] = ()


def _listener_filter(
    name: str, config: message.Message, disabled: listener_pb2.ListenerFilterChainMatchPredicate | None = None
) -> listener_components_pb2.ListenerFilter:
    out = listener_components_pb2.ListenerFilter(name=name, typed_config=pack(config))
    if disabled is not None:
        out.filter_disabled.CopyFrom(disabled)
    return out


def _port_predicate(ports: Sequence[int]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
    """Matches a connection to any of `ports` (each as the range [p, p+1))."""
    Predicate = listener_components_pb2.ListenerFilterChainMatchPredicate
    rules = [Predicate(destination_port_range=range_pb2.Int32Range(start=p, end=p + 1)) for p in sorted(ports)]
    if len(rules) == 1:
        return rules[0]
    return Predicate(or_match=Predicate.MatchSet(rules=rules))


def listener_filters(
    chains: Iterable[listener_components_pb2.FilterChain], *, original_dst: bool
) -> list[listener_components_pb2.ListenerFilter]:
    """original_dst (for virtual listeners), then the TLS and HTTP inspectors where some chain needs them,
    switched off per port where none does (istiod's populateListenerFilters). Port 0: chains with no port."""
    out: list[listener_components_pb2.ListenerFilter] = []
    if original_dst:
        out.append(_listener_filter(ORIGINAL_DST_FILTER, original_dst_pb2.OriginalDst()))
    tls: dict[int, bool] = {}
    http: dict[int, bool] = {}
    for chain in chains:
        match = chain.filter_chain_match
        port = match.destination_port.value if match.HasField("destination_port") else 0
        tls[port] = tls.get(port, False) or match.transport_protocol == TLS
        http[port] = http.get(port, False) or any(a in ("http/1.1", "h2c") for a in match.application_protocols)
    Predicate = listener_components_pb2.ListenerFilterChainMatchPredicate
    if any(tls.values()):
        if tls.get(0, False):
            off = [p for p, need in tls.items() if p and not need]
            out.append(
                _listener_filter(TLS_INSPECTOR, tls_inspector_pb2.TlsInspector(), _port_predicate(off) if off else None)
            )
        else:
            on = [p for p, need in tls.items() if p and need]
            out.append(
                _listener_filter(
                    TLS_INSPECTOR, tls_inspector_pb2.TlsInspector(), Predicate(not_match=_port_predicate(on))
                )
            )
    if any(http.values()):
        off = [p for p, need in http.items() if not need]
        out.append(
            _listener_filter(HTTP_INSPECTOR, http_inspector_pb2.HttpInspector(), _port_predicate(off) if off else None)
        )
    return out


# --- inbound ------------------------------------------------------------------------------------------------


def _inbound_hcm(
    stat_prefix: str, route_port: int, cluster: str, authz: InboundAuthz
) -> listener_components_pb2.Filter:
    manager = HCM(
        stat_prefix=stat_prefix,
        route_config=inbound_route_config(route_port, cluster),
        http_filters=http_filters(authz.http),
        forward_client_cert_details=HCM.APPEND_FORWARD,
        set_current_client_cert_details=HCM.SetCurrentClientCertDetails(dns=True, uri=True),
    )
    manager.set_current_client_cert_details.subject.value = True
    return network_filter(HCM_FILTER, manager)


def _chain(
    option: ChainOption,
    *,
    name: str,
    port: int,
    cluster: str,
    authz: InboundAuthz,
    trust_domain: str,
    stat_prefix: str,
) -> listener_components_pb2.FilterChain:
    match = listener_components_pb2.FilterChainMatch(
        transport_protocol=option.transport, application_protocols=list(option.alpns)
    )
    if port:
        match.destination_port.CopyFrom(wrappers_pb2.UInt32Value(value=port))
    if option.http:
        filters = [_inbound_hcm(stat_prefix, port, cluster, authz)]
    else:
        filters = [*authz.network, tcp_proxy_filter(cluster)]
    chain = listener_components_pb2.FilterChain(name=name, filter_chain_match=match, filters=filters)
    if option.terminate:
        alpn = ("h2", "http/1.1") if option.http else ()
        chain.transport_socket.CopyFrom(
            downstream_tls(common_tls_context([uri_san_prefix(f"spiffe://{trust_domain}/")], alpn))
        )
    return chain


def _blackhole_chain(name: str, port: int) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(
        name=name,
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            destination_port=wrappers_pb2.UInt32Value(value=port)
        ),
        filters=[tcp_proxy_filter(BLACKHOLE_CLUSTER)],
    )


def virtual_inbound(
    ports: Sequence[InboundPort],
    peer_auth: EffectivePeerAuthentication,
    authz: InboundAuthz,
    trust_domain: str,
    *,
    transparent: bool = False,
) -> listener_pb2.Listener:
    """`virtualInbound`: the passthrough chains first (blackhole on 15006, then unknown ports with the workload's
    mode and each port-level mode no service port covers), then each service target port's chains."""
    chains = [_blackhole_chain(BLACKHOLE_CHAIN_IN, INBOUND_CAPTURE_PORT)]
    declared = {p.target_port for p in ports}
    passthrough_ports = [0, *sorted(p for p in peer_auth.per_port if p not in declared)]
    for port in passthrough_ports:
        for option in _OPTIONS[("auto", peer_auth.for_port(port))]:
            name = CATCH_ALL_HTTP_CHAIN_IN if option.http else VIRTUAL_INBOUND
            chains.append(
                _chain(option, name=name, port=port, cluster=INBOUND_PASSTHROUGH_CLUSTER, authz=authz,
                       trust_domain=trust_domain, stat_prefix=INBOUND_PASSTHROUGH_CLUSTER)
            )  # fmt: skip
    for p in ports:
        kind = "http" if p.protocol.is_http else "tcp"
        name = listener_name(WILDCARD, p.target_port)
        for option in _OPTIONS[(kind, peer_auth.for_port(p.target_port))]:
            chains.append(
                _chain(option, name=name, port=p.target_port, cluster=inbound_cluster_name(p.target_port),
                       authz=authz, trust_domain=trust_domain, stat_prefix=f"inbound_{name}")
            )  # fmt: skip
    listener = listener_pb2.Listener(
        name=VIRTUAL_INBOUND,
        address=socket_address(WILDCARD, INBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        continue_on_listener_filters_timeout=True,
        listener_filters_timeout=seconds(0),  # meshConfig.protocolDetectionTimeout: off by default
        filter_chains=chains,
        listener_filters=listener_filters(chains, original_dst=True),
    )
    if transparent:
        listener.transparent.value = True
    return listener


# --- outbound -----------------------------------------------------------------------------------------------


def virtual_outbound(registry_only: bool, *, transparent: bool = False) -> listener_pb2.Listener:
    """`virtualOutbound`: the listener iptables redirects every outbound connection to."""
    catch_all = BLACKHOLE_CLUSTER if registry_only else PASSTHROUGH_CLUSTER
    listener = listener_pb2.Listener(
        name=VIRTUAL_OUTBOUND,
        address=socket_address(WILDCARD, OUTBOUND_CAPTURE_PORT),
        use_original_dst=wrappers_pb2.BoolValue(value=True),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        filter_chains=[
            _blackhole_chain(BLACKHOLE_CHAIN_OUT, OUTBOUND_CAPTURE_PORT),
            listener_components_pb2.FilterChain(name=CATCH_ALL_TCP_CHAIN_OUT, filters=[tcp_proxy_filter(catch_all)]),
        ],
    )
    if transparent:
        listener.transparent.value = True
    return listener


def unbound(listener: listener_pb2.Listener) -> listener_pb2.Listener:
    """The same listener reached only through `virtualOutbound` (no socket of its own)."""
    listener.bind_to_port.value = False
    return listener
