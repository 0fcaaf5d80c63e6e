"""Who is asking: an Envoy's xDS node, parsed as istiod parses it (pilot/pkg/model ParseServiceNodeWithMetadata).

Node id: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`. The addresses come from the metadata
`INSTANCE_IPS` (comma-separated) when every entry is an IP, else from the id; the namespace from the metadata
`NAMESPACE`, else from the first label of the DNS domain; the pod name from `NAME`, else from the id.

Interception mode (metadata `INTERCEPTION_MODE`, as istiod reads it: `NONE`, `TPROXY`, anything else
`REDIRECT`, which is also what pilot-agent sends by default): a captured sidecar gets istiod's virtual listeners
on 15001/15006 (capture.py). Under `NONE` every listener binds its port: inbound listeners the proxy's first
address, outbound listeners localhost or the address in the metadata key `ZTDPU_OUTBOUND_BIND` (the role of a
Sidecar resource's `egress.bind`), so that several sidecars can share one network namespace, as in tests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

NODE_SEPARATOR = "~"
# istio pkg/model NodeTypes.
NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")
SIDECAR = "sidecar"

META_INSTANCE_IPS = "INSTANCE_IPS"
META_NAMESPACE = "NAMESPACE"
META_NAME = "NAME"
META_OUTBOUND_BIND = "ZTDPU_OUTBOUND_BIND"
META_INTERCEPTION_MODE = "INTERCEPTION_MODE"
# istio pkg/model TrafficInterceptionMode.
INTERCEPTION_NONE, INTERCEPTION_REDIRECT, INTERCEPTION_TPROXY = "NONE", "REDIRECT", "TPROXY"


class ProxyError(ValueError):
    """A node this control plane cannot build Envoy configuration for; the message says why."""


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Proxy:
    node_id: str  # as received
    type: str
    ip_addresses: tuple[str, ...]
    id: str  # "<pod>.<namespace>"
    dns_domain: str  # "<namespace>.svc.cluster.local"
    namespace: str
    pod_name: str
    # Only the string-valued metadata fields (as istiod's metadata parser keeps them), sorted.
    metadata: tuple[tuple[str, str], ...] = ()
    outbound_bind: str = ""
    interception: str = INTERCEPTION_REDIRECT

    @property
    def captured(self) -> bool:
        """iptables sends the pod's traffic to this proxy (REDIRECT or TPROXY), as opposed to NONE."""
        return self.interception != INTERCEPTION_NONE

    @property
    def ip(self) -> str:
        return self.ip_addresses[0]

    @property
    def localhost(self) -> str:
        """Where the application listens, seen from its sidecar: loopback of the proxy's address family."""
        return "::1" if ipaddress.ip_address(self.ip).version == 6 else "127.0.0.1"

    @property
    def outbound_address(self) -> str:
        return self.outbound_bind or self.localhost

    def meta(self, key: str, default: str = "") -> str:
        return dict(self.metadata).get(key, default)

    @classmethod
    def parse(cls, node_id: str, metadata: Mapping[str, Any] | None = None) -> Proxy:
        """ProxyError with a one-line reason for anything istiod would refuse (plus a bad outbound bind)."""
        meta = {k: v for k, v in (metadata or {}).items() if isinstance(v, str)}
        parts = node_id.split(NODE_SEPARATOR)
        if len(parts) != 4:
            raise ProxyError(f"node id {node_id!r} is not <type>~<ip>~<pod>.<namespace>~<domain> (4 parts)")
        kind, ip, ident, domain = parts
        if kind not in NODE_TYPES:
            raise ProxyError(f"node id {node_id!r}: invalid node type {kind!r} (valid: {', '.join(NODE_TYPES)})")
        instance_ips = tuple(a.strip() for a in meta.get(META_INSTANCE_IPS, "").split(",") if a.strip())
        if instance_ips and all(_is_ip(a) for a in instance_ips):
            addresses = instance_ips
        elif _is_ip(ip):
            addresses = (ip,)
        else:
            raise ProxyError(f"node id {node_id!r}: no valid IP address in the node id or INSTANCE_IPS")
        if not ident:
            raise ProxyError(f"node id {node_id!r}: the pod part is empty")
        namespace = meta.get(META_NAMESPACE, "")
        if not namespace:
            labels = domain.split(".")
            namespace = labels[0] if len(labels) > 1 else ""
        pod = meta.get(META_NAME, "")
        if not pod:
            suffix = f".{namespace}"
            pod = ident[: -len(suffix)] if namespace and ident.endswith(suffix) else ident
        bind = meta.get(META_OUTBOUND_BIND, "")
        if bind and not _is_ip(bind):
            raise ProxyError(f"node metadata {META_OUTBOUND_BIND}={bind!r} is not an IP address")
        mode = meta.get(META_INTERCEPTION_MODE, "")
        interception = mode if mode in (INTERCEPTION_NONE, INTERCEPTION_TPROXY) else INTERCEPTION_REDIRECT
        return cls(
            node_id=node_id,
            type=kind,
            ip_addresses=addresses,
            id=ident,
            dns_domain=domain,
            namespace=namespace,
            pod_name=pod,
            metadata=tuple(sorted(meta.items())),
            outbound_bind=bind,
            interception=interception,
        )

    @classmethod
    def from_node(cls, node: Any) -> Proxy:
        """From an `envoy.config.core.v3.Node` (the first request of a stream)."""
        metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        return cls.parse(node.id, metadata)
