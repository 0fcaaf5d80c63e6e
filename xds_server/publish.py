"""Registry → translation → versioned WDS resources in the engine's SnapshotCache (istiod's debounce + push).

Every registry change is debounced as istiod does (PILOT_DEBOUNCE_AFTER / PILOT_DEBOUNCE_MAX): the push
happens once nothing changed for `debounce_after`, or `debounce_max` after the first unpublished change,
whichever is first. Then the whole snapshot is translated (pure, in a worker thread) and published:

- `type.googleapis.com/istio.workload.Address`: workloads by uid, services by `<namespace>/<hostname>`, each
  with its `<network>/<ip>` aliases (the names ztunnel subscribes to on demand);
- `type.googleapis.com/istio.security.Authorization`: policies by `<namespace>/<name>`.

Versions are content hashes, so a resource whose content did not change keeps its version and no stream
resends it. A model object equal to one of the previous push reuses that push's `Resource`: each resource
is serialised once per version and the same bytes are shared by every client. Policies are published before
addresses, so a workload never names a policy its clients have not received yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass

from xds_server.registry.store import Registry, RegistrySnapshot
from xds_server.translate import TranslateOptions, Translation, translate
from ztcore.metrics import Registry as MetricsRegistry
from ztcore.xds import typeurls
from ztcore.xds.cache import SnapshotCache
from ztcore.xds.resources import Resource

log = logging.getLogger(__name__)

WDS_TYPES = (typeurls.AUTHORIZATION, typeurls.ADDRESS)  # publishing order: policies first

ResourceMemo = Mapping[Hashable, Resource]
Listener = Callable[[Translation], Awaitable[None]]


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


# -- pure: translation → resources -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WdsResources:
    by_type: Mapping[str, tuple[Resource, ...]]
    memo: ResourceMemo  # model object -> its packed resource, for the next push to reuse
    reused: int  # how many resources came from the previous memo (not serialised again)


def wds_resources(translation: Translation, previous: ResourceMemo | None = None) -> WdsResources:
    """Pack every workload, service and policy; equal model objects reuse the previous push's resource."""
    old = previous or {}
    memo: dict[Hashable, Resource] = {}
    addresses: list[Resource] = []
    policies: list[Resource] = []
    for w in translation.workloads:
        found = old.get(w)
        memo[w] = found if found is not None else Resource.pack(w.uid, w.to_address_pb(), aliases=w.aliases())
        addresses.append(memo[w])
    for s in translation.services:
        found = old.get(s)
        memo[s] = found if found is not None else Resource.pack(s.key, s.to_address_pb(), aliases=s.aliases())
        addresses.append(memo[s])
    for a in translation.authorizations:
        found = old.get(a)
        memo[a] = found if found is not None else Resource.pack(a.key, a.to_pb())
        policies.append(memo[a])
    reused = sum(1 for model in memo if model in old)
    return WdsResources({typeurls.AUTHORIZATION: tuple(policies), typeurls.ADDRESS: tuple(addresses)}, memo, reused)


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


@dataclass(frozen=True, slots=True)
class Published:
    """What the latest push installed."""

    registry_version: int
    translation: Translation
    changed: Mapping[str, frozenset[str]]  # type URL -> names added, updated or removed


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
        self._memo: ResourceMemo = {}
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
        """Awaited after each push with the new translation (Envoy proxies rebuild from it)."""
        self._listeners.append(listener)

    async def publish(self, snapshot: RegistrySnapshot, origin: float | None = None) -> Published:
        """Translate and pack off the loop, then install on the loop (the cache is single-threaded).
        `origin`: time.monotonic() of the first change this push carries, for convergence metrics."""
        async with self._lock:
            started = self._clock()
            translation, wds = await asyncio.to_thread(self._build, snapshot, self._memo)
            changed: dict[str, frozenset[str]] = {}
            for type_url in WDS_TYPES:
                changed[type_url] = self._cache.set_resources(type_url, wds.by_type[type_url], origin=origin)
            self._memo = wds.memo
            self.latest = Published(snapshot.version, translation, changed)
            for listener in list(self._listeners):
                try:
                    await listener(translation)
                except Exception:  # one failing listener must not stop the push to the others
                    log.exception("a listener failed on registry version %d", snapshot.version)
            if self._metrics is not None:
                self._metrics.pushes.inc()
                self._metrics.publish_time.observe(self._clock() - started)
                for type_url in WDS_TYPES:
                    kind = typeurls.short_name(type_url)
                    self._metrics.resources.set(float(len(wds.by_type[type_url])), type=kind)
            self.published.set()
            log.info(
                "published registry version %d: %d workloads, %d services, %d policies (%d changed, %d reused)",
                snapshot.version,
                len(translation.workloads),
                len(translation.services),
                len(translation.authorizations),
                sum(len(n) for n in changed.values()),
                wds.reused,
            )
            return self.latest

    def _build(self, snapshot: RegistrySnapshot, memo: ResourceMemo) -> tuple[Translation, WdsResources]:
        translation = translate(snapshot, self._options)
        return translation, wds_resources(translation, memo)

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
