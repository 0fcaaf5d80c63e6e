"""The registry from a Kubernetes API server (`ztd --kubeconfig`): list, then watch, per kind.

Each kind (Namespaces, ServiceAccounts, Nodes, Pods, Services, EndpointSlices, and Istio's
AuthorizationPolicy / PeerAuthentication in security.istio.io v1, else v1beta1) is listed once, then watched
from the list's resourceVersion. A watch that ends is resumed from the last resourceVersion seen (events or
bookmarks); one that expires (410 Gone) is replaced by a fresh list, so whatever changed in between is not
lost. Other errors retry with jittered exponential backoff.

Objects go through the same parser as the YAML folder (parse.parse_object), so both sources build the same
model, and every change replaces the Registry's snapshot. A change after a quiet spell reaches the registry at
once: the publisher's debounce (istiod's 100 ms) is the one wait between a watch event and a push. Under a burst
(a rollout) the snapshots are spaced `min_interval` apart, so their cost stays bounded.

The list/watch loop is ztcore.informer's (one Informer per kind, each on its own threads, so eight long watches
never starve the event loop's default executor); this module keeps what is particular to the registry: the
apiVersion fallback, parsing, and publishing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException

from ztcore.backoff import Backoff, Streak
from ztcore.informer import Informer, NotServed, Obj
from ztcore.kubeclient import describe_error, json_body
from ztcore.mesh.registry.objects import ObjectKey, RegistryObject
from ztcore.mesh.registry.parse import parse_object
from ztcore.mesh.registry.store import Registry, RegistrySnapshot

log = logging.getLogger(__name__)

IN_CLUSTER = "in-cluster"
# Sync client's default pool is 5 per core; eight watches, lists and TokenReviews need more than 10.
MIN_CONNECTION_POOL = 32


class KubeSourceError(Exception):
    """The API server could not be used (bad kubeconfig, initial list failed); one readable line."""


def load_api_client(kubeconfig: str) -> Any:
    """A `kubernetes.client.ApiClient` for a kubeconfig file, or the pod's own account with "in-cluster".

    Blocking (reads files): call it through asyncio.to_thread.
    """
    cfg = kubernetes.client.Configuration()
    try:
        if kubeconfig == IN_CLUSTER:
            kubernetes.config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException as err:
        raise KubeSourceError(f"cannot load kubeconfig {kubeconfig}: {err}") from None
    except OSError as err:
        raise KubeSourceError(f"cannot load kubeconfig {kubeconfig}: {err.strerror or err}") from None
    except Exception as err:  # malformed YAML, bad base64: still one line, not a traceback
        raise KubeSourceError(f"cannot load kubeconfig {kubeconfig}: {type(err).__name__}: {err}") from None
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, MIN_CONNECTION_POOL)
    return kubernetes.client.ApiClient(cfg)


# --- what is watched ---------------------------------------------------------------------------------------

# (api client, apiVersion, keyword arguments for a list/watch call) -> raw urllib3 response
ListCall = Callable[[Any, str, dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class KindSpec:
    kind: str
    api_versions: tuple[str, ...]  # tried in order; the first one served wins
    call: ListCall
    plural: str

    def describe(self, api_version: str) -> str:
        group = api_version.rpartition("/")[0]
        return f"{self.plural}.{group}" if group else self.plural


def _core(method: str) -> ListCall:
    return lambda api, _version, kw: getattr(kubernetes.client.CoreV1Api(api), method)(**kw)


def _endpoint_slices(api: Any, _version: str, kw: dict[str, Any]) -> Any:
    return kubernetes.client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces(**kw)


def custom_objects(plural: str) -> ListCall:
    """List/watch call for a custom resource of any group/version (given by the apiVersion at call time)."""

    def call(api: Any, api_version: str, kw: dict[str, Any]) -> Any:
        group, _, version = api_version.partition("/")
        return kubernetes.client.CustomObjectsApi(api).list_cluster_custom_object(group, version, plural, **kw)

    return call


ISTIO_SECURITY = ("security.istio.io/v1", "security.istio.io/v1beta1")

KINDS: tuple[KindSpec, ...] = (
    KindSpec("Namespace", ("v1",), _core("list_namespace"), "namespaces"),
    KindSpec("ServiceAccount", ("v1",), _core("list_service_account_for_all_namespaces"), "serviceaccounts"),
    KindSpec("Node", ("v1",), _core("list_node"), "nodes"),
    KindSpec("Pod", ("v1",), _core("list_pod_for_all_namespaces"), "pods"),
    KindSpec("Service", ("v1",), _core("list_service_for_all_namespaces"), "services"),
    KindSpec("EndpointSlice", ("discovery.k8s.io/v1",), _endpoint_slices, "endpointslices"),
    KindSpec("AuthorizationPolicy", ISTIO_SECURITY, custom_objects("authorizationpolicies"), "authorizationpolicies"),
    KindSpec("PeerAuthentication", ISTIO_SECURITY, custom_objects("peerauthentications"), "peerauthentications"),
)


# --- blocking side (informer threads) ----------------------------------------------------------------------


class _ListFailed(Exception):
    def __init__(self, plural: str, reason: str) -> None:
        super().__init__(f"{plural}: {reason}")
        self.plural = plural
        self.reason = reason


def _list_all(api: Any, spec: KindSpec, page_size: int, timeout: float) -> tuple[str, list[Obj], str]:
    """(apiVersion used, items, list resourceVersion); paged, and a consistent read from etcd."""
    for api_version in spec.api_versions:
        try:
            items, rv = _list_version(api, spec, api_version, page_size, timeout)
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        return api_version, items, rv
    raise NotServed(f"none of {', '.join(spec.api_versions)} is served")


def _list_version(api: Any, spec: KindSpec, api_version: str, page_size: int, timeout: float) -> tuple[list[Obj], str]:
    items: list[Obj] = []
    token = ""
    while True:
        kw: dict[str, Any] = {"limit": page_size, "_preload_content": False, "_request_timeout": timeout}
        if token:
            kw["_continue"] = token
        resp = spec.call(api, api_version, kw)
        body = json_body(resp)
        for item in body.get("items") or ():
            # List items of built-in kinds carry no apiVersion/kind; the parser dispatches on them.
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", spec.kind)
            items.append(item)
        meta = body.get("metadata") or {}
        token = meta.get("continue") or ""
        if not token:
            return items, str(meta.get("resourceVersion", ""))


def _watch_call(api: Any, spec: KindSpec, api_version: str, rv: str, timeout_s: int) -> Any:
    try:
        return spec.call(
            api,
            api_version,
            {
                "watch": True,
                "resource_version": rv,
                "allow_watch_bookmarks": True,
                "timeout_seconds": timeout_s,
                "_preload_content": False,
                # Reads wait at most the server's own timeout plus a margin: a silent dead peer is noticed.
                "_request_timeout": (10.0, timeout_s + 30.0),
            },
        )
    except ApiException as err:
        if err.status == 404:
            raise NotServed(f"{spec.describe(api_version)} is no longer served") from None
        raise


# --- loop side ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindStats:
    lists: int = 0
    watches: int = 0
    expired: int = 0  # 410 Gone answers (each followed by a fresh list)
    errors: int = 0
    api_version: str = ""
    resource_version: str = ""
    objects: int = 0


@dataclass(slots=True)
class _KindState:
    spec: KindSpec
    api_version: str = ""  # the one watched: the last list's
    # Written by the list's thread, taken by on_replace, which runs once that list has returned.
    listed_version: str = ""
    objects: dict[tuple[str, str], RegistryObject] = field(default_factory=dict)
    rejected: dict[tuple[str, str], str] = field(default_factory=dict)  # last rejected resourceVersion


class KubeRegistrySource:
    """Feeds a Registry from an API server. `load_initial()` once (optional), then `run()` until cancelled."""

    def __init__(
        self,
        api: Any,
        registry: Registry,
        *,
        kinds: Iterable[KindSpec] = KINDS,
        min_interval: float = 0.02,
        watch_timeout: float = 300.0,
        initial_backoff: float = 0.2,
        max_backoff: float = 10.0,
        not_served_recheck: float = 30.0,
        page_size: int = 500,
        request_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._registry = registry
        self._min_interval = min_interval
        self._published_at = -math.inf
        self._backoff = Backoff(initial_backoff, max_backoff, jitter=(0.8, 1.2))
        self._page_size = page_size
        self._request_timeout = request_timeout
        self._clock = clock
        self._dirty = asyncio.Event()
        self._changed: set[ObjectKey] = set()  # since the registry last took the objects
        self._states = [_KindState(spec) for spec in kinds]
        self._informers = [
            self._informer(st, watch_timeout=watch_timeout, not_served_recheck=not_served_recheck)
            for st in self._states
        ]

    def _informer(self, st: _KindState, *, watch_timeout: float, not_served_recheck: float) -> Informer:
        spec = st.spec

        def list_kind() -> tuple[list[Obj], str]:
            st.listed_version, items, rv = _list_all(self._api, spec, self._page_size, self._request_timeout)
            return items, rv

        def on_replace(items: list[Obj], _rv: str) -> None:
            self._replace(st, items)

        def on_event(etype: str, obj: Obj) -> None:
            self._apply(st, etype, obj)

        return Informer(
            spec.plural,
            list_kind,
            lambda rv, timeout_s: _watch_call(self._api, spec, st.api_version, rv, timeout_s),
            on_replace=on_replace,
            on_event=on_event,
            backoff=self._backoff,
            watch_timeout=watch_timeout,
            not_served_recheck=not_served_recheck,
            clock=self._clock,
        )

    @property
    def synced(self) -> bool:
        return all(informer.synced for informer in self._informers)

    def stats(self) -> Mapping[str, KindStats]:
        """Per kind: lists, watches, 410 expiries, errors, the apiVersion served and the resourceVersion seen."""
        out: dict[str, KindStats] = {}
        for st, informer in zip(self._states, self._informers, strict=True):
            s = informer.stats()
            out[st.spec.kind] = KindStats(
                s.lists, s.watches, s.expired, s.errors, st.api_version, s.resource_version, len(st.objects)
            )
        return out

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def load_initial(self, give_up_after: float = 60.0) -> RegistrySnapshot:
        """List every kind once (retrying errors) and install the first snapshot.

        Raises KubeSourceError naming the kinds that could not be listed within `give_up_after` seconds, so
        that ztd stops with one line instead of serving an empty registry.
        """
        deadline = self._clock() + give_up_after

        async def first_list(informer: Informer) -> None:
            backoff = Streak(self._backoff)
            while True:
                try:
                    await informer.sync()  # a kind that is not served counts as listed (empty)
                    return
                except Exception as err:
                    reason = describe_error(err)
                    level = logging.WARNING if backoff.failures == 0 else logging.DEBUG
                    delay = backoff.next()
                    if self._clock() + delay > deadline:
                        raise _ListFailed(informer.name, reason) from None
                    log.log(level, "listing %s failed: %s; retrying in %.1fs", informer.name, reason, delay)
                    await asyncio.sleep(delay)

        # gather, not a TaskGroup: every kind gets its full time, so the error can name all that failed.
        results = await asyncio.gather(*(first_list(i) for i in self._informers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.close()
            unexpected = [r for r in failed if not isinstance(r, _ListFailed)]
            if unexpected:
                raise unexpected[0]
            # Usually one cause (the server is unreachable) for every kind: say it once.
            by_reason: dict[str, list[str]] = {}
            for r in failed:
                assert isinstance(r, _ListFailed)
                by_reason.setdefault(r.reason, []).append(r.plural)
            raise KubeSourceError("; ".join(f"cannot list {', '.join(p)}: {r}" for r, p in by_reason.items()))
        snapshot = self._publish()
        log.info(
            "registry version %d from the API server: %s",
            snapshot.version,
            ", ".join(f"{len(st.objects)} {st.spec.plural}" for st in self._states),
        )
        return snapshot

    async def run(self) -> None:
        """List (unless load_initial did), watch every kind and publish changes, until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._publisher())
                for informer in self._informers:
                    tg.create_task(informer.run())
        finally:
            self.close()

    def close(self) -> None:
        """Abort open watches and let the threads go; safe to call twice."""
        for informer in self._informers:
            informer.close()

    # --- per kind (informer callbacks) ------------------------------------------------------------------------

    def _replace(self, st: _KindState, items: list[Obj]) -> None:
        """A (re)list, or an empty one when the kind is not served."""
        api_version, st.listed_version = st.listed_version, ""
        if api_version and api_version != st.api_version:
            if st.api_version:
                log.info("%s: now reading %s", st.spec.kind, api_version)
            st.api_version = api_version
        fresh: dict[tuple[str, str], RegistryObject] = {}
        for item in items:
            key = _item_key(item)
            obj = self._parse(st, item, key)
            if obj is not None:
                fresh[key] = obj
        # Wholesale replacement: whatever was deleted while we were not watching disappears here.
        self._set_objects(st, fresh)

    def _apply(self, st: _KindState, etype: str, obj: Obj) -> None:
        key = _item_key(obj)
        if etype == "DELETED":
            gone = st.objects.pop(key, None)
            if gone is not None:
                self._mark_dirty(gone.key)
            st.rejected.pop(key, None)
            return
        parsed = self._parse(st, obj, key)  # ADDED or MODIFIED
        if parsed is not None and st.objects.get(key) != parsed:
            st.objects[key] = parsed
            self._mark_dirty(parsed.key)

    def _parse(self, st: _KindState, item: dict[str, Any], key: tuple[str, str]) -> RegistryObject | None:
        """The object, or None when it is invalid: the previous good version (if any) then stays."""
        try:
            obj = parse_object(item)
        except ValueError as err:
            rv = str((item.get("metadata") or {}).get("resourceVersion", ""))
            if st.rejected.get(key) != rv:  # once per version, not on every relist
                st.rejected[key] = rv
                kept = "keeping the previous version" if key in st.objects else "ignoring it"
                log.warning("%s %s rejected: %s; %s", st.spec.kind, "/".join(p for p in key if p), err, kept)
            return st.objects.get(key)
        st.rejected.pop(key, None)
        return obj

    def _set_objects(self, st: _KindState, objects: dict[tuple[str, str], RegistryObject]) -> None:
        """A (re)list: the kind's objects are these now; only the ones that differ count as changed."""
        if objects != st.objects:
            old, st.objects = st.objects, objects
            for key in old.keys() | objects.keys():
                before, after = old.get(key), objects.get(key)
                if before != after:
                    self._mark_dirty((st.spec.kind, *key))

    # --- publishing ------------------------------------------------------------------------------------------

    def _mark_dirty(self, key: ObjectKey) -> None:
        self._changed.add(key)
        self._dirty.set()

    def _publish(self) -> RegistrySnapshot:
        """The registry takes the objects that changed, in proportion to them (a relist costs its size)."""
        self._dirty.clear()
        changed, self._changed = self._changed, set()
        current = {st.spec.kind: st.objects for st in self._states}
        upserts = []
        removals = []
        for key in changed:
            kind_objects = current.get(key[0])
            obj = kind_objects.get((key[1], key[2])) if kind_objects is not None else None
            if obj is None:
                removals.append(key)
            else:
                upserts.append(obj)
        return self._registry.apply(upserts, removals)

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            # No fixed wait: a 50 ms debounce here, before the publisher's own, added 50 ms to every change
            # (measured beside istiod). Events already queued still go into one snapshot, and a burst is applied
            # at most every `min_interval` (one pod is ~0.6 ms of registry work at 10,000 pods).
            await asyncio.sleep(max(0.0, self._published_at + self._min_interval - self._clock()))
            self._published_at = self._clock()
            before = self._registry.current.version
            snapshot = self._publish()
            if snapshot.version != before:
                log.debug("registry version %d: %d objects", snapshot.version, len(snapshot))


def _item_key(item: Mapping[str, Any]) -> tuple[str, str]:
    meta = item.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
