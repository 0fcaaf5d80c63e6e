"""`ztctl x authz check` for a pod with an Envoy sidecar: what that Envoy would do with the connection.

The answer comes from the configuration ztd generates for the sidecar (`build_for_proxy`, captured as under
Istio's default interception): the `virtualInbound` filter chain Envoy would pick for the connection (by
destination port, then TLS or plaintext, then ALPN; none: Envoy closes it, e.g. a plaintext caller under
STRICT), then that chain's RBAC filters evaluated the way Envoy runs them (`rbac_eval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from ztcore.envoy.common import HCM_FILTER, VIRTUAL_INBOUND
from ztcore.envoy.proxy import Proxy
from ztcore.envoy.rbac_eval import Request, evaluate_http, evaluate_tcp
from ztcore.envoy.sidecar import build_for_proxy, inbound_authz
from ztcore.mesh.registry.objects import Pod
from ztcore.mesh.translate import Translation
from ztcore.xds import typeurls

# What marks a pod as running an injected sidecar (the injector sets both).
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def has_sidecar(pod: Pod) -> bool:
    return SIDECAR_STATUS_ANNOTATION in pod.meta.annotations or pod.labels.get(TLS_MODE_LABEL) == "istio"


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str = "/"
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SidecarDecision:
    allowed: bool
    reason: str
    policy: str | None  # the Envoy RBAC policy that decided, if one did
    chain: str  # the filter chain Envoy picks ("" if none)
    http: bool  # the chain speaks HTTP (so --method/--path/--header matter)
    logged: tuple[str, ...] = ()
    dry_run: tuple[str, ...] = ()
    policy_notes: tuple[str, ...] = ()  # "ns/name: ..." where the sidecar enforces a policy other than written


Chain: TypeAlias = listener_components_pb2.FilterChain


def _narrow(pool: list[Chain], wanted: object, get: Callable[[Chain], object]) -> list[Chain]:
    exact = [c for c in pool if get(c) == wanted]
    return exact or [c for c in pool if not get(c)]


def _pick(chains: Sequence[Chain], port: int, transport: str, alpn: str) -> Chain | None:
    """Envoy's filter chain match for the criteria ztd's chains use: at each step the most specific value
    present wins over chains that leave it unset, and a connection no chain accepts is closed."""
    pool = _narrow(list(chains), port, lambda c: c.filter_chain_match.destination_port.value)
    pool = _narrow(pool, transport, lambda c: c.filter_chain_match.transport_protocol)
    exact = [c for c in pool if alpn and alpn in c.filter_chain_match.application_protocols]
    pool = exact or [c for c in pool if not c.filter_chain_match.application_protocols]
    return pool[0] if pool else None


def check_sidecar(
    translation: Translation,
    pod: Pod,
    port: int,
    principal: str | None,
    source_ip: str,
    http: HttpRequest | None,
) -> SidecarDecision:
    """`principal`: the caller's SPIFFE URI over mTLS, None for a plaintext caller."""
    ip = pod.pod_ips[0] if pod.pod_ips else ""
    proxy = Proxy.parse(
        f"sidecar~{ip}~{pod.name}.{pod.namespace}~{pod.namespace}.svc.cluster.local",
        {"NAMESPACE": pod.namespace, "NAME": pod.name},
    )
    listeners = build_for_proxy(translation, proxy)[typeurls.LISTENER]
    inbound = next(x for x in listeners if isinstance(x, listener_pb2.Listener) and x.name == VIRTUAL_INBOUND)
    notes = tuple(f"{key}: {text}" for key, text in inbound_authz(translation, pod.namespace, pod.labels).notes)
    tls = principal is not None
    # What the caller's side offers: an in-mesh client's ALPN over mTLS, a plain HTTP client's otherwise.
    alpn = ("istio-http/1.1" if http else "istio") if tls else ("http/1.1" if http else "")
    chain = _pick(inbound.filter_chains, port, "tls" if tls else "raw_buffer", alpn)
    how = "mTLS" if tls else "plaintext"
    if chain is None:
        return SidecarDecision(
            False, f"no filter chain accepts a {how} connection to port {port}: Envoy closes it", None, "", False
        )
    request = Request(
        source_ip or "0.0.0.0",  # noqa: S104 -- "unknown": matches no ipBlocks
        ip,
        port,
        principal,
        method=http.method if http else None,
        path=http.path if http else "/",
        host=http.host if http else "",
        headers=http.headers if http else (),
    )
    manager = next((f for f in chain.filters if f.name == HCM_FILTER), None)
    if manager is not None:
        hcm = hcm_pb2.HttpConnectionManager()
        manager.typed_config.Unpack(hcm)
        if request.method is None:
            request = Request(request.source_ip, ip, port, principal, method="GET", path="/")
        decision = evaluate_http(hcm.http_filters, request)
    else:
        decision = evaluate_tcp(chain.filters, request)
    return SidecarDecision(
        decision.allowed,
        decision.reason,
        decision.policy,
        chain.name,
        manager is not None,
        decision.logged,
        decision.shadow,
        notes,
    )
