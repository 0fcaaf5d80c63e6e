"""Every xDS type URL we serve, and the per-type rules that depend only on the URL."""

from __future__ import annotations

from ztcore.untrusted import clip

PREFIX = "type.googleapis.com/"

LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG = PREFIX + "envoy.config.core.v3.TypedExtensionConfig"

# Istio's own types (ztunnel's WDS and its authorization policies).
ADDRESS = PREFIX + "istio.workload.Address"
WORKLOAD = PREFIX + "istio.workload.Workload"
AUTHORIZATION = PREFIX + "istio.security.Authorization"

# istioctl reads debug data over xDS with these (not Any-prefixed, as istiod).
DEBUG_PREFIX = "istio.io/debug/"
DEBUG_SYNCZ = DEBUG_PREFIX + "syncz"
DEBUG_CONFIG_DUMP = DEBUG_PREFIX + "config_dump"

# The order a make-before-break ADS push follows (CDS, EDS, LDS, RDS, then the rest).
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, EXTENSION_CONFIG, ADDRESS, WORKLOAD, AUTHORIZATION)

_SHORT = {
    CLUSTER: "CDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
    ENDPOINT: "EDS",
    SECRET: "SDS",
    EXTENSION_CONFIG: "ECDS",
    ADDRESS: "WDS",
    WORKLOAD: "WDS",
    AUTHORIZATION: "WADS",
}

WILDCARD = "*"


def is_wildcard_type(type_url: str) -> bool:
    """Whether an empty subscription means "everything" (istio pkg/xds IsWildcardTypeURL).

    By the xDS spec only Listener and Cluster are wildcard types; Secret, endpoints, routes and ECDS are
    not; Istio's own types (Address, Authorization, debug) use wildcard semantics.
    """
    return type_url not in (SECRET, ENDPOINT, ROUTE, EXTENSION_CONFIG)


def short_name(type_url: str) -> str:
    """CDS/LDS/... as istioctl prints them; unknown types keep their URL (clipped: a client chose it)."""
    return _SHORT.get(type_url) or clip(type_url, 120)
