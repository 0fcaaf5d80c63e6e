"""A new generation of a tunnel, as both roles make it: the handshake's plan, the SAs and pair policies
(through sa_manager.GenerationInstaller), and the commit that makes it current and retires the old one.

The initiator's plan offers the TLS session the last handshake with that peer bridge and identity pair left
(`ipsec_bridge.tickets`): a rekey or a re-established pair resumes it (psk_dhe_ke, no signatures) within the
bounds that force a full handshake. Tickets outlive a removed tunnel, so a pair that comes back resumes too."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter
from typing import Any

from ipsec_bridge.certs import Certificates
from ipsec_bridge.handshake import Kind, Plan, Preamble, Result
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import GenerationInstaller, SaManager
from ipsec_bridge.state import StateStore
from ipsec_bridge.tickets import ResumptionPolicy, TicketKey, TicketStore
from ipsec_bridge.tunnels.desired import TunnelSpec, spec_now
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe, error_code, rekey_trigger
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic, Wall
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm.offload import OffloadStatus
from ztcore.backoff import Backoff

log = logging.getLogger(__name__)


class Generations:
    def __init__(
        self,
        settings: BridgeSettings,
        store: StateStore,
        sa: SaManager,
        certs: Certificates,
        metrics: BridgeMetrics,
        table: TunnelTable,
        *,
        rng: random.Random,
        monotonic: Monotonic,
        wall: Wall,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sa = sa
        self.certs = certs
        self.metrics = metrics
        self.table = table
        self._rng = rng
        self._monotonic = monotonic
        self._wall = wall
        self.tickets = TicketStore(
            ResumptionPolicy(settings.resumption, settings.max_resumptions, settings.ticket_max_age)
        )
        self.modes: Counter[tuple[str, str]] = Counter()  # (kind, mode) -> successful handshakes
        self.signatures: Counter[tuple[str, str]] = Counter()  # (kind, mode) -> signatures they made here
        certs.on_renewed(self.tickets.forget)  # belt and braces: a renewed certificate has a new context anyway

    def recheck(self, spec: TunnelSpec) -> str | None:
        """Why the current view no longer admits `spec` (None: it still does); asked mid-handshake."""
        found = spec_now(self.store.view, self.settings, spec.scope, spec.key)
        if isinstance(found, str):
            return found
        if not found.same_tunnel(spec):
            return "the tunnel changed while its handshake ran"
        return None

    def take_role(self, t: Tunnel, spec: TunnelSpec) -> None:
        """`spec` is `t`'s tunnel with the other side initiating now: the SAs and policies stay (no gap in traffic,
        no handshake), and the new initiator rekeys when a generation of its own would have been due. Only the
        role moves: the selectors stay `t`'s until reconcile moves its policies with them."""
        t.spec = dataclasses.replace(spec, selectors=t.spec.selectors)
        t.nudges, t.last_nudge = 0, 0.0
        if not spec.initiator:
            t.next_rekey = None
        elif t.current is not None:
            jitter = self._rng.uniform(1 - self.settings.rekey_jitter, 1.0)
            t.next_rekey = t.current.established_mono + self.settings.rekey_interval * jitter
        log.info("tunnel %s: this side %s now; its keys stay", describe(spec),
                 "initiates" if spec.initiator else "responds")  # fmt: skip
        self.table.touch(t)

    def installer(self, t: Tunnel) -> GenerationInstaller:
        previous = t.current.reqid if t.current is not None else None
        return GenerationInstaller(
            self.sa, t.spec.endpoints, t.spec.selectors, self.sa.next_reqid(), previous, guard=t.guard,
            defer_policies=True,
            # a rekey: the current generation's in/fwd policies (reqid 0) stay as they are, only out switches
            in_place=t.spec.selectors if t.current is not None else (),
        )  # fmt: skip

    async def switch(self, t: Tunnel, installer: GenerationInstaller) -> float:
        """The exchange is over and both SAs exist: switch the pair policies under their own deadline, which
        grows with the number of policies. Rolls the generation back if that fails. Returns the seconds taken."""
        started = self._monotonic()
        s = self.settings
        pairs = len(t.spec.selectors)
        policies = pairs if t.current is not None else 3 * pairs
        try:
            async with asyncio.timeout(s.handshake_timeout + policies * s.policy_seconds_each):
                await installer.switch(t.spec.selectors)  # the pairs as they are now (the state may have moved)
        except BaseException:
            await installer.rollback()
            raise
        return self._monotonic() - started

    def preamble(self, spec: TunnelSpec, kind: Kind) -> Preamble:
        key_bytes = self.settings.key_bytes
        if spec.scope is TunnelScope.POD:
            return Preamble(kind, KeyScope.POD, str(spec.local_address), str(spec.peer_address), key_bytes)
        return Preamble(kind, KeyScope.NODE, spec.local_name, spec.peer_name, key_bytes)

    @staticmethod
    def ticket_key(spec: TunnelSpec) -> TicketKey:
        return TicketKey(str(spec.endpoints.peer_node), spec.local_identity, spec.peer_identity)

    async def plan(self, t: Tunnel, installer: GenerationInstaller, *, resume: bool = True) -> Plan:
        """`resume`: the initiator offers its ticket for the pair, if one is within bounds (else: full handshake)."""
        spec = t.spec
        cred, ctx = await self.certs.credential(spec.local_identity, self.settings.cert_wait)
        ends = (spec.local_address, spec.peer_address)
        if not spec.initiator:
            ends = (spec.peer_address, spec.local_address)
        ticket = None
        if spec.initiator and resume:
            ticket = self.tickets.take(self.ticket_key(spec), ctx, self._monotonic())
        return Plan(
            credential=cred,
            context=ctx,
            expected_peer=spec.peer_identity,
            initiator_address=ends[0],
            responder_address=ends[1],
            installer=installer,
            recheck=lambda: self.recheck(spec),
            esn=self.sa.settings.esn,
            monotonic=self._monotonic,
            ticket=ticket,
            wall=self._wall,
        )

    def failed(self, t: Tunnel, role: str, err: BaseException) -> None:
        code = error_code(err)
        self.metrics.handshakes.inc(role=role, result=code)
        t.failures += 1
        delay = Backoff(self.settings.retry_initial, self.settings.retry_max, jitter=(0.8, 1.0)).jittered(
            t.failures, self._rng
        )
        t.next_attempt = self._monotonic() + delay
        t.last_error = f"{code}: {err}"
        log.warning("handshake (%s) for %s failed: %s; retry in %.1fs", role, describe(t.spec), t.last_error, delay)

    async def commit(self, t: Tunnel, installer: GenerationInstaller, result: Result, switch_seconds: float) -> None:
        role = "initiator" if result.initiator else "responder"
        if result.ticket is not None:  # kept even if the tunnel went meanwhile: the pair may come back
            self.tickets.put(self.ticket_key(t.spec), result.ticket)
        kind, mode = ("rekey" if t.current is not None else "new"), ("resumed" if result.resumed else "full")
        if t.removed:
            await installer.rollback()
            await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors)
            self.metrics.handshakes.inc(role=role, result="removed")
            return
        switched = set(installer.selectors)
        added = [sel for sel in t.spec.selectors if sel not in switched]
        if added:  # pairs the state added while the policies were switched went to the old generation
            await self.sa.switch_policies(t.spec.endpoints, added, installer.reqid)
        now = self._monotonic()
        t.generations += 1
        gen = Generation(
            number=t.generations,
            reqid=installer.reqid,
            spi_in=result.spi_in,
            spi_out=result.spi_out,
            key_bytes=result.key_bytes,
            offload=installer.offload,
            established=self._wall(),
            established_mono=now,
            not_after=min(result.local_not_after, result.peer_not_after),
            handshake_seconds=result.seconds + switch_seconds,
            esn=result.esn,
        )
        if t.current is not None:
            # the peer switches the same pairs at the same time as we did: its out policies may still use the old
            # SAs for about as long as ours took, so the old generation lives that much past the grace period
            t.retiring.append((t.current, now + self.settings.grace + switch_seconds))
            if t.current.origin == "adopted":
                self.metrics.adoption.inc(decision="rekeyed")
            self.metrics.rekeys.inc(role=role, trigger=rekey_trigger(t.rekey_reason, t.limit_kind, result.initiator))
        t.current = gen
        reason = t.rekey_reason or ("new" if gen.number == 1 else "peer")
        if not result.initiator and gen.number > 1:
            reason = "peer" if not t.rekey_reason else f"peer ({t.rekey_reason}, asked by us)"
        t.record(gen.number, reason, gen.established)
        t.failures = 0
        t.nudges = 0
        t.last_error = ""
        t.rekey_wanted = False
        t.rekey_reason = ""
        if result.initiator:
            jitter = self._rng.uniform(1 - self.settings.rekey_jitter, 1.0)
            t.next_rekey = now + self.settings.rekey_interval * jitter
        self.metrics.handshakes.inc(role=role, result="ok")
        self.metrics.handshake_seconds.observe(gen.handshake_seconds)
        self.metrics.handshake_modes.inc(role=role, kind=kind, mode=mode)
        self.metrics.handshake_signatures.inc(result.signatures, role=role, kind=kind, mode=mode)
        self.modes[(kind, mode)] += 1
        self.signatures[(kind, mode)] += result.signatures
        if gen.offload is OffloadStatus.FALLBACK:
            self.metrics.offload_fallbacks.inc()
            log.warning("tunnel %s: offload requested but the kernel runs its SAs in software", describe(t.spec))
        log.info(
            "tunnel %s generation %d up: spi in 0x%08x out 0x%08x (%s, %s, %d signatures, %.1f ms)",
            describe(t.spec), gen.number, gen.spi_in, gen.spi_out, role, mode, result.signatures,
            result.seconds * 1000,
        )  # fmt: skip
        if t.task is None or t.task.done():
            # (a task of the tunnel still running, as the initiator's handshake is now, touches it as it ends:
            # the scheduler's look then sees the tunnel idle, not busy, and one pass does for both)
            self.table.touch(t)

    def resumption_dump(self) -> dict[str, Any]:
        """For /config_dump: the bounds, the tickets held (count only) and full vs resumed handshakes."""
        policy = self.tickets.policy

        def per_rekey(mode: str) -> float | None:
            count = self.modes[("rekey", mode)]
            return round(self.signatures[("rekey", mode)] / count, 3) if count else None

        return {
            "enabled": policy.enabled,
            "max_resumptions": policy.max_resumptions,
            "tickets_per_pair": policy.per_pair,
            "ticket_max_age_seconds": policy.max_age,
            "tickets": len(self.tickets),
            "tickets_dropped": dict(self.tickets.dropped),
            "handshakes": {f"{kind}/{mode}": n for (kind, mode), n in sorted(self.modes.items())},
            "signatures": {f"{kind}/{mode}": n for (kind, mode), n in sorted(self.signatures.items())},
            "signatures_per_rekey": {"full": per_rekey("full"), "resumed": per_rekey("resumed")},
        }
