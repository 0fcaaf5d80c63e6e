"""SecretManager: one workload certificate per identity, renewed like pilot-agent renews its own.

- Keys are generated in memory, off the event loop (ECDSA P-256 by default, RSA 2048 as an option), and
  are never written anywhere by this module.
- Renewal at `grace_ratio` of the lifetime measured from when we received the certificate, with ±jitter
  (istio security/pkg/nodeagent/cache/secretcache.go rotateTime); `rotate_delay` is the pure formula.
- A failed renewal keeps the current certificate and retries with exponential backoff 500 ms → 150 s.
- The trust bundle comes from the CA's answers and from the root file the agent watches; whichever
  changed last wins. A change seen in the root file also renews every certificate at once, so leaves
  follow a CA that switched roots (Istio clears its cache on a trust-bundle change for the same reason).
- Listeners hear every new certificate, bundle and drop; the SDS source turns them into Envoy secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from ztcore.backoff import Backoff
from ztcore.identity import Identity
from ztcore.identity.caclient import (
    KEY_TYPES,
    CAClientError,
    PrivateKey,
    build_csr,
    generate_key,
    private_key_pem,
    verify_identity,
)
from ztcore.metrics import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    ttl: dt.timedelta = dt.timedelta(hours=24)
    grace_ratio: float = 0.5
    grace_jitter: float = 0.01
    backoff_initial: float = 0.5
    backoff_max: float = 150.0
    key_type: str = "ecdsa-p256"
    # An identity no stream asks for any more is kept until its next renewal time, then dropped.

    def __post_init__(self) -> None:
        if self.ttl.total_seconds() < 1:
            raise ValueError("secret TTL must be at least 1s")
        if not 0.0 <= self.grace_ratio <= 1.0:
            raise ValueError(f"grace ratio {self.grace_ratio} is not within [0, 1]")
        if not 0.0 <= self.grace_jitter <= 1.0:
            raise ValueError(f"grace ratio jitter {self.grace_jitter} is not within [0, 1]")
        if self.key_type not in KEY_TYPES:
            raise ValueError(f"key type {self.key_type!r} is not one of {', '.join(KEY_TYPES)}")


def jittered_ratio(ratio: float, jitter: float, rng: random.Random) -> float:
    """ratio ± rand[0,1)·jitter, clamped to [0, 1] (pilot-agent's draw)."""
    sign = rng.choice((-1.0, 1.0))
    return min(max(ratio + rng.random() * jitter * sign, 0.0), 1.0)


def rotate_delay(created: dt.datetime, expire: dt.datetime, now: dt.datetime, grace_ratio: float) -> dt.timedelta:
    """How long until renewal: expire - ratio * (expire - created) - now, never negative. Pure."""
    grace = (expire - created) * grace_ratio
    return max(expire - grace - now, dt.timedelta(0))


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    identity: Identity
    chain_pem: bytes  # leaf first, then intermediates; no roots
    key_pem: bytes = field(repr=False)
    roots_pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    created: dt.datetime  # when the CA answered (the base of the renewal time, as pilot-agent)


@dataclass(frozen=True, slots=True)
class SecretEvent:
    kind: str  # "cert", "roots", "failed" or "dropped"
    identity: Identity | None = None
    cert: WorkloadCert | None = None
    roots_pem: bytes = b""
    at: float = 0.0  # time.monotonic() when it happened (benchmarks measure from here)
    error: str = ""


SecretListener = Callable[[SecretEvent], None]


class CertificateSigner(Protocol):
    async def create_certificate(
        self, csr_pem: str, ttl_seconds: int, *, impersonate: Identity | None = None
    ) -> list[str]: ...


class _Slot:
    """The mutable state of one identity; owned by its worker task."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.refs = 0
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.cert: WorkloadCert | None = None
        self.failures = 0


class AgentMetrics:
    """Istio's node-agent series (security/pkg/nodeagent/cache/monitoring.go)."""

    def __init__(self, registry: Registry) -> None:
        self.outgoing = registry.counter(
            "num_outgoing_requests", "Number of total outgoing requests (e.g. to a token exchange server, CA, etc.)"
        )
        self.failed = registry.counter(
            "num_failed_outgoing_requests",
            "Number of failed outgoing requests (e.g. to a token exchange server, CA, etc.)",
        )
        self.latency = registry.histogram(
            "outgoing_latency",
            "The latency of outgoing requests (e.g. to a token exchange server, CA, etc.) in seconds.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class SecretManager:
    def __init__(
        self,
        ca: CertificateSigner,
        policy: RotationPolicy,
        *,
        credential_identity: Identity | None,
        keep: Identity | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        rng: random.Random | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        """`credential_identity`: whom our token/cert names (other identities are impersonated); `keep`:
        an identity renewed for as long as the manager runs, streams or not (the agent's own)."""
        self._ca = ca
        self.policy = policy
        self._credential_identity = credential_identity
        self._keep = keep
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter spreads load, it is not a secret
        self._metrics = metrics
        self._slots: dict[Identity, _Slot] = {}
        self._listeners: list[SecretListener] = []
        self._roots: bytes | None = None
        self._root_sources: dict[str, bytes] = {}
        self._tg: asyncio.TaskGroup | None = None
        if keep is not None:
            self._slots[keep] = _Slot(keep)

    # -- public -------------------------------------------------------------------------------------

    def add_listener(self, listener: SecretListener) -> None:
        self._listeners.append(listener)
        if self._roots is not None:
            listener(SecretEvent("roots", roots_pem=self._roots, at=time.monotonic()))
        for slot in self._slots.values():
            if slot.cert is not None:
                listener(SecretEvent("cert", slot.identity, slot.cert, at=time.monotonic()))

    @property
    def roots_pem(self) -> bytes | None:
        return self._roots

    def current(self, identity: Identity) -> WorkloadCert | None:
        slot = self._slots.get(identity)
        return slot.cert if slot is not None else None

    def identities(self) -> list[Identity]:
        return list(self._slots)

    def acquire(self, identity: Identity) -> None:
        """A stream wants this identity's certificate: start (or keep) renewing it."""
        slot = self._slots.get(identity)
        if slot is None:
            slot = self._slots[identity] = _Slot(identity)
        slot.refs += 1
        self._start(slot)

    def release(self, identity: Identity) -> None:
        slot = self._slots.get(identity)
        if slot is not None and slot.refs > 0:
            slot.refs -= 1

    def renew_now(self, identity: Identity | None = None) -> None:
        """Renew one identity (or all) now instead of at the scheduled time."""
        for slot in self._slots.values():
            if identity is None or slot.identity == identity:
                slot.wake.set()

    def update_roots(self, source: str, pem: bytes) -> None:
        """A trust bundle seen in `source` ("ca" answers or the root "file"); the last change wins."""
        if not pem.strip() or self._root_sources.get(source) == pem:
            return
        self._root_sources[source] = pem
        if pem == self._roots:
            return
        try:
            count = len(x509.load_pem_x509_certificates(pem))
        except ValueError:
            log.warning("ignoring a trust bundle from %s that is not PEM certificates", source)
            return
        first = self._roots is None
        self._roots = pem
        log.info("trust bundle %s from %s: %d root(s)", "loaded" if first else "changed", source, count)
        self._emit(SecretEvent("roots", roots_pem=pem, at=time.monotonic()))
        if source == "file" and not first:
            self.renew_now()

    async def run(self) -> None:
        """Own the renewal workers until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for slot in self._slots.values():
                self._start(slot)
            try:
                await asyncio.Future()
            finally:
                self._tg = None

    # -- internals -----------------------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        if self._tg is not None and (slot.task is None or slot.task.done()):
            slot.task = self._tg.create_task(self._worker(slot), name=f"cert {slot.identity}")

    def _emit(self, event: SecretEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop renewals
                log.exception("secret listener failed")

    def _idle(self, slot: _Slot) -> bool:
        return slot.refs == 0 and slot.identity != self._keep

    async def _sleep(self, slot: _Slot, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slot.wake.wait(), timeout=max(seconds, 0.0))
        slot.wake.clear()

    async def _worker(self, slot: _Slot) -> None:
        backoff = Backoff(self.policy.backoff_initial, self.policy.backoff_max)
        while True:
            if slot.cert is not None and self._idle(slot):
                break
            try:
                cert, received = await self._issue(slot.identity)
            except CAClientError as err:
                slot.failures += 1
                self._emit(SecretEvent("failed", slot.identity, at=time.monotonic(), error=str(err)))
                keeping = (
                    f"keeping the current one until {slot.cert.not_after.isoformat()}" if slot.cert else "none yet"
                )
                retry_in = backoff.delay(slot.failures)
                log.warning(
                    "certificate for %s not issued (%s); retry in %.1fs, %s", slot.identity, err, retry_in, keeping
                )
                await self._sleep(slot, retry_in)
                continue
            slot.failures = 0
            slot.cert = cert
            # Roots first: a peer should trust a new root before anyone presents a leaf signed by it.
            self.update_roots("ca", cert.roots_pem)
            self._emit(SecretEvent("cert", slot.identity, cert, at=received))
            ratio = jittered_ratio(self.policy.grace_ratio, self.policy.grace_jitter, self._rng)
            delay = rotate_delay(cert.created, cert.not_after, self._clock(), ratio)
            log.info(
                "certificate for %s issued: serial %x, expires %s, renewal in %.1fs",
                slot.identity,
                cert.serial,
                cert.not_after.isoformat(),
                delay.total_seconds(),
            )
            await self._sleep(slot, delay.total_seconds())
        log.info("no stream wants %s any more; dropping its certificate", slot.identity)
        self._slots.pop(slot.identity, None)
        self._emit(SecretEvent("dropped", slot.identity, at=time.monotonic()))

    async def _issue(self, identity: Identity) -> tuple[WorkloadCert, float]:
        key, csr = await asyncio.to_thread(self._keypair, identity)
        impersonate = identity if self._credential_identity not in (None, identity) else None
        started = time.monotonic()
        if self._metrics is not None:
            self._metrics.outgoing.inc(request_type="csr")
        try:
            chain = await self._ca.create_certificate(
                csr, int(self.policy.ttl.total_seconds()), impersonate=impersonate
            )
        except CAClientError:
            if self._metrics is not None:
                self._metrics.failed.inc(request_type="csr")
            raise
        received = time.monotonic()
        if self._metrics is not None:
            self._metrics.latency.observe(received - started)
        leaf = verify_identity(chain, identity)
        now = self._clock()
        if leaf.not_valid_after_utc <= now:
            raise CAClientError(f"CA answered with a certificate that expired at {leaf.not_valid_after_utc}")
        cert = WorkloadCert(
            identity=identity,
            chain_pem="".join(chain[:-1]).encode(),
            key_pem=private_key_pem(key),
            roots_pem=chain[-1].encode(),
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            created=now,
        )
        return cert, received

    def _keypair(self, identity: Identity) -> tuple[PrivateKey, str]:
        key = generate_key(self.policy.key_type)
        return key, build_csr(key, identity)
