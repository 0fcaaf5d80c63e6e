"""Leader election on a coordination.k8s.io/v1 Lease, with client-go's leaderelection semantics.

Three parts: `decide()` is pure (the Lease as read, when we first saw that version, `now` in; what to write
out); `LeaseElector` does the rounds through a `LeaseStore` and runs singleton duties in a TaskGroup while it
leads; `KubeLeaseStore` is the Kubernetes store (optimistic concurrency: every update carries the
resourceVersion it read, so of two replicas racing for an expired Lease exactly one write succeeds).

Timing, as client-go's:
- lease duration: a follower takes over a Lease that has not changed for this long (measured on its own
  monotonic clock from when it saw the change, never from the record's renewTime, so skew does not matter);
- renew deadline: a leader that has not renewed for this long steps down and stops its duties; it is shorter
  than the duration, so the old leader has stopped before anyone may take over;
- retry period: how often a leader renews and a follower re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

LEASE_NAME = "ztd-leader"
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime (RFC 3339, exactly six fraction digits)


class LeaseConflict(Exception):
    """The Lease changed (or appeared) between our read and our write: read again next round."""


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry < self.renew_deadline < self.duration:
            raise ValueError(
                f"lease timing needs 0 < retry ({self.retry:g}s) < renew deadline ({self.renew_deadline:g}s) "
                f"< duration ({self.duration:g}s)"
            )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The spec of a Lease plus its resourceVersion ("" for a record not stored yet)."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class Observed:
    """A Lease as last read (None: there is none) and the monotonic time this version was first seen."""

    record: LeaseRecord | None
    since: float


@dataclass(frozen=True, slots=True)
class Write:
    record: LeaseRecord
    create: bool  # no Lease object yet
    acquire: bool  # taking it over (else renewing our own)


@dataclass(frozen=True, slots=True)
class Wait:
    holder: str
    expires_in: float  # seconds until the holder's lease runs out, unless it renews


Decision = Write | Wait


def observe(previous: Observed | None, current: LeaseRecord | None, now: float) -> Observed:
    """Keep `since` while the Lease is unchanged (same resourceVersion); restart it on any change."""
    if previous is not None:
        before = previous.record
        if (before is None and current is None) or (
            before is not None and current is not None and before.resource_version == current.resource_version
        ):
            return previous
    return Observed(current, now)


def decide(identity: str, observed: Observed, now: float, wall: dt.datetime, timing: LeaseTiming) -> Decision:
    """What to write this round. Pure: `now` is monotonic seconds, `wall` the time written into the record."""
    seconds = max(1, math.ceil(timing.duration))  # whole seconds on the wire; rounding up stays safe
    current = observed.record
    if current is None:
        return Write(LeaseRecord(identity, seconds, wall, wall, 0, ""), create=True, acquire=True)
    if current.holder == identity:
        renewed = dataclasses.replace(current, duration_seconds=seconds, renew_time=wall)
        return Write(renewed, create=False, acquire=False)
    if current.holder:
        # The holder's own leaseDurationSeconds counts (its settings may differ from ours).
        expires_in = observed.since + (current.duration_seconds or seconds) - now
        if expires_in > 0:
            return Wait(current.holder, expires_in)
    taken = LeaseRecord(identity, seconds, wall, wall, current.transitions + 1, current.resource_version)
    return Write(taken, create=False, acquire=True)


def release_record(identity: str, current: LeaseRecord | None, wall: dt.datetime) -> LeaseRecord | None:
    """The record that gives our Lease up (no holder, 1 s), as client-go releases; None if we do not hold it."""
    if current is None or current.holder != identity:
        return None
    return LeaseRecord("", 1, wall, wall, current.transitions, current.resource_version)


def still_leading(last_renew: float | None, now: float, timing: LeaseTiming) -> bool:
    """A leader leads until its renew deadline passes without a successful renewal."""
    return last_renew is not None and now - last_renew < timing.renew_deadline


# --- IO -----------------------------------------------------------------------------------------------------


class LeaseStore(Protocol):
    """Where the Lease lives; `create`/`update` return the stored record (with its new resourceVersion) and
    raise LeaseConflict when someone else wrote first."""

    async def get(self) -> LeaseRecord | None: ...

    async def create(self, record: LeaseRecord) -> LeaseRecord: ...

    async def update(self, record: LeaseRecord) -> LeaseRecord: ...


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _SteppedDown(Exception):
    """Ends the duties' TaskGroup when a term ends."""


class LeaseElector:
    """Campaigns for the Lease every retry period; `while_leading(start)` runs duties during each term."""

    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        timing: LeaseTiming,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utcnow,
        describe_error: Callable[[BaseException], str] = str,
    ) -> None:
        self.store = store
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._wall = wall
        self._describe = describe_error
        self._observed: Observed | None = None
        self._last_renew: float | None = None
        self._expires_in: float | None = None
        self._leading = asyncio.Event()
        self._term_end = asyncio.Event()
        self._term_end.set()  # no term yet
        self.terms = 0  # how many times this replica became leader
        self.last_error = ""

    @property
    def is_leader(self) -> bool:
        return self._leading.is_set()

    @property
    def holder(self) -> str:
        """The holder as last read or written ("" when none or unknown)."""
        record = self._observed.record if self._observed is not None else None
        return record.holder if record is not None else ""

    def status(self) -> dict[str, Any]:
        record = self._observed.record if self._observed is not None else None
        return {
            "identity": self.identity,
            "leader": self.is_leader,
            "holder": self.holder,
            "terms": self.terms,
            "lease_transitions": record.transitions if record is not None else None,
            "renew_time": record.renew_time.strftime(MICRO_TIME) if record and record.renew_time else None,
            "timing": dataclasses.asdict(self.timing),
            "last_error": self.last_error,
        }

    async def wait_leading(self) -> None:
        await self._leading.wait()

    async def wait_term_end(self) -> None:
        """Returns when the current term ends (at once when not leading)."""
        await self._term_end.wait()

    async def run(self) -> None:
        """Rounds until cancelled. Resumable: a second run() continues the same campaign."""
        while True:
            self._check_deadline()
            budget = self.timing.renew_deadline
            if self._last_renew is not None and self.is_leader:
                # A hung API call must not keep a leader past its deadline.
                budget = max(0.01, self._last_renew + self.timing.renew_deadline - self._clock())
            try:
                async with asyncio.timeout(budget):
                    await self.round()
            except TimeoutError:
                self._failed("the API server did not answer in time")
            self._check_deadline()
            delay = self.timing.retry
            if self._expires_in is not None:
                # Wake when the holder's lease would run out rather than up to a retry period later.
                delay = min(delay, max(0.01, self._expires_in))
                self._expires_in = None
            if self.is_leader and self._last_renew is not None:
                delay = min(delay, max(0.01, self._last_renew + self.timing.renew_deadline - self._clock()))
            await asyncio.sleep(delay)

    async def round(self) -> None:
        """One read-decide-write round."""
        started = self._clock()
        try:
            current = await self.store.get()
            self._observed = observe(self._observed, current, self._clock())
            decision = decide(self.identity, self._observed, self._clock(), self._wall(), self.timing)
            if isinstance(decision, Wait):
                self._expires_in = decision.expires_in
                self._last_renew = None
                self._set_leading(False, f"{decision.holder} holds the Lease")
                self.last_error = ""
                return
            stored = await (self.store.create if decision.create else self.store.update)(decision.record)
        except LeaseConflict:
            self._failed("the Lease changed under us")
            return
        except Exception as err:  # the API server is down or refuses: retried next round
            self._failed(self._describe(err))
            return
        self._observed = Observed(stored, self._clock())
        self._last_renew = started
        self.last_error = ""
        self._set_leading(True, "acquired" if decision.acquire else "renewed")

    async def release(self) -> None:
        """Give the Lease up at a clean shutdown, so a standby takes over at once instead of after the duration."""
        was_leader = self.is_leader
        self._last_renew = None
        self._set_leading(False, "shutting down")
        if not was_leader or self._observed is None:
            return
        record = release_record(self.identity, self._observed.record, self._wall())
        if record is None:
            return
        try:
            async with asyncio.timeout(self.timing.renew_deadline):
                self._observed = Observed(await self.store.update(record), self._clock())
            log.info("released the Lease")
        except Exception as err:  # TimeoutError included
            log.warning("could not release the Lease: %s", self._describe(err))

    async def while_leading(self, start: Callable[[asyncio.TaskGroup], None]) -> None:
        """For each term: `start(tg)` creates the duties in a fresh TaskGroup, cancelled when the term ends."""
        while True:
            await self._leading.wait()
            term_end = self._term_end
            if term_end.is_set():  # the term ended before we got here; wait for the next one
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.TaskGroup() as tg:
                    start(tg)
                    await term_end.wait()
                    raise _SteppedDown
            except* _SteppedDown:
                log.info("leader duties stopped")

    def _check_deadline(self) -> None:
        if self.is_leader and not still_leading(self._last_renew, self._clock(), self.timing):
            self._last_renew = None
            self._set_leading(False, f"no renewal within {self.timing.renew_deadline:g}s")

    def _failed(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("Lease %s: %s", "renewal" if self.is_leader else "acquisition", reason)
        self.last_error = reason

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading == self.is_leader:
            return
        if leading:
            self.terms += 1
            self._term_end = asyncio.Event()
            self._leading.set()
            log.info("%s is now the leader (%s)", self.identity, why)
        else:
            self._leading.clear()
            self._term_end.set()
            log.info("%s stepped down: %s", self.identity, why)


# --- Kubernetes -------------------------------------------------------------------------------------------------


def _micro(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).strftime(MICRO_TIME) if value is not None else None


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return None


def record_from_lease(body: dict[str, Any]) -> LeaseRecord:
    """A Lease (JSON) -> LeaseRecord. Pure."""
    spec = body.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
        resource_version=str((body.get("metadata") or {}).get("resourceVersion") or ""),
    )


def lease_body(name: str, namespace: str, record: LeaseRecord) -> dict[str, Any]:
    """LeaseRecord -> Lease JSON; times as MicroTime strings (the client's datetime encoding drops the
    fraction when it is zero, which the API server refuses)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if record.resource_version:
        meta["resourceVersion"] = record.resource_version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": record.holder,
            "leaseDurationSeconds": record.duration_seconds,
            "acquireTime": _micro(record.acquire_time),
            "renewTime": _micro(record.renew_time),
            "leaseTransitions": record.transitions,
        },
    }


class KubeLeaseStore:
    """A Lease in the API server, through a `kubernetes.client.ApiClient` (blocking calls run on threads)."""

    def __init__(self, api: Any, namespace: str, name: str = LEASE_NAME, *, request_timeout: float = 5.0) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._timeout = request_timeout

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        params = self._api.param_serialize(
            method=method,
            resource_path=path,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._api.call_api(*params, _request_timeout=self._timeout)
        resp.read()
        if resp.status == 404 and method == "GET":
            return None
        if resp.status == 409:
            raise LeaseConflict(f"Lease {self.namespace}/{self.name} changed")
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=resp.data.decode(errors="replace"), data=None)
        return dict(json.loads(resp.data))

    @property
    def _collection(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"

    async def get(self) -> LeaseRecord | None:
        body = await asyncio.to_thread(self._request, "GET", f"{self._collection}/{self.name}")
        return record_from_lease(body) if body is not None else None

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        body = lease_body(self.name, self.namespace, dataclasses.replace(record, resource_version=""))
        stored = await asyncio.to_thread(self._request, "POST", self._collection, body)
        assert stored is not None
        return record_from_lease(stored)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        body = lease_body(self.name, self.namespace, record)
        stored = await asyncio.to_thread(self._request, "PUT", f"{self._collection}/{self.name}", body)
        assert stored is not None
        return record_from_lease(stored)
