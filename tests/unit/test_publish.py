"""Publishing: istiod's debounce as a pure state machine, translation -> resources (content versions, reuse of
unchanged resources), and the Publisher loop driven by an injected clock and sleep."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from xds_server.publish import Debounce, Published, Publisher, PushTuning
from ztcore.mesh.registry.parse import parse_text
from ztcore.mesh.registry.store import Registry, RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, Translation, translate
from ztcore.xds import typeurls
from ztcore.xds.cache import SnapshotCache

TUNING = PushTuning(debounce_after=0.1, debounce_max=1.0)


# -- debounce --------------------------------------------------------------------------------------------------


def test_nothing_pending_is_never_due() -> None:
    assert Debounce().deadline(TUNING) is None
    assert not Debounce().due(100.0, TUNING)


@pytest.mark.parametrize(
    ("events", "now", "due", "deadline"),
    [
        ([0.0], 0.05, False, 0.1),  # quiet time not over
        ([0.0], 0.1, True, 0.1),  # 100 ms of quiet: push
        ([0.0, 0.08], 0.15, False, 0.18),  # a new change restarts the quiet time
        ([0.0, 0.08], 0.18, True, 0.18),
        ([i * 0.05 for i in range(30)], 0.99, False, 1.0),  # changes keep coming…
        ([i * 0.05 for i in range(30)], 1.0, True, 1.0),  # …but no longer than debounce_max after the first
    ],
)
def test_debounce_after_and_max(events: list[float], now: float, due: bool, deadline: float) -> None:
    state = Debounce()
    for t in events:
        state = state.record(t)
    assert state.first == events[0] and state.last == events[-1]
    assert state.deadline(TUNING) == pytest.approx(deadline)
    assert state.due(now, TUNING) is due


def test_zero_debounce_pushes_at_once() -> None:
    assert Debounce().record(5.0).due(5.0, PushTuning(0.0, 0.0))


def test_negative_tuning_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        PushTuning(-1, 10)


# -- translation -> resources ----------------------------------------------------------------------------------

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: a}}
spec: {serviceAccountName: a, nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: b}}
spec: {serviceAccountName: b, nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: a}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-b, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/b]}}]}]}
"""


def objects(text: str = MESH) -> list[object]:
    result = parse_text(text, "mesh.yaml")
    assert not result.errors, result.errors
    return list(result.objects)


def translated(text: str = MESH) -> Translation:
    return translate(RegistrySnapshot(objects(text)), TranslateOptions())


async def published(text: str = MESH) -> tuple[Publisher, SnapshotCache]:
    cache = SnapshotCache()
    publisher = Publisher(Registry(objects(text)), cache, options=TranslateOptions())
    await publisher.publish(publisher.registry.current)
    return publisher, cache


async def test_resources_are_named_and_aliased_as_istiod() -> None:
    _, cache = await published()
    addresses = dict(cache.resources(typeurls.ADDRESS))
    assert sorted(addresses) == ["Kubernetes//Pod/shop/a", "Kubernetes//Pod/shop/b", "shop/a.shop.svc.cluster.local"]
    assert addresses["Kubernetes//Pod/shop/a"].aliases == ("/10.0.0.1",)
    assert addresses["shop/a.shop.svc.cluster.local"].aliases == ("/10.96.0.1",)
    assert list(cache.resources(typeurls.AUTHORIZATION)) == ["shop/deny-b"]
    assert all(r.type_url == typeurls.ADDRESS for r in addresses.values())


async def test_a_change_repacks_and_reinstalls_only_what_it_touched() -> None:
    publisher, cache = await published()
    before = dict(cache.resources(typeurls.ADDRESS))
    policies = dict(cache.resources(typeurls.AUTHORIZATION))
    # Pod b moves: only its workload changes version; a and the service keep theirs (and their objects).
    publisher.registry.replace(objects(MESH.replace("podIP: 10.0.0.2", "podIP: 10.0.0.3")))
    push = await publisher.publish(publisher.registry.current)
    after = dict(cache.resources(typeurls.ADDRESS))
    assert push.changed == {typeurls.ADDRESS: {"Kubernetes//Pod/shop/b"}, typeurls.AUTHORIZATION: frozenset()}
    assert push.rebuilt == 1
    assert after["Kubernetes//Pod/shop/b"].version != before["Kubernetes//Pod/shop/b"].version
    assert after["Kubernetes//Pod/shop/b"].aliases == ("/10.0.0.3",)
    for name in ("Kubernetes//Pod/shop/a", "shop/a.shop.svc.cluster.local"):
        assert after[name] is before[name]  # not rebuilt, not re-serialised
    assert dict(cache.resources(typeurls.AUTHORIZATION)) == policies
    assert cache.get(typeurls.ADDRESS, "/10.0.0.2") is None and cache.get(typeurls.ADDRESS, "/10.0.0.3") is not None


async def test_versions_are_content_hashes_not_counters() -> None:
    _, one = await published()
    _, two = await published()
    assert {n: r.version for n, r in one.resources(typeurls.ADDRESS).items()} == {
        n: r.version for n, r in two.resources(typeurls.ADDRESS).items()
    }


# -- the Publisher loop with injected time ---------------------------------------------------------------------


@dataclass
class FakeTime:
    now: float = 0.0
    sleepers: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + delay, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for when, fut in list(self.sleepers):
            if when <= self.now + 1e-9 and not fut.done():
                fut.set_result(None)
        self.sleepers = [(w, f) for w, f in self.sleepers if not f.done()]
        for _ in range(5):
            await asyncio.sleep(0)


@dataclass
class Harness:
    registry: Registry
    cache: SnapshotCache
    time: FakeTime
    publisher: Publisher
    pushes: list[tuple[float, Translation]]
    pushed: asyncio.Event

    async def settle(self) -> None:
        """Let a push that was triggered finish (it translates in a worker thread)."""
        await asyncio.sleep(0.05)

    async def change(self, text: str) -> None:
        """A registry change at the current fake time (the publisher sees it before time moves on)."""
        self.registry.replace(objects(text))
        for _ in range(5):
            await asyncio.sleep(0)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    registry = Registry(objects())
    cache = SnapshotCache()
    time = FakeTime()
    publisher = Publisher(
        registry, cache, options=TranslateOptions(), tuning=TUNING, clock=time.clock, sleep=time.sleep
    )
    pushes: list[tuple[float, Translation]] = []
    pushed = asyncio.Event()

    async def listener(push: Published) -> None:
        pushes.append((time.now, push.translation))
        pushed.set()

    publisher.add_listener(listener)
    task = asyncio.create_task(publisher.run())
    await asyncio.wait_for(pushed.wait(), 5)
    try:
        yield Harness(registry, cache, time, publisher, pushes, pushed)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _pod_ip(t: Translation, name: str) -> str:
    return next(str(w.addresses[0]) for w in t.workloads if w.name == name)


async def test_initial_snapshot_is_published_at_once(harness: Harness) -> None:
    assert len(harness.pushes) == 1
    assert sorted(harness.cache.resources(typeurls.ADDRESS)) == [
        "Kubernetes//Pod/shop/a",
        "Kubernetes//Pod/shop/b",
        "shop/a.shop.svc.cluster.local",
    ]
    assert list(harness.cache.resources(typeurls.AUTHORIZATION)) == ["shop/deny-b"]


async def test_burst_of_changes_is_one_push_after_the_quiet_time(harness: Harness) -> None:
    await harness.change(MESH.replace("10.0.0.2", "10.0.0.3"))
    await harness.time.advance(0.05)
    await harness.change(MESH.replace("10.0.0.2", "10.0.0.4"))
    await harness.time.advance(0.09)  # t=0.14: 90 ms after the latest change
    await harness.settle()
    assert len(harness.pushes) == 1
    await harness.time.advance(0.02)  # t=0.16: 110 ms of quiet
    await harness.settle()
    assert len(harness.pushes) == 2
    at, translation = harness.pushes[-1]
    assert at == pytest.approx(0.16)
    assert _pod_ip(translation, "b") == "10.0.0.4"  # the latest state, not each intermediate one
    assert harness.cache.get(typeurls.ADDRESS, "/10.0.0.4") is not None


async def test_changes_that_never_stop_are_pushed_at_debounce_max(harness: Harness) -> None:
    for i in range(30):
        await harness.change(MESH.replace("10.0.0.2", f"10.0.1.{i}"))
        await harness.time.advance(0.05)
        await asyncio.sleep(0.005)
        if harness.time.now < 0.99:
            assert len(harness.pushes) == 1, f"pushed early at t={harness.time.now}"
    await harness.settle()
    assert len(harness.pushes) >= 2
    assert harness.pushes[1][0] == pytest.approx(1.0, abs=0.051)


async def test_identical_content_is_no_push(harness: Harness) -> None:
    revision = harness.cache.revision
    await harness.change(MESH)  # same digest: the registry keeps its snapshot and wakes nobody
    await harness.time.advance(0.2)
    await harness.settle()
    assert len(harness.pushes) == 1 and harness.cache.revision == revision


async def test_a_policy_not_enforced_as_written_is_logged_once_when_its_status_appears(
    caplog: pytest.LogCaptureFixture,
) -> None:
    l7 = (
        MESH
        + """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin*]}}]}]}
"""
    )
    publisher, _ = await published()
    caplog.set_level(logging.INFO, logger="xds_server.publish")
    publisher.registry.replace(objects(l7))
    await publisher.publish(publisher.registry.current)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("AuthorizationPolicy shop/deny-admin: ztunnel does not support")
    caplog.clear()
    publisher.registry.replace(objects(l7.replace("podIP: 10.0.0.2", "podIP: 10.0.0.3")))
    await publisher.publish(publisher.registry.current)  # the status did not change: nothing said
    assert [r for r in caplog.records if "AuthorizationPolicy" in r.getMessage()] == []
    publisher.registry.replace(objects(MESH))
    await publisher.publish(publisher.registry.current)
    said = [r.getMessage() for r in caplog.records if "AuthorizationPolicy" in r.getMessage()]
    assert said == ["AuthorizationPolicy shop/deny-admin: no status message any more"]
