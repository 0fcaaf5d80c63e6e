"""The publish side of Envoy configuration (xds_server.envoy_configs) and the ADS source that only binds streams
to scopes and asks it for their resources (xds_server.server.AdsSource)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import message

from xds_server.envoy_configs import ENVOY_TYPES, EnvoyConfigs, pack_envoy
from xds_server.publish import Publisher
from xds_server.server import AdsSource
from ztcore.envoy import Proxy, ProxyError
from ztcore.mesh.registry.parse import parse_text
from ztcore.mesh.registry.store import Registry
from ztcore.mesh.translate import TranslateOptions, Translation
from ztcore.xds import typeurls
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.grpc_adapter import SourceError
from ztcore.xds.resources import Resource

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}
"""
SIDECAR = "sidecar~10.0.0.1~a.shop~shop.svc.cluster.local"


def objects(*services: str) -> list[object]:
    text = "---".join(SERVICE.format(name=name, ip=f"10.96.0.{i + 1}") for i, name in enumerate(services))
    result = parse_text(text, "mesh.yaml")
    assert not result.errors, result.errors
    return list(result.objects)


@dataclass
class Generator:
    """A generator as ztcore.envoy describes one: a cluster and its endpoints per service, one listener per
    proxy. A service named `boom` makes it fail (a generator bug); namespace `refused` is a ProxyError."""

    threads: set[str] = field(default_factory=set)
    calls: int = 0

    def __call__(self, translation: Translation, proxy: Proxy) -> Mapping[str, Sequence[message.Message]]:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        if proxy.namespace == "refused":
            raise ProxyError(f"proxy {proxy.id} is not served here")
        hosts = [s.hostname for s in translation.services]
        if any(h.startswith("boom.") for h in hosts):
            raise RuntimeError("the generator broke")
        return {
            typeurls.LISTENER: [listener_pb2.Listener(name=f"virtualOutbound-{proxy.id}")],
            typeurls.CLUSTER: [cluster_pb2.Cluster(name=f"outbound|80||{h}") for h in hosts],
            typeurls.ENDPOINT: [endpoint_pb2.ClusterLoadAssignment(cluster_name=f"outbound|80||{h}") for h in hosts],
        }


class RecordingCache(SnapshotCache):
    """Remembers the order in which types are set, to check make-before-break."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[tuple[str, str]] = []

    def set_resources(
        self, type_url: str, resources: Iterable[Resource], *, scope: str = "", origin: float | None = None
    ) -> frozenset[str]:
        self.order.append((scope, type_url))
        return super().set_resources(type_url, resources, scope=scope, origin=origin)


async def started(*services: str) -> tuple[EnvoyConfigs, Publisher, RecordingCache, Generator]:
    cache = RecordingCache()
    publisher = Publisher(Registry(objects(*services)), cache, options=TranslateOptions())
    generator = Generator()
    configs = EnvoyConfigs(cache, publisher, generator)
    await publisher.publish(publisher.registry.current)
    return configs, publisher, cache, generator


def names(cache: SnapshotCache, type_url: str, scope: str) -> list[str]:
    return sorted(cache.resources(type_url, scope))


# -- EnvoyConfigs --------------------------------------------------------------------------------------------


async def test_connect_builds_off_the_loop_and_installs_clusters_before_listeners() -> None:
    configs, _, cache, generator = await started("a")
    assert generator.calls == 0  # nobody connected: the publish built nothing
    cache.order.clear()
    await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    assert names(cache, typeurls.CLUSTER, "envoy/1") == ["outbound|80||a.shop.svc.cluster.local"]
    assert names(cache, typeurls.ENDPOINT, "envoy/1") == ["outbound|80||a.shop.svc.cluster.local"]
    assert names(cache, typeurls.LISTENER, "envoy/1") == ["virtualOutbound-a.shop"]
    assert threading.main_thread().name not in generator.threads
    # Routes were never set (empty): no empty entry is left behind; the order is make-before-break.
    assert cache.order == [("envoy/1", t) for t in (typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER)]
    assert list(configs.connected) == ["envoy/1"]
    assert cache.resources(typeurls.CLUSTER) == {}  # nothing leaks into the global scope


async def test_a_publish_rebuilds_every_connected_proxy() -> None:
    configs, publisher, cache, _ = await started("a")
    await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    await configs.connect("envoy/2", Proxy.parse("router~10.0.0.9~gw.shop~shop.svc.cluster.local"))
    publisher.registry.replace(objects("a", "b"))
    await publisher.publish(publisher.registry.current)
    for scope in ("envoy/1", "envoy/2"):
        assert names(cache, typeurls.CLUSTER, scope) == [
            "outbound|80||a.shop.svc.cluster.local",
            "outbound|80||b.shop.svc.cluster.local",
        ]
    assert names(cache, typeurls.LISTENER, "envoy/2") == ["virtualOutbound-gw.shop"]


async def test_a_failing_rebuild_keeps_the_last_good_configuration(caplog: pytest.LogCaptureFixture) -> None:
    configs, publisher, cache, _ = await started("a")
    await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    before = dict(cache.resources(typeurls.CLUSTER, "envoy/1"))
    publisher.registry.replace(objects("a", "boom"))
    await publisher.publish(publisher.registry.current)  # the failure is logged, not raised into the publisher
    assert f"rebuilding Envoy configuration for {SIDECAR} failed; keeping the last one" in caplog.text
    assert dict(cache.resources(typeurls.CLUSTER, "envoy/1")) == before
    assert names(cache, typeurls.LISTENER, "envoy/1") == ["virtualOutbound-a.shop"]
    # The next good push is installed again.
    publisher.registry.replace(objects("b"))
    await publisher.publish(publisher.registry.current)
    assert names(cache, typeurls.CLUSTER, "envoy/1") == ["outbound|80||b.shop.svc.cluster.local"]


async def test_disconnect_drops_the_scope_and_stops_rebuilding_it() -> None:
    configs, publisher, cache, generator = await started("a")
    await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    configs.disconnect("envoy/1")
    assert configs.connected == {}
    for type_url in ENVOY_TYPES:
        assert cache.resources(type_url, "envoy/1") == {}
    calls = generator.calls
    publisher.registry.replace(objects("a", "b"))
    await publisher.publish(publisher.registry.current)
    assert generator.calls == calls  # nobody connected: nothing built
    assert cache.resources(typeurls.CLUSTER, "envoy/1") == {}
    configs.disconnect("envoy/1")  # a second disconnect is harmless


async def test_a_refused_or_broken_build_installs_nothing() -> None:
    configs, _, cache, _ = await started("boom")
    cache.order.clear()  # the publish's own WDS types
    with pytest.raises(RuntimeError, match="the generator broke"):
        await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    with pytest.raises(ProxyError, match="not served here"):
        await configs.connect("envoy/2", Proxy.parse("sidecar~10.0.0.1~a.refused~refused.svc.cluster.local"))
    assert configs.connected == {}
    assert cache.order == []


async def test_bad_scopes_are_refused() -> None:
    configs, _, _, _ = await started("a")
    with pytest.raises(ValueError, match="global scope"):
        await configs.connect("", Proxy.parse(SIDECAR))
    await configs.connect("envoy/1", Proxy.parse(SIDECAR))
    with pytest.raises(ValueError, match="already bound"):
        await configs.connect("envoy/1", Proxy.parse(SIDECAR))


def test_pack_envoy_refuses_what_a_client_would_nack() -> None:
    with pytest.raises(ValueError, match="duplicate CDS names"):
        pack_envoy({typeurls.CLUSTER: [cluster_pb2.Cluster(name="x"), cluster_pb2.Cluster(name="x")]})
    with pytest.raises(ValueError, match="returned as"):
        pack_envoy({typeurls.CLUSTER: [listener_pb2.Listener(name="x")]})
    with pytest.raises(ValueError, match="unknown type"):
        pack_envoy({"type.googleapis.com/nope": []})
    assert pack_envoy({}) == {t: () for t in ENVOY_TYPES}


# -- AdsSource: binds and asks, never builds ------------------------------------------------------------------


@dataclass
class FakeConfigs:
    fail: Exception | None = None
    events: list[tuple[str, str]] = field(default_factory=list)

    async def connect(self, scope: str, proxy: Proxy) -> None:
        if self.fail is not None:
            raise self.fail
        self.events.append(("connect", scope))

    def disconnect(self, scope: str) -> None:
        self.events.append(("disconnect", scope))


async def test_the_source_binds_envoys_to_scopes_of_their_own_and_releases_them() -> None:
    configs = FakeConfigs()
    source = AdsSource(configs)
    envoy = await source.open_stream(base_pb2.Node(id=SIDECAR), "ipv4:127.0.0.1:1")
    ztunnel = await source.open_stream(
        base_pb2.Node(id="ztunnel~10.0.0.5~zt.istio-system~istio-system.svc.cluster.local"), "ipv4:127.0.0.1:2"
    )
    assert envoy.scope == "envoy/1" and envoy.scopes == ("envoy/1", "")
    assert ztunnel.scope == "" and ztunnel.scopes == ("",)
    assert configs.events == [("connect", "envoy/1")]  # a ztunnel reads the shared resources only
    await envoy.close()
    await ztunnel.close()
    assert configs.events == [("connect", "envoy/1"), ("disconnect", "envoy/1")]


@pytest.mark.parametrize(
    ("fail", "code", "text"),
    [
        (ProxyError("proxy a.shop is not served here"), grpc.StatusCode.INVALID_ARGUMENT, "not served here"),
        (RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, "internal error building this proxy's config"),
    ],
)
async def test_config_failures_map_to_grpc_statuses(fail: Exception, code: grpc.StatusCode, text: str) -> None:
    source = AdsSource(FakeConfigs(fail=fail))
    with pytest.raises(SourceError) as err:
        await source.open_stream(base_pb2.Node(id=SIDECAR), "ipv4:127.0.0.1:1")
    assert err.value.code == code
    assert text in err.value.message and "secret detail" not in err.value.message
