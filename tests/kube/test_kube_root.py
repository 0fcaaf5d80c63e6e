"""Root publication: ztd keeps an istio-ca-root-cert ConfigMap with its root in every namespace."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sds.ca.rootconfigmap import ROOT_CONFIGMAP, RootCertPublisher, RootConfigMapChange, plan_root_configmaps
from tests.helpers import RunningZtd
from tests.kube.conftest import wait_registry
from tests.support.kube import KubeApi, KubeCluster
from tests.support.kube_ca import holds, read_root
from tests.support.wait import eventually
from xds_server.registry.kube import KubeRegistrySource, load_api_client
from ztcore.mesh.registry.store import Registry


async def test_ztd_publishes_its_root_in_every_namespace(ztd: RunningZtd, kube: KubeApi, ns: str) -> None:
    root = ztd.root_pem.decode()

    async def published_everywhere() -> bool:
        namespaces = [n.metadata.name for n in (await kube.call(kube.core.list_namespace)).items]
        for name in namespaces:
            if not holds(await read_root(kube, name), root):
                return False
        return len(namespaces) > 1

    await eventually(published_everywhere, within=10)
    # A namespace created later gets one too, without waiting for the periodic resync.
    await kube.namespace(f"{ns}-late")
    await eventually(lambda: _holds_async(kube, f"{ns}-late", root), within=5)


async def _holds_async(kube: KubeApi, ns: str, root: str) -> bool:
    return holds(await read_root(kube, ns), root)


async def test_publisher_repairs_edited_and_deleted_configmaps(
    kube_cluster: KubeCluster, kube: KubeApi, ns: str
) -> None:
    root = {"pem": "-----BEGIN CERTIFICATE-----\nroot-1\n-----END CERTIFICATE-----\n"}
    api = await asyncio.to_thread(load_api_client, str(kube_cluster.kubeconfig))
    registry = Registry()
    source = KubeRegistrySource(api, registry)
    publisher = RootCertPublisher(api, registry, lambda: root["pem"], resync=0.5)
    try:
        await source.load_initial()
        tasks = [asyncio.create_task(source.run()), asyncio.create_task(publisher.run())]
        try:
            await eventually(lambda: _holds_async(kube, ns, root["pem"]), within=5)
            # Someone edits it (keeping an extra key of theirs) ...
            patch = {
                "data": {"root-cert.pem": "tampered", "mine": "kept"},
                "metadata": {"labels": {"istio.io/config": "no"}},
            }
            await kube.call(kube.core.patch_namespaced_config_map, ROOT_CONFIGMAP, ns, patch)
            await eventually(lambda: _holds_async(kube, ns, root["pem"]), within=5)
            cm = await read_root(kube, ns)
            assert cm.data["mine"] == "kept"
            # ... or deletes it.
            await kube.call(kube.core.delete_namespaced_config_map, ROOT_CONFIGMAP, ns)
            await eventually(lambda: _holds_async(kube, ns, root["pem"]), within=5)
            # A new root (rotation) is pushed at once when the CA says so.
            root["pem"] = root["pem"].replace("root-1", "root-2")
            publisher.root_changed()
            await eventually(lambda: _holds_async(kube, ns, root["pem"]), within=5)
            await wait_registry(registry, lambda s: s.namespace(ns) is not None)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        source.close()
        api.close()


def test_plan_root_configmaps() -> None:
    good: dict[str, Any] = {
        "metadata": {"labels": {"istio.io/config": "true", "other": "x"}},
        "data": {"root-cert.pem": "R", "x": "y"},
    }
    existing: dict[str, dict[str, Any]] = {
        "ok": good,
        "stale": {"metadata": {"labels": {"istio.io/config": "true"}}, "data": {"root-cert.pem": "OLD"}},
        "unlabelled": {"metadata": {}, "data": {"root-cert.pem": "R"}},
        "gone-ns": good,  # a ConfigMap in a namespace we no longer list is left alone
    }
    assert plan_root_configmaps(["unlabelled", "new", "ok", "stale", "new"], existing, "R") == [
        RootConfigMapChange("new", create=True),
        RootConfigMapChange("stale", create=False),
        RootConfigMapChange("unlabelled", create=False),
    ]
    assert plan_root_configmaps([], existing, "R") == []
