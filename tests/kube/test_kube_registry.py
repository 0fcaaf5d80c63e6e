"""The registry fed by list+watch from a real API server: latency, restarts and expired watches."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kube.conftest import wait_registry
from tests.support.kube import KubeApi, KubeCluster, PausableProxy, free_port
from xds_server.registry.kube import (
    KindSpec,
    KubeRegistrySource,
    KubeSourceError,
    custom_objects,
    load_api_client,
)
from ztcore.mesh.registry.objects import AuthorizationPolicy, PeerAuthentication
from ztcore.mesh.registry.store import Registry, RegistrySnapshot

LATENCY_BOUND = 1.0


@contextlib.asynccontextmanager
async def running_source(kubeconfig: Path, **options: Any) -> AsyncIterator[tuple[KubeRegistrySource, Registry]]:
    api = await asyncio.to_thread(load_api_client, str(kubeconfig))
    registry = Registry()
    source = KubeRegistrySource(api, registry, max_backoff=1.0, **options)
    try:
        await source.load_initial()
        task = asyncio.create_task(source.run())
        try:
            yield source, registry
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        source.close()
        api.close()


async def timed(registry: Registry, change: Awaitable[Any], predicate: Callable[[RegistrySnapshot], bool]) -> float:
    """Seconds from the API server's answer to a write (the change is committed) until the registry shows it."""
    await change
    return await wait_registry(registry, predicate, within=5)


def pod_names(snapshot: RegistrySnapshot, ns: str) -> set[str]:
    return {p.name for p in snapshot.pods() if p.namespace == ns}


def policy_names(snapshot: RegistrySnapshot, ns: str) -> set[str]:
    return {p.name for p in snapshot.authorization_policies() if p.namespace == ns}


def deny(name: str, principal: str = "cluster.local/ns/evil/sa/x") -> dict[str, Any]:
    return {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [principal]}}]}]},
    }


async def test_changes_reach_the_registry_within_a_second(kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    async with running_source(kube_cluster.kubeconfig) as (_, registry):
        await kube.service_account(ns, "web")
        await wait_registry(registry, lambda s: s.namespace(ns) is not None and len(s.service_accounts()) > 0)
        latencies: dict[str, float] = {}

        latencies["pod added"] = await timed(
            registry,
            kube.pod(ns, "web-1", service_account="web", node="node-a", ip="10.1.0.5", labels={"app": "web"}),
            lambda s: (p := s.pod(ns, "web-1")) is not None and p.pod_ips == ("10.1.0.5",),
        )
        pod = registry.current.pod(ns, "web-1")
        assert pod is not None
        api_pod = await kube.call(kube.core.read_namespaced_pod, "web-1", ns)
        # What the CA's node authorizer reads comes through unchanged.
        assert (pod.uid, pod.node_name, pod.service_account, pod.phase) == (
            api_pod.metadata.uid,
            "node-a",
            "web",
            "Running",
        )
        assert pod.labels == {"app": "web"} and [p.container_port for p in pod.container_ports] == [8080]

        latencies["pod failed"] = await timed(
            registry,
            kube.call(kube.core.patch_namespaced_pod_status, "web-1", ns, {"status": {"phase": "Failed"}}),
            lambda s: (p := s.pod(ns, "web-1")) is not None and p.phase == "Failed",
        )
        assert registry.current.get_pod(ns, "web-1") is None  # a Failed pod no longer exists for the CA

        latencies["policy v1 added"] = await timed(
            registry, kube.create_policy(ns, deny("deny-evil")), lambda s: "deny-evil" in policy_names(s, ns)
        )
        ap = registry.current.get(AuthorizationPolicy, ns, "deny-evil")
        assert ap is not None and ap.action == "DENY"
        assert ap.rules[0].from_[0].principals == ("cluster.local/ns/evil/sa/x",)

        patch = {"spec": {"action": "ALLOW", "rules": [{}]}}
        latencies["policy changed"] = await timed(
            registry,
            kube.call(
                kube.custom.patch_namespaced_custom_object,
                "security.istio.io",
                "v1",
                ns,
                "authorizationpolicies",
                "deny-evil",
                patch,
            ),
            lambda s: (p := s.get(AuthorizationPolicy, ns, "deny-evil")) is not None and p.action == "ALLOW",
        )

        latencies["policy v1beta1 added"] = await timed(
            registry,
            kube.create_policy(ns, deny("legacy"), version="v1beta1"),
            lambda s: "legacy" in policy_names(s, ns),
        )
        strict = {"kind": "PeerAuthentication", "metadata": {"name": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}
        latencies["peer authentication added"] = await timed(
            registry,
            kube.create_policy(ns, strict),
            lambda s: (p := s.get(PeerAuthentication, ns, "default")) is not None and p.mtls_mode == "STRICT",
        )
        latencies["policy deleted"] = await timed(
            registry,
            kube.delete_policy(ns, "AuthorizationPolicy", "deny-evil"),
            lambda s: "deny-evil" not in policy_names(s, ns),
        )
        latencies["pod deleted"] = await timed(
            registry, kube.delete_pod(ns, "web-1"), lambda s: s.pod(ns, "web-1") is None
        )

        svc = {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }
        latencies["service added"] = await timed(
            registry,
            kube.call(kube.core.create_namespaced_service, ns, svc),
            lambda s: any(x.name == "web" and x.namespace == ns and x.cluster_ips for x in s.services()),
        )
        slice_ = {
            "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.6"], "nodeName": "node-a", "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
        discovery = await asyncio.to_thread(lambda: kube.models.DiscoveryV1Api(kube.client))
        latencies["endpointslice added"] = await timed(
            registry,
            kube.call(discovery.create_namespaced_endpoint_slice, ns, slice_),
            lambda s: any(e.service_name == "web" and e.namespace == ns for e in s.endpoint_slices()),
        )
    print("\nAPI write acknowledged -> registry: " + ", ".join(f"{k} {v * 1000:.0f}ms" for k, v in latencies.items()))
    slow = {k: round(v, 3) for k, v in latencies.items() if v >= LATENCY_BOUND}
    assert not slow, f"changes slower than {LATENCY_BOUND}s: {slow}"


async def test_apiserver_restart_loses_no_update(kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    await kube.service_account(ns, "app")
    async with running_source(kube_cluster.kubeconfig) as (source, registry):
        await kube.pod(ns, "r-1", service_account="app", node="node-a")
        await kube.create_policy(ns, deny("before"))
        # Killed right after the write: whether its event got out before the kill is up to chance.
        await kube.pod(ns, "r-2", service_account="app", node="node-b")
        watches_before = source.stats()["Pod"].watches
        await kube_cluster.restart_apiserver_async()
        # Written as soon as the new API server answers, possibly before our watches are back.
        await kube.delete_pod(ns, "r-1")
        await kube.pod(ns, "r-3", service_account="app", node="node-a")
        await kube.delete_policy(ns, "AuthorizationPolicy", "before")
        await kube.create_policy(ns, deny("after"))
        await wait_registry(
            registry,
            lambda s: pod_names(s, ns) == {"r-2", "r-3"} and policy_names(s, ns) == {"after"},
            within=30,
        )
        assert source.stats()["Pod"].watches > watches_before  # it did lose its watch, and came back
        # And it keeps following changes afterwards.
        await timed(registry, kube.delete_pod(ns, "r-2"), lambda s: pod_names(s, ns) == {"r-3"})


async def test_expired_watch_relists_and_loses_no_update(
    kube_cluster: KubeCluster, kube: KubeApi, ns: str, tmp_path: Path
) -> None:
    await kube.service_account(ns, "app")
    proxy = await PausableProxy(kube_cluster.apiserver_port).start()
    via_proxy = kube_cluster.write_kubeconfig(tmp_path / "via-proxy.kubeconfig", f"https://127.0.0.1:{proxy.port}")
    try:
        async with running_source(via_proxy) as (source, registry):
            await kube.pod(ns, "e-1", service_account="app", node="node-a")
            await kube.create_policy(ns, deny("p-1"))
            await wait_registry(registry, lambda s: "e-1" in pod_names(s, ns) and "p-1" in policy_names(s, ns))
            expired_before = {kind: st.expired for kind, st in source.stats().items()}

            # Cut ztd's source off, change things it will never see as events, and drop the history.
            proxy.pause()
            await kube.delete_pod(ns, "e-1")
            await kube.pod(ns, "e-2", service_account="app", node="node-b")
            await kube.delete_policy(ns, "AuthorizationPolicy", "p-1")
            await kube.create_policy(ns, deny("p-2"), version="v1beta1")
            compacted = await asyncio.to_thread(kube_cluster.compact_etcd)
            # A new API server's watch cache starts at the compacted revision: older ones answer 410 Gone.
            await kube_cluster.restart_apiserver_async()
            proxy.resume()

            await wait_registry(
                registry,
                lambda s: pod_names(s, ns) == {"e-2"} and policy_names(s, ns) == {"p-2"},
                within=30,
            )
            stats = source.stats()
            assert stats["Pod"].expired > expired_before["Pod"], stats["Pod"]
            assert stats["AuthorizationPolicy"].expired > expired_before["AuthorizationPolicy"]
            assert int(stats["Pod"].resource_version) >= compacted
            # Watching again from the fresh list's resourceVersion, it follows changes as before.
            await timed(registry, kube.delete_pod(ns, "e-2"), lambda s: pod_names(s, ns) == set())
    finally:
        await proxy.close()


async def test_falls_back_to_an_older_served_version(kube_cluster: KubeCluster, kube: KubeApi, ns: str) -> None:
    await kube.create_policy(ns, deny("fallback"), version="v1beta1")
    kinds = (
        # v2 does not exist: the source must fall back to v1beta1, as it would on a cluster with older CRDs.
        KindSpec(
            "AuthorizationPolicy",
            ("security.istio.io/v2", "security.istio.io/v1beta1"),
            custom_objects("authorizationpolicies"),
            "authorizationpolicies",
        ),
        # Not served at all (no such CRD): empty, not an error.
        KindSpec(
            "PeerAuthentication", ("example.invalid/v1",), custom_objects("peerauthentications"), "peerauthentications"
        ),
    )
    async with running_source(kube_cluster.kubeconfig, kinds=kinds) as (source, registry):
        assert "fallback" in policy_names(registry.current, ns)
        stats = source.stats()
        assert stats["AuthorizationPolicy"].api_version == "security.istio.io/v1beta1"
        assert stats["PeerAuthentication"].objects == 0 and source.synced
        await timed(registry, kube.create_policy(ns, deny("later")), lambda s: "later" in policy_names(s, ns))


async def test_unreachable_api_server_fails_startup_with_one_line(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    dead = kube_cluster.write_kubeconfig(tmp_path / "dead.kubeconfig", f"https://127.0.0.1:{free_port()}")
    api = await asyncio.to_thread(load_api_client, str(dead))
    source = KubeRegistrySource(api, Registry(), initial_backoff=0.05, max_backoff=0.2)
    try:
        with pytest.raises(KubeSourceError) as err:
            await source.load_initial(give_up_after=1.0)
    finally:
        api.close()
    assert "cannot list" in str(err.value) and "\n" not in str(err.value)


def test_ztd_with_a_missing_kubeconfig_exits_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xds_server.main",
            "--state-dir",
            str(tmp_path / "s"),
            "--kubeconfig",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ztd: cannot load kubeconfig") and "Traceback" not in proc.stderr


def test_config_dir_and_kubeconfig_are_exclusive(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xds_server.main", "--config-dir", str(tmp_path), "--kubeconfig", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--config-dir and --kubeconfig" in proc.stderr
