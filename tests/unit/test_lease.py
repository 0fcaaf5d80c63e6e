"""The Lease elector: pure decisions as tables (time passed in), then whole electors on an in-memory store that
enforces resourceVersions the way the API server does, driven round by round on a hand-moved clock."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

import pytest

from tests.support.wait import eventually
from ztcore.lease import (
    LeaseConflict,
    LeaseElector,
    LeaseRecord,
    LeaseTiming,
    Observed,
    Wait,
    Write,
    decide,
    lease_body,
    observe,
    record_from_lease,
    release_record,
    still_leading,
)

T = LeaseTiming(duration=15, renew_deadline=10, retry=2)
WALL = dt.datetime(2026, 11, 26, 8, 0, 0, tzinfo=dt.UTC)
EARLIER = WALL - dt.timedelta(minutes=5)


def held(holder: str, *, rv: str = "7", seconds: int = 15, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, seconds, EARLIER, EARLIER, transitions, rv)


@pytest.mark.parametrize(
    ("case", "record", "since", "now", "expected"),
    [
        ("no Lease: create it", None, 0.0, 100.0, Write(LeaseRecord("me", 15, WALL, WALL, 0, ""), True, True)),
        (
            "ours: renew, keeping acquireTime and transitions",
            held("me"),
            0.0,
            100.0,
            Write(LeaseRecord("me", 15, EARLIER, WALL, 3, "7"), False, False),
        ),
        ("other, seen changing 14 s ago: wait 1 s more", held("other"), 86.0, 100.0, Wait("other", 1.0)),
        ("other, just renewed", held("other"), 100.0, 100.0, Wait("other", 15.0)),
        (
            "other, unchanged for its whole duration: take it over",
            held("other"),
            85.0,
            100.0,
            Write(LeaseRecord("me", 15, WALL, WALL, 4, "7"), False, True),
        ),
        (
            "the holder's own (shorter) duration counts",
            held("other", seconds=5),
            94.0,
            100.0,
            Write(LeaseRecord("me", 15, WALL, WALL, 4, "7"), False, True),
        ),
        (
            "released (no holder): take it at once",
            held(""),
            100.0,
            100.0,
            Write(LeaseRecord("me", 15, WALL, WALL, 4, "7"), False, True),
        ),
    ],
)
def test_decide(case: str, record: LeaseRecord | None, since: float, now: float, expected: Write | Wait) -> None:
    assert decide("me", Observed(record, since), now, WALL, T) == expected, case


def test_observe_restarts_the_clock_only_on_a_new_resource_version() -> None:
    first = observe(None, held("other", rv="1"), 10.0)
    assert first.since == 10.0
    # Same version read again later: expiry still counts from the first sighting.
    assert observe(first, held("other", rv="1"), 20.0) is first
    # A renewal (new version): counting starts over.
    assert observe(first, held("other", rv="2"), 20.0).since == 20.0
    # Absent, still absent: unchanged; absent -> present: new.
    gone = observe(None, None, 5.0)
    assert observe(gone, None, 9.0) is gone
    assert observe(gone, held("x"), 9.0).since == 9.0


@pytest.mark.parametrize(
    ("last_renew", "now", "leading"),
    [(None, 0.0, False), (100.0, 100.0, True), (100.0, 109.9, True), (100.0, 110.0, False), (100.0, 200.0, False)],
)
def test_still_leading_until_the_renew_deadline(last_renew: float | None, now: float, leading: bool) -> None:
    assert still_leading(last_renew, now, T) is leading


def test_release_clears_the_holder_and_keeps_the_count() -> None:
    assert release_record("me", held("me"), WALL) == LeaseRecord("", 1, WALL, WALL, 3, "7")
    assert release_record("me", held("other"), WALL) is None
    assert release_record("me", None, WALL) is None


@pytest.mark.parametrize(("duration", "renew", "retry"), [(10, 10, 2), (15, 10, 10), (15, 10, 0), (5, 10, 2)])
def test_timing_must_be_ordered(duration: float, renew: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry"):
        LeaseTiming(duration, renew, retry)


def test_lease_json_round_trip_uses_micro_time() -> None:
    record = LeaseRecord("ztd-0", 15, WALL, WALL + dt.timedelta(microseconds=5), 2, "42")
    body = lease_body("ztd-leader", "istio-system", record)
    # Six fraction digits even when they are zero: the API server's MicroTime needs them.
    assert body["spec"]["acquireTime"] == "2026-11-26T08:00:00.000000Z"
    assert body["spec"]["renewTime"] == "2026-11-26T08:00:00.000005Z"
    assert body["metadata"] == {"name": "ztd-leader", "namespace": "istio-system", "resourceVersion": "42"}
    assert record_from_lease(body) == record
    assert record_from_lease({"metadata": {"resourceVersion": "1"}, "spec": {}}) == LeaseRecord(resource_version="1")


# --- whole electors ---------------------------------------------------------------------------------------------


class MemoryStore:
    """One Lease with API-server semantics: create fails if it exists, update fails on a stale version."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.down: set[str] = set()  # identities cut off from the "API server"

    def client(self, identity: str) -> MemoryClient:
        return MemoryClient(self, identity)


@dataclasses.dataclass
class MemoryClient:
    server: MemoryStore
    identity: str

    def _check(self) -> None:
        if self.identity in self.server.down:
            raise ConnectionError("connection refused")

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.server.version += 1
        self.server.record = dataclasses.replace(record, resource_version=str(self.server.version))
        return self.server.record

    async def get(self) -> LeaseRecord | None:
        self._check()
        record = self.server.record
        await asyncio.sleep(0)  # lets concurrent rounds read before anyone writes, as on a real network
        return record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.server.record is not None:
            raise LeaseConflict("exists")
        return self._store(record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.server.record is None or record.resource_version != self.server.record.resource_version:
            raise LeaseConflict("stale")
        return self._store(record)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def electors(store: MemoryStore, clock: Clock, *names: str) -> list[LeaseElector]:
    return [LeaseElector(store.client(n), n, T, clock=clock, wall=lambda: WALL) for n in names]


async def test_two_candidates_one_leader_and_a_takeover_only_after_the_duration() -> None:
    store, clock = MemoryStore(), Clock()
    a, b = electors(store, clock, "a", "b")
    await a.round()
    await b.round()
    assert (a.is_leader, b.is_leader) == (True, False)
    assert store.record is not None and store.record.holder == "a" and store.record.transitions == 0
    # a renews every retry period; b never takes over however long that goes on.
    for _ in range(20):
        clock.now += T.retry
        await a.round()
        await b.round()
        assert (a.is_leader, b.is_leader) == (True, False)
    # a is cut off from the API server: it steps down at its renew deadline, before b may take over.
    store.down.add("a")
    cut = clock.now
    while clock.now - cut < T.duration + T.retry:
        clock.now += 0.5
        await a.round()
        a._check_deadline()
        await b.round()
        if clock.now - cut >= T.renew_deadline:
            assert not a.is_leader, "a still leads past its renew deadline"
        if b.is_leader:
            break
        assert store.record.holder == "a"
    assert b.is_leader and not a.is_leader
    # b took over once the Lease had been unchanged for the whole duration (b saw it last change at `cut`).
    assert T.duration <= clock.now - cut <= T.duration + T.retry
    assert store.record.holder == "b" and store.record.transitions == 1
    assert "connection refused" in a.last_error
    # a comes back: it reads b's Lease and stays a follower.
    store.down.clear()
    await a.round()
    assert not a.is_leader and a.holder == "b"


async def test_racing_writes_from_the_same_read_give_one_leader() -> None:
    store, clock = MemoryStore(), Clock()
    a, b, c = electors(store, clock, "a", "b", "c")
    # All three read "no Lease" before anyone writes: exactly one create succeeds.
    await asyncio.gather(a.round(), b.round(), c.round())
    assert sum(e.is_leader for e in (a, b, c)) == 1
    winner = next(e for e in (a, b, c) if e.is_leader)
    assert store.record is not None and store.record.holder == winner.identity
    assert {e.last_error for e in (a, b, c) if not e.is_leader} == {"the Lease changed under us"}


async def test_release_lets_a_standby_take_over_at_once() -> None:
    store, clock = MemoryStore(), Clock()
    a, b = electors(store, clock, "a", "b")
    await a.round()
    await b.round()
    await a.release()
    assert not a.is_leader and store.record is not None and store.record.holder == ""
    clock.now += T.retry  # far less than the duration
    await b.round()
    assert b.is_leader and store.record.holder == "b" and store.record.transitions == 1


async def test_duties_run_only_during_a_term() -> None:
    store, clock = MemoryStore(), Clock()
    (a,) = electors(store, clock, "a")
    log: list[str] = []
    started = asyncio.Event()

    async def duty() -> None:
        log.append("start")
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            log.append("stop")

    def start(tg: asyncio.TaskGroup) -> None:
        tg.create_task(duty())

    runner = asyncio.create_task(a.while_leading(start))
    try:
        await asyncio.sleep(0.01)
        assert log == []  # not leading yet
        await a.round()
        await asyncio.wait_for(started.wait(), 1)
        store.down.add("a")
        clock.now += T.renew_deadline
        a._check_deadline()
        await eventually(lambda: log == ["start", "stop"], within=1, what="the duty stopped with the term")
        assert not a.is_leader
        # A second term starts the duties afresh.
        started.clear()
        store.down.clear()
        await a.round()
        await asyncio.wait_for(started.wait(), 1)
        assert log == ["start", "stop", "start"] and a.terms == 2
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
    assert log[-1] == "stop"


async def test_run_steps_down_when_the_api_hangs() -> None:
    """A renewal that never answers must not keep a leader past its deadline (real clock, short timing)."""
    timing = LeaseTiming(duration=1.0, renew_deadline=0.4, retry=0.1)
    store = MemoryStore()
    hang = asyncio.Event()

    class Hanging(MemoryClient):
        async def get(self) -> LeaseRecord | None:
            if hang.is_set():
                await asyncio.Event().wait()
            return await super().get()

    elector = LeaseElector(Hanging(store, "a"), "a", timing)
    task = asyncio.create_task(elector.run())
    try:
        await asyncio.wait_for(elector.wait_leading(), 1)
        hang.set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.wait_for(elector.wait_term_end(), timing.renew_deadline + 0.5)
        assert loop.time() - start <= timing.renew_deadline + 0.2
        assert "did not answer" in elector.last_error
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
