"""Registry → translation → versioned WDS resources in the engine's SnapshotCache (istiod's debounce + push).

Every registry change is debounced as istiod does (PILOT_DEBOUNCE_AFTER / PILOT_DEBOUNCE_MAX): the push
happens once nothing changed for `debounce_after`, or `debounce_max` after the first unpublished change,
whichever is first. Then only what the changed objects feed is translated again
(ztcore.mesh.translate.incremental, in a worker thread), and only the resources whose content changed are
packed and installed:

- `type.googleapis.com/istio.workload.Address`: workloads by uid, services by `<namespace>/<hostname>`, each
  with its `<network>/<ip>` aliases (the names ztunnel subscribes to on demand);
- `type.googleapis.com/istio.security.Authorization`: policies by `<namespace>/<name>`.

A change costs in proportion to what it touches: one pod edited is one workload rebuilt, packed and sent,
whatever the mesh size. Versions are content hashes, so a resource keeps its version while its content stays
(also across restarts and replicas). Each resource is serialised once and the same bytes go to every client.
Policies are installed before addresses, so a workload never names a policy its clients have not received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ztcore.mesh.registry.objects import ObjectKey
from ztcore.mesh.registry.store import Registry, RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, Translation, translate
from ztcore.mesh.translate.incremental import Delta, IncrementalTranslation, TranslationOutputs
from ztcore.mesh.translate.policies import StatusMessage
from ztcore.metrics import Registry as MetricsRegistry
from ztcore.model.authz import Authorization
from ztcore.model.workload import Service, Workload
from ztcore.xds import typeurls
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

WDS_TYPES = (typeurls.AUTHORIZATION, typeurls.ADDRESS)  # publishing order: policies first

Listener = Callable[["Published"], Awaitable[None]]


# -- pure: debounce ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushTuning:
    """istiod's PILOT_DEBOUNCE_AFTER (quiet time before a push) and PILOT_DEBOUNCE_MAX (longest delay)."""

    debounce_after: float = 0.1
    debounce_max: float = 10.0

    def __post_init__(self) -> None:
        if self.debounce_after < 0 or self.debounce_max < 0:
            raise ValueError("debounce times cannot be negative")


@dataclass(frozen=True, slots=True)
class Debounce:
    """Changes not published yet: when the first and the latest arrived (monotonic seconds)."""

    first: float | None = None
    last: float | None = None

    def record(self, now: float) -> Debounce:
        return Debounce(self.first if self.first is not None else now, now)

    def deadline(self, tuning: PushTuning) -> float | None:
        """When to push: `debounce_after` after the latest change, but no later than `debounce_max` after the
        first. None: nothing to publish."""
        if self.first is None or self.last is None:
            return None
        return min(self.last + tuning.debounce_after, self.first + tuning.debounce_max)

    def due(self, now: float, tuning: PushTuning) -> bool:
        deadline = self.deadline(tuning)
        return deadline is not None and now >= deadline


# -- pure: outputs → resources ------------------------------------------------------------------------------


def pack_address(model: Workload | Service) -> Resource:
    if isinstance(model, Workload):
        return Resource.pack(model.uid, model.to_address_pb(), aliases=model.aliases())
    return Resource.pack(model.key, model.to_address_pb(), aliases=model.aliases())


def pack_authorization(model: Authorization) -> Resource:
    return Resource.pack(model.key, model.to_pb())


@dataclass(frozen=True, slots=True)
class WdsChanges:
    """What one push installs: per type, the resources to add or replace and the names to remove."""

    upserts: Mapping[str, tuple[Resource, ...]]
    removals: Mapping[str, frozenset[str]]

    def count(self) -> int:
        return sum(len(v) for v in self.upserts.values()) + sum(len(v) for v in self.removals.values())


def wds_changes(state: IncrementalTranslation, delta: Delta) -> WdsChanges:
    """Pack the outputs `delta` names; a name without an output any more is a removal."""
    addresses, gone_addresses = [], set()
    for name in sorted(delta.addresses):
        model: Workload | Service | None = state.workloads.get(name) or state.services.get(name)
        if model is None:
            gone_addresses.add(name)
        else:
            addresses.append(pack_address(model))
    policies, gone_policies = [], set()
    for name in sorted(delta.authorizations):
        policy = state.authorizations.get(name)
        if policy is None:
            gone_policies.add(name)
        else:
            policies.append(pack_authorization(policy))
    return WdsChanges(
        {typeurls.AUTHORIZATION: tuple(policies), typeurls.ADDRESS: tuple(addresses)},
        {typeurls.AUTHORIZATION: frozenset(gone_policies), typeurls.ADDRESS: frozenset(gone_addresses)},
    )


# -- the IO shell ------------------------------------------------------------------------------------------


class PublishMetrics:
    def __init__(self, registry: MetricsRegistry) -> None:
        self.debounce_time = registry.histogram(
            "pilot_debounce_time",
            "Delay in seconds between the first config enters debouncing and the merged push request is pushed.",
            [0.01, 0.1, 1, 3, 5, 10, 20, 30],
        )
        self.pushes = registry.counter("ztd_registry_pushes", "Registry snapshots translated and published.")
        self.publish_time = registry.histogram(
            "ztd_publish_seconds",
            "Time to translate a registry snapshot and publish its resources.",
            [0.01, 0.05, 0.1, 0.5, 1, 5, 10],
        )
        self.resources = registry.gauge("ztd_published_resources", "Resources published, by xDS type.")


class Published:
    """What the latest push installed. `translation` is built from the outputs when someone asks (Envoy
    proxies, debug pages); a push that nobody reads it for costs nothing for it."""

    __slots__ = ("_outputs", "_translation", "changed", "rebuilt", "registry_version")

    def __init__(
        self, registry_version: int, outputs: TranslationOutputs, changed: Mapping[str, frozenset[str]], rebuilt: int
    ) -> None:
        self.registry_version = registry_version
        self.changed = changed  # type URL -> names added, updated or removed
        self.rebuilt = rebuilt  # workloads rebuilt for it
        self._outputs = outputs
        self._translation: Translation | None = None

    @property
    def translation(self) -> Translation:
        if self._translation is None:
            self._translation = self._outputs.translation()
        return self._translation

    @property
    def status_messages(self) -> dict[str, StatusMessage]:
        return self._outputs.status_messages()

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Workloads, services and policies."""
        return self._outputs.sizes()


class Publisher:
    """Keeps the cache in step with the registry. Use from the event loop; `run()` owns the watch loop."""

    def __init__(
        self,
        registry: Registry,
        cache: SnapshotCache,
        *,
        options: TranslateOptions,
        tuning: PushTuning | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: PublishMetrics | None = None,
    ) -> None:
        self._registry = registry
        self._cache = cache
        self._options = options
        self.tuning = tuning or PushTuning()
        self._clock = clock
        self._sleep = sleep
        self._metrics = metrics
        self._state = IncrementalTranslation(options)
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()
        self.latest: Published | None = None
        self.published = asyncio.Event()  # set once the first snapshot is in the cache

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def translation(self) -> Translation:
        """The translation currently served (an empty mesh until the first push)."""
        if self.latest is None:
            return translate(RegistrySnapshot(), self._options)
        return self.latest.translation

    def add_listener(self, listener: Listener) -> None:
        """Awaited after each push with what it published (Envoy proxies rebuild from its translation)."""
        self._listeners.append(listener)

    async def publish(self, snapshot: RegistrySnapshot, origin: float | None = None) -> Published:
        """Translate what changed and pack it off the loop, then install it on the loop (the cache is
        single-threaded). `origin`: time.monotonic() of the first change this push carries, for metrics."""
        async with self._lock:
            started = self._clock()
            keys = self._changed_keys(snapshot)
            state = self._state
            changes, outputs = await asyncio.to_thread(self._build, snapshot, keys)
            changed: dict[str, frozenset[str]] = {}
            for type_url in WDS_TYPES:
                names: set[str] = set()
                if keys is None:  # the first push: exactly these resources, nothing else
                    names |= self._cache.set_resources(type_url, changes.upserts[type_url], origin=origin)
                else:
                    if changes.upserts[type_url]:
                        names |= self._cache.upsert(type_url, changes.upserts[type_url], origin=origin)
                    if changes.removals[type_url]:
                        names |= self._cache.remove(type_url, changes.removals[type_url], origin=origin)
                changed[type_url] = frozenset(names)
            self._log_status_changes(self.latest, outputs)
            self.latest = Published(snapshot.version, outputs, changed, state.rebuilt)
            for listener in list(self._listeners):
                try:
                    await listener(self.latest)
                except Exception:  # one failing listener must not stop the push to the others
                    log.exception("a listener failed on registry version %d", snapshot.version)
            workloads, services, policies = self.latest.sizes
            if self._metrics is not None:
                self._metrics.pushes.inc()
                self._metrics.publish_time.observe(self._clock() - started)
                self._metrics.resources.set(float(workloads + services), type=typeurls.short_name(typeurls.ADDRESS))
                self._metrics.resources.set(float(policies), type=typeurls.short_name(typeurls.AUTHORIZATION))
            self.published.set()
            log.info(
                "published registry version %d: %d workloads, %d services, %d policies (%d changed, %d rebuilt)",
                snapshot.version, workloads, services, policies, sum(len(n) for n in changed.values()),
                state.rebuilt,
            )  # fmt: skip
            return self.latest

    @staticmethod
    def _log_status_changes(previous: Published | None, outputs: TranslationOutputs) -> None:
        """Say once, when it appears or changes, where a policy is not enforced as written (istiod puts this in
        the policy's status); a push that changes no status logs nothing."""
        before = previous.status_messages if previous is not None else {}
        after = outputs.status_messages()
        for key in sorted(after):
            if before.get(key) != after[key]:
                log.warning("AuthorizationPolicy %s: %s", key, after[key].message)
        for key in sorted(before.keys() - after.keys()):
            log.info("AuthorizationPolicy %s: no status message any more", key)

    def _changed_keys(self, snapshot: RegistrySnapshot) -> frozenset[ObjectKey] | None:
        """The registry keys that changed since the last push; None: start from scratch."""
        if self.latest is None:
            return None
        if snapshot is self._registry.current:
            keys = self._registry.changes_since(self.latest.registry_version)
            if keys is not None:
                return keys
        # a snapshot from elsewhere, or the change log no longer reaches back: compare every object
        before = self._state.snapshot
        return frozenset(k for k in before.keys() | snapshot.keys() if before.get_key(k) != snapshot.get_key(k))

    def _build(
        self, snapshot: RegistrySnapshot, keys: frozenset[ObjectKey] | None
    ) -> tuple[WdsChanges, TranslationOutputs]:
        delta = self._state.reset(snapshot) if keys is None else self._state.update(snapshot, keys)
        return wds_changes(self._state, delta), self._state.outputs()

    async def run(self) -> None:
        """Publish the current snapshot (unless already published), then every change, debounced."""
        if self.latest is None or self.latest.registry_version != self._registry.current.version:
            await self.publish(self._registry.current)
        assert self.latest is not None
        seen = self.latest.registry_version
        while True:
            await self._registry.wait_for_change(seen)
            origin = time.monotonic()  # wall time, whatever clock the debounce runs on (tests fake that one)
            pending = Debounce().record(self._clock())
            seen = self._registry.current.version
            pending, seen = await self._debounce(pending, seen)
            if self._metrics is not None and pending.first is not None:
                self._metrics.debounce_time.observe(self._clock() - pending.first)
            try:
                await self.publish(self._registry.current, origin)
            except Exception:
                # A bug in one translation keeps the last good configuration served; the next change retries.
                log.exception("publishing registry version %d failed", self._registry.current.version)

    async def _debounce(self, pending: Debounce, seen: int) -> tuple[Debounce, int]:
        """Wait until the pending changes are due, absorbing the changes that arrive meanwhile."""
        while not pending.due(self._clock(), self.tuning):
            deadline = pending.deadline(self.tuning)
            assert deadline is not None
            change = asyncio.ensure_future(self._registry.wait_for_change(seen))
            timer = asyncio.ensure_future(self._sleep(max(deadline - self._clock(), 0.0)))
            try:
                await asyncio.wait({change, timer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                change.cancel()
                timer.cancel()
            if self._registry.current.version != seen:
                seen = self._registry.current.version
                pending = pending.record(self._clock())
        return pending, seen
