"""On-demand set-up (--setup on-demand): tunnels from the kernel's ACQUIREs, denied pairs answered with a
bounded block, idle tunnels reclaimed.

A local pod's first packet to a pod of another node hits its trap policy (ipsec_bridge/sa_manager.py): the
kernel holds the packet and sends XFRM_MSG_ACQUIRE with the packet's selector. `on_acquire` maps it to
(local pod, peer pod), asks the view the same question eager mode asks (`spec_now`: WDS identity + policy), and
either makes the tunnel's record (the scheduler runs today's handshake: this node initiates, or nudges the
initiator) or installs the pair's BLOCK with a kernel lifetime. An ACQUIRE storm costs little: the kernel
reports a pair once while its larval state lives, the bridge handles one ACQUIRE per pair at a time and at
most `max_acquires` at once, and nothing is logged per packet.

`reclaim_idle` reads every SA's counters in one dump; a tunnel whose SAs carried no byte for `idle_timeout`
is removed (policies first, SAs after) and its pair falls back to the trap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import BRIDGE_MARK, TRAP_PRIORITY, SaManager
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.desired import TunnelKey, TunnelSpec, spec_now
from ipsec_bridge.tunnels.records import Tunnel, describe
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import EventsLost, XfrmError, XfrmEvents

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
Pair = tuple[IPAddress, IPAddress]  # (local pod, peer pod)


def acquired_pair(event: m.Acquire) -> Pair | None:
    """The (local pod, peer pod) an ACQUIRE of one of our traps is about (None: not one of ours)."""
    policy = event.policy.policy
    if policy.mark != BRIDGE_MARK or policy.priority != TRAP_PRIORITY:
        return None
    sel = event.selector
    if sel.src.prefixlen != sel.src.max_prefixlen or sel.dst.prefixlen != sel.dst.max_prefixlen:
        return None  # the kernel's larval selector is always host to host
    return sel.src.network_address, sel.dst.network_address


def pod_key(pair: Pair) -> TunnelKey:
    return ("pod", str(pair[0]), str(pair[1]))


class OnDemand:
    def __init__(
        self,
        settings: BridgeSettings,
        store: StateStore,
        table: TunnelTable,
        sa: SaManager,
        metrics: BridgeMetrics,
        *,
        monotonic: Monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.table = table
        self.sa = sa
        self.metrics = metrics
        self._monotonic = monotonic
        self.in_flight: set[TunnelKey] = set()
        self.denied: dict[Pair, float] = {}  # pair -> when its block expires in the kernel (monotonic)
        self.reclaimed: collections.OrderedDict[TunnelKey, float] = collections.OrderedDict()  # not back yet
        self.stats: collections.Counter[str] = collections.Counter()
        self.handlers: set[asyncio.Task[None]] = set()  # the ACQUIREs being handled
        table.activator = self.activate

    # --- ACQUIRE -------------------------------------------------------------------------------------------

    async def watch(self, events: XfrmEvents) -> None:
        """Until cancelled: every ACQUIRE of the node's traps."""
        try:
            async for event in events:
                if isinstance(event, EventsLost):
                    # the larval states of the lost ones expire (xfrm_acq_expires), then the kernel asks again
                    self._count("lost")
                    log.warning("XFRM ACQUIREs were lost; their pairs are asked about again within 30 s")
                elif isinstance(event, m.Acquire):
                    self.on_acquire(event)
        finally:
            for task in self.handlers:
                task.cancel()

    def on_acquire(self, event: m.Acquire) -> None:
        self._count("received")
        pair = acquired_pair(event)
        if pair is None:
            self._count("foreign")
            return
        key = pod_key(pair)
        if key in self.in_flight:
            self._count("duplicate")
            return
        if len(self.in_flight) >= self.settings.max_acquires:
            # the larval state stays: the kernel holds and then drops this pair's packets, and asks again when
            # the larval state expires; nothing per packet reaches us or the log
            self._count("over_cap")
            return
        self.in_flight.add(key)
        task = asyncio.get_running_loop().create_task(self._handle(event, pair, key), name=f"acquire {key[1]}")
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _handle(self, event: m.Acquire, pair: Pair, key: TunnelKey) -> None:
        try:
            spec = await self._admitted(key)
            if isinstance(spec, str):
                await self._deny(event, pair, spec)
                return
            t = self._record(spec, "acquire")
            if await self._wait_up(t):
                self._count("admitted")
                self.reclaimed.pop(key, None)
                await self.sa.kick(pair[0])
                await self.sa.release_acquire(event)
            else:
                # keep the larval state: the pair is asked about again only when it expires (no storm while
                # the scheduler retries with backoff)
                self._count("failed")
        except XfrmError as err:
            self._count("failed")
            log.warning("ACQUIRE for %s -> %s: %s", pair[0], pair[1], err)
        finally:
            self.in_flight.discard(key)

    async def _admitted(self, key: TunnelKey) -> TunnelSpec | str:
        """The same check as eager set-up (WDS identity and policy), once the view is synced."""
        view = self.store.view
        if not view.synced:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.handshake_timeout):
                    view = await self.store.wait_changed(view.version)
                    while not view.synced:
                        view = await self.store.wait_changed(view.version)
            if not view.synced:
                return "this bridge has no workload state yet"
        return spec_now(view, self.settings, TunnelScope.POD, key)

    async def _deny(self, event: m.Acquire, pair: Pair, why: str) -> None:
        first = pair not in self.denied
        await self.sa.deny_pairs([pair])
        await self.sa.release_acquire(event)
        self.denied[pair] = self._monotonic() + self.settings.deny_seconds
        self._count("denied")
        if first:  # once per pair and block lifetime, never per packet: the block stops them here
            log.info("on-demand: %s -> %s denied (%s); blocked for %ds", pair[0], pair[1], why,
                     self.settings.deny_seconds)  # fmt: skip

    def _record(self, spec: TunnelSpec, origin: str) -> Tunnel:
        t = self.table.tunnels.get(spec.key)
        if t is None or not t.spec.same_tunnel(spec):
            t = self.table.add(Tunnel(spec, self._monotonic(), origin=origin))
            if not spec.initiator:
                t.rekey_wanted = True  # a responder asks its initiator now, not after responder_nudge_after
            t.active_at = self._monotonic()
            self.table.wake.set()
        return t

    async def _wait_up(self, t: Tunnel) -> bool:
        """Until the tunnel has a generation (True), or it is removed or the deadline passes (False)."""
        wait = self.settings.handshake_timeout * 2  # a responder's nudge, then the initiator's handshake
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while t.current is None and not t.removed:
                    await self.table.wake.changed()
        return t.current is not None and not t.removed

    def activate(self, key: TunnelKey) -> Tunnel | None:
        """The peer asks this node (the initiator) for a tunnel it has no record of: make one if admitted."""
        if key[0] != "pod":
            return None
        spec = spec_now(self.store.view, self.settings, TunnelScope.POD, key)
        if isinstance(spec, str):
            return None
        self.reclaimed.pop(key, None)
        return self._record(spec, "peer")

    async def forgive(self, admitted: Sequence[Pair]) -> None:
        """Pairs policy admits now: their blocks go at once (not when the kernel would expire them)."""
        now = self._monotonic()
        for pair, until in list(self.denied.items()):
            if until <= now:
                del self.denied[pair]  # the kernel removed that block itself
        gone = [p for p in admitted if p in self.denied]
        if gone:
            await self.sa.undeny_pairs(gone)
            for pair in gone:
                del self.denied[pair]

    # --- idle reclaim ----------------------------------------------------------------------------------------

    def reclaim_interval(self) -> float:
        return max(0.2, min(self.settings.idle_timeout / 4, 5.0))

    async def run_reclaim(self) -> None:
        if self.settings.idle_timeout <= 0:
            return
        while True:
            await asyncio.sleep(self.reclaim_interval())
            try:
                await self.reclaim_idle()
            except XfrmError as err:
                log.warning("idle reclaim: reading the SAs failed: %s", err)

    async def reclaim_idle(self) -> list[Tunnel]:
        """One dump of every SA; tunnels idle for `idle_timeout` go (policies first, SAs after). Returns them."""
        counters = {(i.sa.dst, i.sa.spi): i.current.bytes for i in await self.sa.xfrm.list_sas()}
        now = self._monotonic()
        idle: list[Tunnel] = []
        for t in list(self.table.tunnels.values()):
            if (t.task is not None and not t.task.done()) or t.lock.locked():
                continue  # a handshake is running: it is not idle
            g = t.current
            if g is None:
                # never came up (peer gone, or refused): the record goes too, the trap asks again on traffic
                if now - max(t.created, t.active_at) >= self.settings.idle_timeout:
                    idle.append(t)
                continue
            ep = t.spec.endpoints
            seen = (counters.get((ep.local_node, g.spi_in), 0), counters.get((ep.peer_node, g.spi_out), 0))
            if seen != t.seen_bytes:
                if t.seen_bytes != (-1, -1) or seen != (0, 0):
                    t.active_at = now
                t.seen_bytes = seen
                continue
            if now - max(t.active_at, g.established_mono) >= self.settings.idle_timeout:
                idle.append(t)
        for t in idle:
            up = t.current is not None
            await self.table.remove(t, "idle")
            if up:
                self.metrics.reclaims.inc()
                self.reclaimed[t.spec.key] = now
                while len(self.reclaimed) > 4096:  # a bounded memory of pairs that were up once
                    self.reclaimed.popitem(last=False)
                log.info("tunnel %s reclaimed: idle for %.0fs", describe(t.spec), self.settings.idle_timeout)
        return idle

    # --- what the admin port shows -------------------------------------------------------------------------

    def _count(self, result: str) -> None:
        self.stats[result] += 1
        self.metrics.acquires.inc(result=result)

    def dump(self) -> dict[str, Any]:
        now = self._monotonic()
        return {
            "idle_timeout_seconds": self.settings.idle_timeout,
            "acquires": dict(self.stats),
            "in_flight": len(self.in_flight),
            "denied_pairs": sorted(f"{a}->{b}" for (a, b), until in self.denied.items() if until > now),
            "reclaimed_pairs": [f"{k[1]}->{k[2]}" for k in self.reclaimed],
        }
