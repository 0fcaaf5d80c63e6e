"""Captured sidecars (interception REDIRECT/TPROXY), the rules stated directly; the whole shape is pinned by the
goldens of tests/unit/test_build_envoy.py (cases `capture*`), and real Envoy validates it (test_envoy_validate).

PeerAuthentication resolution is table-tested against istiod's ComposePeerAuthentication rules.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from tests.support.envoy_cases import CASES, by_name, mesh_of, unpack
from ztcore.envoy.peerauth import EffectivePeerAuthentication, MtlsMode, compose
from ztcore.envoy.proxy import Proxy
from ztcore.envoy.sidecar import build_for_proxy
from ztcore.mesh.registry.objects import FrozenMap, ObjectMeta, PeerAuthentication
from ztcore.mesh.translate import TranslateOptions
from ztcore.xds import typeurls

HTTPBIN, SLEEP, MYSQL = CASES["capture"]


def listeners(built: dict[str, Any]) -> dict[str, Any]:
    return by_name(built, typeurls.LISTENER)


def chains_for_port(listener: Any, port: int) -> list[Any]:
    return [c for c in listener.filter_chains if c.filter_chain_match.destination_port.value == port]


@pytest.fixture(scope="module")
def httpbin() -> dict[str, Any]:
    return build_for_proxy(mesh_of("capture"), HTTPBIN.proxy)


# -- interception mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "REDIRECT"), ("REDIRECT", "REDIRECT"), ("TPROXY", "TPROXY"), ("NONE", "NONE"), ("bogus", "REDIRECT")],
)
def test_interception_mode_is_read_as_istiod_reads_it(value: str | None, expected: str) -> None:
    meta = {"NAMESPACE": "foo"} | ({"INTERCEPTION_MODE": value} if value is not None else {})
    proxy = Proxy.parse("sidecar~10.0.0.1~a.foo~foo.svc.cluster.local", meta)
    assert proxy.interception == expected
    assert proxy.captured is (expected != "NONE")


def test_a_captured_sidecar_binds_only_the_two_capture_ports(httpbin: dict[str, Any]) -> None:
    bound = {
        (x.address.socket_address.address, x.address.socket_address.port_value)
        for x in httpbin[typeurls.LISTENER]
        if not x.HasField("bind_to_port") or x.bind_to_port.value
    }  # fmt: skip
    assert bound == {("0.0.0.0", 15001), ("0.0.0.0", 15006)}  # noqa: S104
    names = set(listeners(httpbin))
    # HTTP ports: one wildcard listener each; TCP ports: per VIP, and per endpoint for the headless `peers`.
    expected = {"virtualInbound", "virtualOutbound", "10.96.0.21_9001", "10.96.0.33_3306", "10.244.3.5_4567"}
    assert names == expected | {"0.0.0.0_8000"}
    vo = listeners(httpbin)["virtualOutbound"]
    assert vo.use_original_dst.value is True
    assert [c.name for c in vo.filter_chains] == ["virtualOutbound-blackhole", "virtualOutbound-catchall-tcp"]
    assert vo.filter_chains[0].filter_chain_match.destination_port.value == 15001


def test_outbound_traffic_policy_decides_where_unknown_destinations_go() -> None:
    def catch_all(built: dict[str, Any]) -> tuple[str, str]:
        vo = listeners(built)["virtualOutbound"]
        tcp = unpack(vo.filter_chains[1].filters[0].typed_config, tcp_proxy_pb2.TcpProxy).cluster
        vhost = by_name(built, typeurls.ROUTE)["8000"].virtual_hosts[-1]
        return tcp, vhost.name

    allow = build_for_proxy(mesh_of("capture"), SLEEP.proxy)
    assert catch_all(allow) == ("PassthroughCluster", "allow_any")
    passthrough = by_name(allow, typeurls.CLUSTER)["PassthroughCluster"]
    assert passthrough.type == cluster_pb2.Cluster.ORIGINAL_DST
    registry_only = build_for_proxy(
        mesh_of("capture", TranslateOptions(outbound_traffic_policy="REGISTRY_ONLY")), SLEEP.proxy
    )
    assert catch_all(registry_only) == ("BlackHoleCluster", "block_all")
    block = by_name(registry_only, typeurls.ROUTE)["8000"].virtual_hosts[-1].routes[0]
    assert block.direct_response.status == 502


def test_tproxy_listeners_are_transparent() -> None:
    built = build_for_proxy(mesh_of("capture"), SLEEP.proxy)  # TPROXY in its metadata
    assert listeners(built)["virtualOutbound"].transparent.value is True
    assert listeners(built)["virtualInbound"].transparent.value is True


# -- inbound: PeerAuthentication per port -------------------------------------------------------------------


def test_inbound_chains_follow_each_ports_mtls_mode(httpbin: dict[str, Any]) -> None:
    vi = listeners(httpbin)["virtualInbound"]
    # 8000 inherits mesh STRICT: one chain, TLS terminated.
    [http] = chains_for_port(vi, 8000)
    assert (http.name, http.filter_chain_match.transport_protocol) == ("0.0.0.0_8000", "tls")
    assert http.HasField("transport_socket")
    # 9000 is PERMISSIVE at port level: mTLS (istio ALPNs), plaintext, and plain TLS passed through.
    tcp = chains_for_port(vi, 9000)
    assert [(c.filter_chain_match.transport_protocol, bool(c.filter_chain_match.application_protocols),
             c.HasField("transport_socket")) for c in tcp] == [("tls", True, True), ("raw_buffer", False, False),
                                                              ("tls", False, False)]  # fmt: skip
    # 7070 is declared by no service but has a port-level DISABLE: plaintext passthrough chains of its own.
    extra = chains_for_port(vi, 7070)
    assert {c.name for c in extra} == {"virtualInbound", "virtualInbound-catchall-http"}
    assert all(c.filter_chain_match.transport_protocol == "raw_buffer" for c in extra)
    # Everything else: the workload's STRICT, to the passthrough cluster; 15006 itself is blackholed.
    [blackhole] = chains_for_port(vi, 15006)
    assert blackhole.name == "virtualInbound-blackhole"


def test_inbound_clusters_reach_the_original_destination_from_the_passthrough_address(
    httpbin: dict[str, Any],
) -> None:
    app = by_name(httpbin, typeurls.CLUSTER)["inbound|8000||"]
    assert app.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert app.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    assert app.upstream_bind_config.source_address.address == "127.0.0.6"


# -- inbound: authorization -----------------------------------------------------------------------------------


def test_every_inbound_chain_carries_the_workloads_rbac(httpbin: dict[str, Any]) -> None:
    vi = listeners(httpbin)["virtualInbound"]
    for chain in vi.filter_chains:
        names = [f.name for f in chain.filters]
        if chain.name == "virtualInbound-blackhole":
            assert names == ["envoy.filters.network.tcp_proxy"]
        elif names == ["envoy.filters.network.http_connection_manager"]:
            manager = unpack(chain.filters[0].typed_config, hcm_pb2.HttpConnectionManager)
            http = [f.name for f in manager.http_filters]
            rbac, rest = ["envoy.filters.http.rbac"] * 2, ["grpc_stats", "fault", "cors", "router"]
            assert http == rbac + [f"envoy.filters.http.{name}" for name in rest]
            deny, allow = (unpack(f.typed_config, http_rbac_pb2.RBAC) for f in manager.http_filters[:2])
            assert (deny.rules.action, allow.rules.action) == (deny.rules.DENY, allow.rules.ALLOW)
            assert set(deny.rules.policies) == {"ns[foo]-policy[httpbin-deny-admin]-rule[0]"}
        else:
            assert names == ["envoy.filters.network.rbac", "envoy.filters.network.rbac",
                             "envoy.filters.network.tcp_proxy"], chain.name  # fmt: skip


def test_a_workload_no_policy_selects_gets_no_rbac_filter() -> None:
    built = build_for_proxy(mesh_of("capture"), MYSQL.proxy)
    vi = listeners(built)["virtualInbound"]
    assert all("rbac" not in f.name for c in vi.filter_chains for f in c.filters)


# -- PeerAuthentication resolution (istiod's ComposePeerAuthentication) ----------------------------------------


def pa(namespace: str, name: str, mode: str = "UNSET", selector: dict[str, str] | None = None,
       ports: dict[int, str] | None = None) -> PeerAuthentication:  # fmt: skip
    return PeerAuthentication(
        meta=ObjectMeta(name=name, namespace=namespace),
        selector=FrozenMap(selector) if selector is not None else None,
        mtls_mode=mode,
        port_level_mtls=FrozenMap(ports or {}),
    )


S, P, D = MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.DISABLE
APP = {"app": "web"}


@pytest.mark.parametrize(
    ("policies", "expected"),
    [
        ([], EffectivePeerAuthentication(P)),  # nothing: PERMISSIVE
        ([pa("istio-system", "default", "STRICT")], EffectivePeerAuthentication(S)),
        ([pa("istio-system", "default", "STRICT"), pa("apps", "ns", "DISABLE")], EffectivePeerAuthentication(D)),
        ([pa("istio-system", "default", "STRICT"), pa("apps", "ns")], EffectivePeerAuthentication(S)),  # UNSET inherits
        ([pa("apps", "ns", "STRICT"), pa("apps", "w", "PERMISSIVE", APP)], EffectivePeerAuthentication(P)),
        ([pa("apps", "w", "PERMISSIVE", {"app": "other"})], EffectivePeerAuthentication(P)),  # not selected
        ([pa("other", "ns", "STRICT")], EffectivePeerAuthentication(P)),  # another namespace
        ([pa("apps", "ns", "STRICT", {})], EffectivePeerAuthentication(S)),  # empty selector: namespace-wide
        # two at one level: the first by name (istiod: the oldest)
        ([pa("apps", "b", "DISABLE"), pa("apps", "a", "STRICT")], EffectivePeerAuthentication(S)),
        # port-level modes only from the workload policy; UNSET ports take the workload's mode
        (
            [pa("apps", "ns", "STRICT"), pa("apps", "w", "UNSET", APP, {8080: "DISABLE", 9090: "UNSET"})],
            EffectivePeerAuthentication(S, FrozenMap({8080: D, 9090: S})),
        ),
        ([pa("apps", "ns", "STRICT", None, {8080: "DISABLE"})], EffectivePeerAuthentication(S)),
        # a selector in the root namespace is not a workload policy anywhere else
        ([pa("istio-system", "sel", "DISABLE", APP)], EffectivePeerAuthentication(P)),
    ],
)
def test_peer_authentication_composition(
    policies: list[PeerAuthentication], expected: EffectivePeerAuthentication
) -> None:
    assert compose(policies, "apps", FrozenMap(APP), "istio-system") == expected
    assert expected.for_port(1) == expected.mode
