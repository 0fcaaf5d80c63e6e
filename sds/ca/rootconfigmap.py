"""The CA's root bundle in every namespace, as istiod publishes it: an `istio-ca-root-cert` ConfigMap (key
root-cert.pem, label istio.io/config=true) that workloads and node agents mount to trust the mesh's CA.

The namespaces come from the registry (ztd's Kubernetes source); the writes go to the API server. A CA duty, so it
lives with the CA; `ztd` starts it in Kubernetes mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from ztcore.kubeclient import describe_error, json_body
from ztcore.mesh.registry.store import Registry

log = logging.getLogger(__name__)

ROOT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CONFIGMAP_KEY = "root-cert.pem"
ROOT_CONFIGMAP_LABELS: Mapping[str, str] = {"istio.io/config": "true"}


@dataclass(frozen=True, slots=True)
class RootConfigMapChange:
    namespace: str
    create: bool  # else patch the existing one


def plan_root_configmaps(
    namespaces: Iterable[str], existing: Mapping[str, Mapping[str, Any]], root_pem: str
) -> list[RootConfigMapChange]:
    """Which namespaces need their istio-ca-root-cert ConfigMap created or corrected. Pure.

    `existing` maps a namespace to its ConfigMap as JSON. A ConfigMap is right when it holds the root bundle
    under root-cert.pem and carries the istio.io/config label; other keys and labels are left alone.
    """
    changes = []
    for ns in sorted(set(namespaces)):
        cm = existing.get(ns)
        if cm is None:
            changes.append(RootConfigMapChange(ns, create=True))
            continue
        data = cm.get("data") or {}
        labels = (cm.get("metadata") or {}).get("labels") or {}
        if data.get(ROOT_CONFIGMAP_KEY) != root_pem or any(
            labels.get(k) != v for k, v in ROOT_CONFIGMAP_LABELS.items()
        ):
            changes.append(RootConfigMapChange(ns, create=False))
    return changes


def _root_configmap_body(root_pem: str) -> dict[str, Any]:
    return {
        "metadata": {"name": ROOT_CONFIGMAP, "labels": dict(ROOT_CONFIGMAP_LABELS)},
        "data": {ROOT_CONFIGMAP_KEY: root_pem},
    }


def _root_configmap(root_pem: str) -> Any:
    meta = kubernetes.client.V1ObjectMeta(name=ROOT_CONFIGMAP, labels=dict(ROOT_CONFIGMAP_LABELS))
    return kubernetes.client.V1ConfigMap(metadata=meta, data={ROOT_CONFIGMAP_KEY: root_pem})


class RootCertPublisher:
    """Keeps an istio-ca-root-cert ConfigMap with the CA's root bundle in every namespace (as istiod does).

    A pass lists those ConfigMaps (one call, by field selector) and writes only the missing or wrong ones. It
    runs when the registry's namespaces change, when `root_changed()` is called, and every `resync` seconds,
    which also repairs a ConfigMap someone edited or deleted.
    """

    def __init__(
        self,
        api: Any,
        registry: Registry,
        root_pem: Callable[[], str],
        *,
        resync: float = 60.0,
        retry: float = 5.0,
        request_timeout: float = 30.0,
    ) -> None:
        self._api = api
        self._registry = registry
        self._root_pem = root_pem
        self._resync = resync
        self._retry = retry
        self._request_timeout = request_timeout
        self._wake = asyncio.Event()
        self.passes = 0
        self.writes = 0

    def root_changed(self) -> None:
        self._wake.set()

    def _existing(self) -> dict[str, dict[str, Any]]:
        core = kubernetes.client.CoreV1Api(self._api)
        resp: Any = core.list_config_map_for_all_namespaces(
            field_selector=f"metadata.name={ROOT_CONFIGMAP}",
            _preload_content=False,
            _request_timeout=self._request_timeout,
        )
        body = json_body(resp)
        return {str(item["metadata"]["namespace"]): item for item in body.get("items") or ()}

    def _apply(self, changes: list[RootConfigMapChange], root_pem: str) -> list[str]:
        core = kubernetes.client.CoreV1Api(self._api)
        patch = _root_configmap_body(root_pem)
        timeout = self._request_timeout
        failures = []
        for change in changes:
            try:
                if change.create:
                    try:
                        core.create_namespaced_config_map(
                            change.namespace, _root_configmap(root_pem), _request_timeout=timeout
                        )
                    except ApiException as err:
                        if err.status != 409:
                            raise
                        # Created meanwhile (another writer): correct it instead.
                        core.patch_namespaced_config_map(
                            ROOT_CONFIGMAP, change.namespace, patch, _request_timeout=timeout
                        )
                else:
                    core.patch_namespaced_config_map(ROOT_CONFIGMAP, change.namespace, patch, _request_timeout=timeout)
                self.writes += 1
            except ApiException as err:
                # A namespace being deleted refuses new objects (403/404); the next pass will not list it.
                failures.append(f"{change.namespace}: {describe_error(err)}")
        return failures

    def _pass(self, namespaces: list[str], root_pem: str) -> tuple[list[RootConfigMapChange], list[str]]:
        changes = plan_root_configmaps(namespaces, self._existing(), root_pem)
        return changes, self._apply(changes, root_pem)

    async def run(self) -> None:
        while True:
            snapshot = self._registry.current
            namespaces = frozenset(n.name for n in snapshot.namespaces())
            delay = self._resync
            try:
                changes, failures = await asyncio.to_thread(self._pass, sorted(namespaces), self._root_pem())
                self.passes += 1
                if changes:
                    log.info(
                        "root cert ConfigMap %s written in %d namespace(s)%s",
                        ROOT_CONFIGMAP,
                        len(changes) - len(failures),
                        f"; failed: {'; '.join(failures)}" if failures else "",
                    )
            except Exception as err:
                reason = describe_error(err)
                log.warning("publishing %s failed: %s; retrying in %.0fs", ROOT_CONFIGMAP, reason, self._retry)
                delay = self._retry
            await self._sleep_until_needed(snapshot.version, namespaces, delay)

    async def _sleep_until_needed(self, version: int, namespaces: frozenset[str], delay: float) -> None:
        """Until the set of namespaces differs from the one just handled, the root changes, or `delay` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                while True:
                    changed = asyncio.ensure_future(self._registry.wait_for_change(version))
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({changed, woken}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        changed.cancel()
                        woken.cancel()
                    if self._wake.is_set():
                        self._wake.clear()
                        return
                    snapshot = self._registry.current
                    version = snapshot.version
                    if frozenset(n.name for n in snapshot.namespaces()) != namespaces:
                        return
