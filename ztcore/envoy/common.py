"""Pieces every Envoy builder shares: names, config sources, SDS references, TLS contexts, addresses.

Shapes follow istiod's (pilot/pkg/networking/core, pkg/model/authentication.go); the names are Istio's:
`outbound|<port>||<hostname>`, `inbound|<port>||`, listeners `<address>_<port>`, secrets `default`/`ROOTCA`
from the node agent's `sds-grpc` cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, message

from ztcore.model.workload import AppProtocol

SDS_CLUSTER = "sds-grpc"
SDS_CERT = "default"
SDS_ROOT = "ROOTCA"

TLS_SOCKET = "envoy.transport_sockets.tls"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"
GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Capture (interception REDIRECT/TPROXY): Istio's listener ports, cluster and chain names.
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_CAPTURE_PORT = 15001  # meshConfig.proxyListenPort
INBOUND_CAPTURE_PORT = 15006  # meshConfig.proxyInboundListenPort
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
INBOUND_PASSTHROUGH_BIND = "127.0.0.6"

# istiod's default mesh connectTimeout.
CONNECT_TIMEOUT_SECONDS = 10


class Protocol(enum.Enum):
    """What a port carries, as far as Envoy is concerned."""

    HTTP = "http"  # HTTP/1.1 to the upstream; the downstream codec is detected
    HTTP2 = "http2"  # HTTP/2 (and gRPC) to the upstream
    TCP = "tcp"  # opaque bytes (tcp, tls, and ports whose protocol is unknown: no sniffing here)

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP

    @classmethod
    def of(cls, app: AppProtocol) -> Protocol:
        if app is AppProtocol.HTTP11:
            return cls.HTTP
        if app in (AppProtocol.HTTP2, AppProtocol.GRPC):
            return cls.HTTP2
        return cls.TCP


def outbound_cluster_name(port: int, hostname: str) -> str:
    return f"outbound|{port}||{hostname}"


def inbound_cluster_name(port: int) -> str:
    return f"inbound|{port}||"


def listener_name(address: str, port: int) -> str:
    return f"{address}_{port}"


def outbound_sni(port: int, hostname: str) -> str:
    """The SNI istiod sets on mesh mTLS clusters (pilot/pkg/model BuildDNSSrvSubsetKey)."""
    return f"outbound_.{port}_._.{hostname}"


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic, so that a resource's content version does not depend on map order.
    packed.Pack(msg, deterministic=True)
    return packed


def seconds(value: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=value)


def socket_address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def ads_config_source() -> config_source_pb2.ConfigSource:
    """EDS/RDS over the same ADS stream, without blocking warm-up (istiod's initial_fetch_timeout 0s)."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        initial_fetch_timeout=seconds(0),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def sds_secret_config(name: str) -> secret_pb2.SdsSecretConfig:
    """A secret from the node agent, as istiod writes it (pkg/model/authentication.go)."""
    return secret_pb2.SdsSecretConfig(
        name=name,
        sds_config=config_source_pb2.ConfigSource(
            api_config_source=config_source_pb2.ApiConfigSource(
                api_type=config_source_pb2.ApiConfigSource.GRPC,
                set_node_on_first_message_only=True,
                transport_api_version=config_source_pb2.ApiVersion.V3,
                grpc_services=[
                    grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER)
                    )
                ],
            ),
            initial_fetch_timeout=seconds(0),
            resource_api_version=config_source_pb2.ApiVersion.V3,
        ),
    )


def uri_san_exact(uri: str) -> common_pb2.SubjectAltNameMatcher:
    return common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=string_pb2.StringMatcher(exact=uri)
    )


def uri_san_prefix(prefix: str) -> common_pb2.SubjectAltNameMatcher:
    return common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=string_pb2.StringMatcher(prefix=prefix)
    )


def common_tls_context(
    sans: Iterable[common_pb2.SubjectAltNameMatcher], alpn: Iterable[str] = ()
) -> tls_pb2.CommonTlsContext:
    """Our certificate (`default`) and the trust bundle (`ROOTCA`) by SDS; the peer's URI SAN must match."""
    return tls_pb2.CommonTlsContext(
        alpn_protocols=list(alpn),
        tls_certificate_sds_secret_configs=[sds_secret_config(SDS_CERT)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=list(sans)
            ),
            validation_context_sds_secret_config=sds_secret_config(SDS_ROOT),
        ),
    )


def upstream_tls(context: tls_pb2.CommonTlsContext, sni: str = "") -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name=TLS_SOCKET, typed_config=pack(tls_pb2.UpstreamTlsContext(common_tls_context=context, sni=sni))
    )


def downstream_tls(context: tls_pb2.CommonTlsContext) -> base_pb2.TransportSocket:
    tls = tls_pb2.DownstreamTlsContext(common_tls_context=context)
    tls.require_client_certificate.value = True
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(tls))


def http_protocol_options(protocol: Protocol) -> dict[str, Any]:
    """`typed_extension_protocol_options` for a cluster speaking `protocol` upstream (empty for TCP)."""
    if not protocol.is_http:
        return {}
    explicit = http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig()
    if protocol is Protocol.HTTP2:
        explicit.http2_protocol_options.CopyFrom(protocol_pb2.Http2ProtocolOptions())
    else:
        explicit.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
    return {HTTP_OPTIONS_KEY: pack(http_protocol_options_pb2.HttpProtocolOptions(explicit_http_config=explicit))}


def network_filter(name: str, config: message.Message) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=pack(config))
