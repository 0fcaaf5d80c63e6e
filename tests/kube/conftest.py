"""Kubernetes-mode tests against a real kube-apiserver and etcd (built on first use by scripts/kube-tools.sh).

One cluster serves the whole session; each test uses its own namespace so tests never see each other's pods.
The cluster is seeded like a small mesh: Istio's security CRDs, istio-system/ztunnel, and two nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import RunningZtd, running_ztd
from tests.support.kube import KubeApi, KubeCluster
from tests.support.kube import kube_cluster_fixture as kube_cluster
from ztcore.mesh.registry.store import Registry, RegistrySnapshot

__all__ = ["kube_cluster"]

NODES = {"node-a": "192.0.2.1", "node-b": "192.0.2.2"}
_namespaces = itertools.count(1)


async def _seed(api: KubeApi) -> None:
    await api.apply_crds()
    await api.namespace("istio-system")
    await api.service_account("istio-system", "ztunnel")
    for node, ip in NODES.items():
        await api.node(node, ip)


@pytest.fixture(scope="session")
def kube(kube_cluster: KubeCluster) -> Iterator[KubeApi]:
    """Admin client of the session's cluster, seeded. (Seeding runs on its own thread and loop.)"""
    api = KubeApi(kube_cluster.kubeconfig)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _seed(api)).result(timeout=120)
    yield api
    api.close()


@pytest.fixture
async def ns(kube: KubeApi) -> str:
    """A fresh namespace for this test."""
    name = f"t{next(_namespaces)}"
    await kube.namespace(name)
    return name


@pytest.fixture
async def ztd(tmp_path: Path, kube_cluster: KubeCluster, kube: KubeApi) -> AsyncIterator[RunningZtd]:
    """An in-process ztd in Kubernetes mode (registry + TokenReview from the cluster)."""
    async with running_ztd(tmp_path, kubeconfig=str(kube_cluster.kubeconfig)) as running:
        yield running


async def wait_registry(
    registry: Registry, predicate: Callable[[RegistrySnapshot], bool], within: float = 10.0
) -> float:
    """Seconds until a snapshot satisfies predicate (0 if the current one does); fails after `within` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    snapshot = registry.current
    try:
        async with asyncio.timeout(within):
            while not predicate(snapshot):
                snapshot = await registry.wait_for_change(snapshot.version)
    except TimeoutError:
        pytest.fail(f"registry did not reach the expected state in {within}s; it has {registry.current!r}")
    return loop.time() - start
