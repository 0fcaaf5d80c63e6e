"""Envoy sidecar configuration builders: golden files plus the rules they must keep.

Goldens: tests/golden/envoy/<case>/<namespace>.<pod>.yaml is what `build_for_proxy` gives that sidecar,
keyed by type URL, each resource in proto-JSON (`MessageToDict`); compared as data. The case's mesh is
examples/mesh/ or tests/golden/envoy/<case>.mesh.yaml. `UPDATE_GOLDEN=1` rewrites them; review the diff.
Real Envoy checks the same resources in tests/e2e/test_envoy_validate.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import json_format, message

from tests.support.envoy_cases import CASES, GOLDEN, ROOT, Sidecar, by_name, mesh_of, unpack
from ztcore.envoy import ProxyError, load_generator, resource_name
from ztcore.envoy.bootstrap import inline
from ztcore.envoy.proxy import Proxy
from ztcore.envoy.sidecar import SharedConfig, build_for_proxy, to_resources
from ztcore.mesh.translate import TranslateOptions, Translation
from ztcore.xds import typeurls

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

MESSAGE_TYPES: dict[str, type[message.Message]] = {
    typeurls.CLUSTER: cluster_pb2.Cluster,
    typeurls.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    typeurls.LISTENER: listener_pb2.Listener,
    typeurls.ROUTE: route_pb2.RouteConfiguration,
}


def render(built: Mapping[str, Sequence[message.Message]]) -> dict[str, list[dict[str, Any]]]:
    # Through JSON: MessageToDict leaves OrderedDicts inside Any fields, which YAML will not write.
    return {t: [json.loads(json_format.MessageToJson(m)) for m in msgs] for t, msgs in built.items()}


def upstream_sans(cluster: Any) -> list[str]:
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    matchers = tls.common_tls_context.combined_validation_context.default_validation_context
    assert all(m.san_type == common_pb2.SubjectAltNameMatcher.URI for m in matchers.match_typed_subject_alt_names)
    return [m.matcher.exact for m in matchers.match_typed_subject_alt_names]


def check_consistent(built: Mapping[str, Sequence[Any]]) -> None:
    """What Envoy would otherwise leave warming or reject: every reference resolves, names are unique."""
    assert set(built) == {typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE}
    for type_url, msgs in built.items():
        names = [resource_name(m) for m in msgs]
        assert len(names) == len(set(names)), f"duplicate {type_url} names"
        assert names == sorted(names)
    clusters = by_name(built, typeurls.CLUSTER)
    eds = {c.eds_cluster_config.service_name for c in clusters.values() if c.type == cluster_pb2.Cluster.EDS}
    assert eds == set(by_name(built, typeurls.ENDPOINT))
    routes = set(by_name(built, typeurls.ROUTE))
    referenced_routes = set()
    addresses = set()
    for listener in built[typeurls.LISTENER]:
        sa = listener.address.socket_address
        assert (sa.address, sa.port_value) not in addresses, f"two listeners on {sa.address}:{sa.port_value}"
        addresses.add((sa.address, sa.port_value))
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.name == "envoy.filters.network.rbac":
                    continue
                if f.name == "envoy.filters.network.tcp_proxy":
                    assert unpack(f.typed_config, tcp_proxy_pb2.TcpProxy).cluster in clusters
                    continue
                manager = unpack(f.typed_config, hcm_pb2.HttpConnectionManager)
                if manager.HasField("rds"):
                    referenced_routes.add(manager.rds.route_config_name)
                else:
                    for vh in manager.route_config.virtual_hosts:
                        assert all(r.route.cluster in clusters for r in vh.routes if r.HasField("route"))
    assert referenced_routes == routes
    for route in built[typeurls.ROUTE]:
        domains = [d for vh in route.virtual_hosts for d in vh.domains]
        assert len(domains) == len(set(domains)), f"route {route.name} repeats a domain"
        assert all(r.route.cluster in clusters for vh in route.virtual_hosts for r in vh.routes if r.HasField("route"))


# -- goldens ----------------------------------------------------------------------------------------------


def _golden_params() -> list[Any]:
    return [pytest.param(case, s, id=f"{case}/{s.golden}") for case, sidecars in CASES.items() for s in sidecars]


@pytest.mark.parametrize(("case", "sidecar"), _golden_params())
def test_golden(case: str, sidecar: Sidecar) -> None:
    built = build_for_proxy(mesh_of(case), sidecar.proxy)
    check_consistent(built)
    path = GOLDEN / case / f"{sidecar.golden}.yaml"
    rendered = render(built)
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Generated by tests/unit/test_build_envoy.py (UPDATE_GOLDEN=1) for {sidecar.node_id}\n"
        path.write_text(header + yaml.safe_dump(rendered, sort_keys=False, width=120))
        return
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing; run with UPDATE_GOLDEN=1 to create it")
    expected = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    assert rendered == expected, f"Envoy config differs from {path.relative_to(ROOT)}"


def test_every_golden_file_is_a_case_and_parses() -> None:
    """No stale goldens, and each holds valid messages (catches hand edits)."""
    expected = {GOLDEN / case / f"{s.golden}.yaml" for case, sidecars in CASES.items() for s in sidecars}
    assert set(GOLDEN.glob("*/*.yaml")) == expected
    for path in expected:
        for type_url, resources in yaml.load(path.read_text(), Loader=yaml.CSafeLoader).items():
            for resource in resources:
                json_format.ParseDict(resource, MESSAGE_TYPES[type_url]())


# -- the rules, stated directly ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def examples() -> Translation:
    return mesh_of("examples-mesh")


def test_inbound_terminates_mtls_with_sds_and_requires_a_mesh_client_cert(examples: Translation) -> None:
    built = build_for_proxy(examples, CASES["examples-mesh"][3].proxy)  # ledger-1
    listener = by_name(built, typeurls.LISTENER)["10.244.1.20_9000"]
    assert listener.address.socket_address.address == "10.244.1.20"
    chain = listener.filter_chains[0]
    tls = unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert tls.require_client_certificate.value is True
    ctx = tls.common_tls_context
    assert [s.name for s in ctx.tls_certificate_sds_secret_configs] == ["default"]
    validation = ctx.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    [san] = validation.default_validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.prefix) == (common_pb2.SubjectAltNameMatcher.URI, "spiffe://cluster.local/")
    # The SdsSecretConfig istiod writes (pkg/model/authentication.go).
    sds = ctx.tls_certificate_sds_secret_configs[0].sds_config
    assert sds.initial_fetch_timeout.ToSeconds() == 0 and sds.HasField("initial_fetch_timeout")
    assert sds.resource_api_version == config_source_pb2.ApiVersion.V3
    api = sds.api_config_source
    assert (api.api_type, api.set_node_on_first_message_only, api.transport_api_version) == (
        config_source_pb2.ApiConfigSource.GRPC,
        True,
        config_source_pb2.ApiVersion.V3,
    )
    assert [g.envoy_grpc.cluster_name for g in api.grpc_services] == ["sds-grpc"]
    # TCP port: tcp_proxy to the app on loopback.
    proxy = unpack(chain.filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert proxy.cluster == "inbound|9000||"
    app = by_name(built, typeurls.CLUSTER)["inbound|9000||"]
    assert app.type == cluster_pb2.Cluster.STATIC
    ep = app.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (ep.address, ep.port_value) == ("127.0.0.1", 9000)


def test_inbound_http_forwards_the_callers_identity(examples: Translation) -> None:
    built = build_for_proxy(examples, CASES["examples-mesh"][0].proxy)  # frontend-1: service port 80 -> 8080
    listener = by_name(built, typeurls.LISTENER)["10.244.1.10_8080"]
    manager = unpack(listener.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert manager.forward_client_cert_details == hcm_pb2.HttpConnectionManager.APPEND_FORWARD
    assert manager.set_current_client_cert_details.uri is True
    assert manager.route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|8080||"
    tls = unpack(listener.filter_chains[0].transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    assert list(tls.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]


def test_outbound_clusters_check_the_exact_identities_behind_the_service(examples: Translation) -> None:
    built = build_for_proxy(examples, CASES["examples-mesh"][1].proxy)  # cart-1 calling the ledger
    cluster = by_name(built, typeurls.CLUSTER)["outbound|9000||ledger.payments.svc.cluster.local"]
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.service_name == cluster.name
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    tls = unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)
    assert tls.sni == "outbound_.9000_._.ledger.payments.svc.cluster.local"
    ctx = tls.common_tls_context
    assert [s.name for s in ctx.tls_certificate_sds_secret_configs] == ["default"]
    assert ctx.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
    sans = ctx.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    assert [(s.san_type, s.matcher.exact) for s in sans] == [
        (common_pb2.SubjectAltNameMatcher.URI, "spiffe://cluster.local/ns/payments/sa/ledger")
    ]
    cla = by_name(built, typeurls.ENDPOINT)["outbound|9000||ledger.payments.svc.cluster.local"]
    addrs = [e.endpoint.address.socket_address for e in cla.endpoints[0].lb_endpoints]
    assert [(a.address, a.port_value) for a in addrs] == [("10.244.1.20", 9000), ("10.244.2.20", 9000)]
    # A TCP port: the listener proxies to the cluster; no route.
    listener = by_name(built, typeurls.LISTENER)["127.0.0.1_9000"]
    assert unpack(listener.filter_chains[0].filters[0].typed_config, tcp_proxy_pb2.TcpProxy).cluster == cluster.name
    assert "9000" not in by_name(built, typeurls.ROUTE)


def test_outbound_http_routes_by_host_with_istio_domains(examples: Translation) -> None:
    debug = build_for_proxy(examples, CASES["examples-mesh"][2].proxy)
    ledger = build_for_proxy(examples, CASES["examples-mesh"][3].proxy)
    [vhost] = by_name(debug, typeurls.ROUTE)["80"].virtual_hosts
    assert vhost.name == "frontend.shop.svc.cluster.local:80"
    assert list(vhost.domains) == [
        "frontend.shop.svc.cluster.local",
        "frontend.shop.svc.cluster.local:80",
        "frontend.shop.svc",
        "frontend.shop.svc:80",
        "frontend.shop",
        "frontend.shop:80",
        "frontend",  # same namespace only
        "frontend:80",
        "10.96.10.1",
        "10.96.10.1:80",
    ]
    assert vhost.routes[0].route.cluster == "outbound|80||frontend.shop.svc.cluster.local"
    assert "frontend" not in by_name(ledger, typeurls.ROUTE)["80"].virtual_hosts[0].domains
    listener = by_name(debug, typeurls.LISTENER)["127.0.0.1_80"]
    manager = unpack(listener.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert manager.rds.route_config_name == "80" and manager.rds.config_source.HasField("ads")
    # No inbound listener: the debug pod backs no service.
    assert all(n.startswith("127.0.0.1_") for n in by_name(debug, typeurls.LISTENER))


def test_port_conflicts_and_named_ports() -> None:
    mesh = mesh_of("ports")
    web1, web2, db1, v6, api, ghost = (build_for_proxy(mesh, s.proxy) for s in CASES["ports"])
    # web's "http" target port is per pod: 8080 on web-1, 8081 on web-2; web-3 is unhealthy.
    cla = by_name(web1, typeurls.ENDPOINT)["outbound|80||web.apps.svc.cluster.local"]
    addrs = [e.endpoint.address.socket_address for e in cla.endpoints[0].lb_endpoints]
    assert [(a.address, a.port_value) for a in addrs] == [("10.1.0.1", 8080), ("10.1.0.2", 8081)]
    assert "10.1.0.1_8080" in by_name(web1, typeurls.LISTENER)
    assert "10.1.0.2_8081" in by_name(web2, typeurls.LISTENER)
    # web-3 (unhealthy) serves nothing yet, but its identity is accepted already.
    assert upstream_sans(by_name(web1, typeurls.CLUSTER)["outbound|80||web.apps.svc.cluster.local"]) == [
        "spiffe://cluster.local/ns/apps/sa/web",
        "spiffe://cluster.local/ns/apps/sa/web-canary",
    ]
    # gRPC port: HTTP/2 upstream.
    grpc = by_name(web1, typeurls.CLUSTER)["outbound|9090||web.apps.svc.cluster.local"]
    assert grpc.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].value
    # Port 80: two HTTP services share RDS "80"; the TCP service there gets no listener (but a cluster).
    assert [vh.name for vh in by_name(web1, typeurls.ROUTE)["80"].virtual_hosts] == [
        "api.other.svc.cluster.local:80",
        "web.apps.svc.cluster.local:80",
    ]
    assert "outbound|80||zz-legacy.other.svc.cluster.local" in by_name(web1, typeurls.CLUSTER)
    # Port 5432: both TCP; the first by hostname (db.apps) owns the listener.
    listener = by_name(web1, typeurls.LISTENER)["127.0.0.1_5432"]
    tcp = unpack(listener.filter_chains[0].filters[0].typed_config, tcp_proxy_pb2.TcpProxy)
    assert tcp.cluster == "outbound|5432||db.apps.svc.cluster.local"
    # db-1 serves 5432 and 7000 itself; its outbound 5432 stays on loopback, its inbound on the pod IP.
    assert {"10.1.0.3_5432", "10.1.0.3_7000", "127.0.0.1_5432"} <= set(by_name(db1, typeurls.LISTENER))
    # An opaque (non-pod) endpoint has no identity: not an endpoint of an mTLS cluster.
    assert not by_name(web1, typeurls.ENDPOINT)["outbound|8443||external.apps.svc.cluster.local"].endpoints
    # web-2 binds its outbound listeners where its metadata says; its address comes from INSTANCE_IPS.
    assert {n for n in by_name(web2, typeurls.LISTENER) if not n.startswith("10.1.0.2_")} == {
        "127.0.1.2_80",
        "127.0.1.2_5432",
        "127.0.1.2_7000",
        "127.0.1.2_8000",
        "127.0.1.2_8443",
        "127.0.1.2_9090",
    }
    # IPv6: inbound on the pod's v6 address, the app on ::1, outbound on ::1.
    assert {"fd00::5_8000", "::1_80"} <= set(by_name(v6, typeurls.LISTENER))
    app = by_name(v6, typeurls.CLUSTER)["inbound|8000||"].load_assignment.endpoints[0].lb_endpoints[0]
    assert app.endpoint.address.socket_address.address == "::1"
    # api-1 in "other": short names are those of its namespace.
    domains = [d for vh in by_name(api, typeurls.ROUTE)["80"].virtual_hosts for d in vh.domains]
    assert "api" in domains and "web" not in domains and "web.apps" in domains
    # Not in the registry: every outbound resource, no inbound one.
    outbound = {n for n in by_name(web1, typeurls.CLUSTER) if n.startswith("outbound|")}
    assert set(by_name(ghost, typeurls.CLUSTER)) == outbound
    assert all(n.startswith("127.0.0.1_") for n in by_name(ghost, typeurls.LISTENER))


def test_trust_domain_comes_from_the_mesh_options() -> None:
    mesh = mesh_of("examples-mesh", TranslateOptions(trust_domain="example.org"))
    built = build_for_proxy(mesh, CASES["examples-mesh"][1].proxy)
    ledger = by_name(built, typeurls.CLUSTER)["outbound|9000||ledger.payments.svc.cluster.local"]
    assert upstream_sans(ledger) == ["spiffe://example.org/ns/payments/sa/ledger"]
    inbound = by_name(built, typeurls.LISTENER)["10.244.1.11_8080"]
    down = unpack(inbound.filter_chains[0].transport_socket.typed_config, tls_pb2.DownstreamTlsContext)
    validation = down.common_tls_context.combined_validation_context.default_validation_context
    assert validation.match_typed_subject_alt_names[0].matcher.prefix == "spiffe://example.org/"


def test_output_is_deterministic_and_the_shared_part_is_only_a_shortcut(examples: Translation) -> None:
    sidecar = CASES["examples-mesh"][0]
    first = to_resources(build_for_proxy(examples, sidecar.proxy))
    again = to_resources(build_for_proxy(mesh_of("examples-mesh"), sidecar.proxy))
    indexed = to_resources(build_for_proxy(examples, sidecar.proxy, shared=SharedConfig.of(examples)))
    for other in (again, indexed):
        assert {t: [(r.name, r.version) for r in rs] for t, rs in first.items()} == {
            t: [(r.name, r.version) for r in rs] for t, rs in other.items()
        }


def test_the_ads_server_loads_this_builder() -> None:
    assert load_generator() is build_for_proxy


def test_static_inlining_keeps_every_route_and_endpoint(examples: Translation) -> None:
    built = build_for_proxy(examples, CASES["examples-mesh"][1].proxy)
    listeners, clusters = inline(built)
    assert all(c.type == cluster_pb2.Cluster.STATIC for c in clusters)
    ledger = next(c for c in clusters if c.name == "outbound|9000||ledger.payments.svc.cluster.local")
    assert len(ledger.load_assignment.endpoints[0].lb_endpoints) == 2
    assert ledger.HasField("transport_socket")  # the mTLS settings survive
    http = next(x for x in listeners if x.name == "127.0.0.1_80")
    manager = unpack(http.filter_chains[0].filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    assert manager.route_config.name == "80" and not manager.HasField("rds")


# -- node parsing -------------------------------------------------------------------------------------------


def test_node_parsing_follows_istiod() -> None:
    p = Proxy.parse("sidecar~10.0.0.1~web-1.apps~apps.svc.cluster.local")
    assert (p.type, p.ip, p.pod_name, p.namespace, p.outbound_address) == (
        "sidecar",
        "10.0.0.1",
        "web-1",
        "apps",
        "127.0.0.1",
    )
    assert p.node_id == "sidecar~10.0.0.1~web-1.apps~apps.svc.cluster.local"
    p = Proxy.parse(
        "sidecar~10.0.0.1~whatever~cluster.local",
        {"NAMESPACE": "ns", "NAME": "pod-x", "INSTANCE_IPS": "10.9.0.1,fd00::1", "LABELS": {"app": "x"}},
    )
    assert (p.ip_addresses, p.pod_name, p.namespace) == (("10.9.0.1", "fd00::1"), "pod-x", "ns")
    assert dict(p.metadata) == {"NAMESPACE": "ns", "NAME": "pod-x", "INSTANCE_IPS": "10.9.0.1,fd00::1"}
    # An invalid INSTANCE_IPS entry falls back to the id's address, as istiod does.
    assert Proxy.parse("sidecar~10.0.0.1~a.b~b.svc", {"INSTANCE_IPS": "10.0.0.2,nope"}).ip_addresses == ("10.0.0.1",)


@pytest.mark.parametrize(
    ("node_id", "metadata", "reason"),
    [
        ("sidecar~10.0.0.1~web-1.apps", {}, "4 parts"),
        ("gateway~10.0.0.1~web-1.apps~apps.svc.cluster.local", {}, "invalid node type 'gateway'"),
        ("sidecar~not-an-ip~web-1.apps~apps.svc.cluster.local", {}, "no valid IP address"),
        ("sidecar~10.0.0.1~~apps.svc.cluster.local", {}, "the pod part is empty"),
        ("sidecar~10.0.0.1~web-1.apps~apps.svc", {"ZTDPU_OUTBOUND_BIND": "localhost"}, "is not an IP address"),
    ],
)
def test_bad_nodes_are_refused_with_a_reason(node_id: str, metadata: dict[str, str], reason: str) -> None:
    with pytest.raises(ProxyError, match=reason):
        Proxy.parse(node_id, metadata)


def test_only_sidecars_get_envoy_config(examples: Translation) -> None:
    router = Proxy.parse("router~10.0.0.1~gw-1.shop~shop.svc.cluster.local")
    with pytest.raises(ProxyError, match="is a router; only sidecars"):
        build_for_proxy(examples, router)


def test_from_node_reads_the_struct_metadata() -> None:
    from ztcore.envoy.bootstrap import node

    pb = node("sidecar~10.0.0.1~x.y~y.svc.cluster.local", {"NAMESPACE": "y", "ZTDPU_OUTBOUND_BIND": "127.0.3.3"})
    p = Proxy.from_node(pb)
    assert (p.namespace, p.outbound_address) == ("y", "127.0.3.3")
    assert pb.cluster == "x.y"


@pytest.mark.parametrize("bind", ["10.1.0.3", "0.0.0.0"])  # noqa: S104 - a config value, nothing binds
def test_an_outbound_listener_never_takes_an_inbound_socket(bind: str) -> None:
    db1 = Sidecar("db-1", "apps", "10.1.0.3", {"ZTDPU_OUTBOUND_BIND": bind})
    built = build_for_proxy(mesh_of("ports"), db1.proxy)
    check_consistent(built)
    names = set(by_name(built, typeurls.LISTENER))
    assert {"10.1.0.3_5432", "10.1.0.3_7000"} <= names  # inbound
    assert {f"{bind}_80", f"{bind}_8000", f"{bind}_8443", f"{bind}_9090"} <= names
    assert f"{bind}_5432" not in names or bind == "10.1.0.3"  # same name as the inbound one when bind = pod IP
    assert len([n for n in names if n.endswith("_5432")]) == 1
    assert len([n for n in names if n.endswith("_7000")]) == 1
