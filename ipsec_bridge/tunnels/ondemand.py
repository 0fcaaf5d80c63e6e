"""On-demand set-up (--setup on-demand): tunnels from the kernel's ACQUIREs, denied pairs answered with a
bounded block, idle tunnels reclaimed.

A local pod's first packet to a pod of another node hits its trap policy (ipsec_bridge/sa_manager.py): the
kernel holds the packet and sends XFRM_MSG_ACQUIRE with the packet's selector. `on_acquire` maps it to
(local pod, peer pod), asks the view the same question eager mode asks (`spec_now`: WDS identity + policy), and
either makes the tunnel's record (the scheduler runs today's handshake: this node initiates, or nudges the
initiator) or installs the pair's BLOCK with a kernel lifetime. An ACQUIRE storm costs little: the kernel
reports a pair once while its larval state lives, the bridge handles one ACQUIRE per pair at a time and at
most `max_acquires` at once, and nothing is logged per packet.

Held packets (kernel facts in ipsec_bridge/sa_manager.py): an admitted pair gets its own trap at once, so what
it sends later waits in its own queue and leaves when its out policy goes in. Its first packets wait in its
pod's trap's queue, which the kernel sends all at once, freeing those whose pair has no SA yet; so the oldest
of them (the queue's head, `HeldQueue`) has its flow held until the pod's other new pairs are up too, or
`HOLD_MAX` has passed, and then the queue is run at once (`_settle`).

`reclaim_idle` reads every SA's counters in one dump; a tunnel whose SAs carried no byte for `idle_timeout`
is removed (policies first, SAs after) and its pair falls back to the trap, on both bridges together: the peer
agrees and stops sending first (a teardown request, see the "idle reclaim" section), so neither side's last
packets meet an SA the other has already removed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from ipsec_bridge.handshake import Teardown, TeardownReply, answer_teardown, wait_teardown_done
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import (
    BRIDGE_MARK,
    HOLD_PRIORITIES,
    TRAP_PRIORITY,
    PairSelector,
    SaManager,
    held_flow,
)
from ipsec_bridge.state import NodeView, StateStore
from ipsec_bridge.tunnels.desired import TunnelKey, TunnelSpec, spec_now
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe
from ipsec_bridge.tunnels.responder import TeardownHandler
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic, latency_critical
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import EventsLost, XfrmError, XfrmEvents

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
Pair = tuple[IPAddress, IPAddress]  # (local pod, peer pod)
# asks the peer to remove an idle pair with this side (ipsec_bridge.tunnels.initiator.Initiator.teardown)
TeardownPeer = Callable[[Tunnel, Generation], contextlib.AbstractAsyncContextManager[TeardownReply]]
# How long a pod's held first packets wait for the slowest of its new pairs once the oldest one's is up: TCP's
# initial RTO (RFC 6298), after which a held SYN has been sent again anyway (that copy waits in its pair's trap).
HOLD_MAX = 1.0


def acquired_pair(event: m.Acquire) -> Pair | None:
    """The (local pod, peer pod) an ACQUIRE of one of our traps or holds is about (None: not one of ours)."""
    policy = event.policy.policy
    if policy.mark != BRIDGE_MARK or policy.priority not in HOLD_PRIORITIES:
        return None
    sel = event.selector
    if sel.src.prefixlen != sel.src.max_prefixlen or sel.dst.prefixlen != sel.dst.max_prefixlen:
        return None  # the kernel's larval selector is always host to host
    return sel.src.network_address, sel.dst.network_address


def pod_key(pair: Pair) -> TunnelKey:
    return ("pod", str(pair[0]), str(pair[1]))


@dataclass(slots=True, eq=False)
class HeldQueue:
    """The first packets one local pod's trap holds since its queue last left: one kernel queue, which leaves
    all at once when the pair of its oldest packet (`head`) gets its SA, freeing the packets of the pairs that
    have none yet (ipsec_bridge/sa_manager.py). The head's `flow` is held above its pair's policy until
    `OnDemand._settle` lets the queue go."""

    head: Pair
    flow: m.Selector
    opened: float  # the event loop's clock, at the head's ACQUIRE
    pending: set[Pair] = field(default_factory=set)  # pairs of the queue still being set up
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    held: bool = False  # the head flow's hold is in the kernel
    released: bool = False  # let go in the head's own switch batch (OnDemand._switched)


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
        self.held: collections.Counter[str] = collections.Counter()  # how held queues went (`_let_go`)
        self.handlers: set[asyncio.Task[None]] = set()  # the ACQUIREs being handled
        self.queues: dict[IPAddress, HeldQueue] = {}  # local pod -> what its trap holds (see HeldQueue)
        self.hold_max = HOLD_MAX
        # idle reclaim with the peers (see that section)
        self._peer: TeardownPeer | None = None  # None: each bridge decides alone
        self._asking: set[TunnelKey] = set()  # pairs this side is asking its peer about right now (t.lock held)
        self._postponed: dict[TunnelKey, float] = {}  # the peer kept these: not asked again before then (monotonic)
        self._alone: set[str] = set()  # peers (node addresses) already logged for taking no part
        self._events: XfrmEvents | None = None  # the ACQUIREs `watch` reads (for `_catch_up`)
        table.activator = self.activate
        sa.switch_hook = self._switched

    # --- ACQUIRE -------------------------------------------------------------------------------------------

    async def watch(self, events: XfrmEvents) -> None:
        """Until cancelled: every ACQUIRE of the node's traps."""
        self._events = events
        try:
            async for event in events:
                self._on_event(event)
        finally:
            self._events = None
            for task in self.handlers:
                task.cancel()

    def _on_event(self, event: m.Event | EventsLost) -> None:
        if isinstance(event, EventsLost):
            # the larval states of the lost ones expire (xfrm_acq_expires), then the kernel asks again
            self._count("lost")
            log.warning("XFRM ACQUIREs were lost; their pairs are asked about again within 30 s")
        elif isinstance(event, m.Acquire):
            self.on_acquire(event)

    def _catch_up(self) -> None:
        """Handle the ACQUIREs the kernel has sent and `watch` has not read yet, before a pod's queue is let go: the
        kernel sends a pair's ACQUIRE as it queues the pair's first packet, so a pair whose packet waits in the
        queue is pending by then, and the queue waits for it instead of the kernel freeing that packet (which
        would cost the connection TCP's 1 s initial RTO)."""
        if self._events is None:
            return
        try:
            events = self._events.ready_now()
        except XfrmError:
            return  # the socket failed: `watch` reads the same error and ends
        for event in events:
            self._on_event(event)

    def on_acquire(self, event: m.Acquire) -> None:
        self._count("received")
        pair = acquired_pair(event)
        if pair is None:
            self._count("foreign")
            return
        key = pod_key(pair)
        if key in self.in_flight:
            self._count("duplicate")
            log.debug("on-demand: ACQUIRE %s -> %s (priority %d) while its set-up runs", pair[0], pair[1],
                      event.policy.policy.priority)  # fmt: skip
            return
        if len(self.in_flight) >= self.settings.max_acquires:
            # the larval state stays: the kernel holds and then drops this pair's packets, and asks again when
            # the larval state expires; nothing per packet reaches us or the log
            self._count("over_cap")
            return
        self.in_flight.add(key)
        log.debug("on-demand: ACQUIRE %s -> %s (priority %d)", pair[0], pair[1], event.policy.policy.priority)
        queue = self._held_queue(event, pair)
        task = asyncio.get_running_loop().create_task(self._handle(event, pair, key, queue), name=f"acquire {key[1]}")
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    def _held_queue(self, event: m.Acquire, pair: Pair) -> HeldQueue | None:
        """The pod queue this ACQUIRE's packet waits in (None: it waits in its pair's own trap or flow hold)."""
        if event.policy.policy.priority != TRAP_PRIORITY:
            return None
        queue = self.queues.get(pair[0])
        if queue is None:  # the pod's queue had left: this packet is its oldest now
            opened = asyncio.get_running_loop().time()
            queue = self.queues[pair[0]] = HeldQueue(pair, held_flow(event.selector), opened)
            log.debug("on-demand: %s -> %s heads pod %s's held queue", pair[0], pair[1], pair[0])
        queue.pending.add(pair)
        return queue

    async def _handle(self, event: m.Acquire, pair: Pair, key: TunnelKey, queue: HeldQueue | None) -> None:
        up = False
        try:
            up = await self._set_up(event, pair, key, queue)
        finally:
            self.in_flight.discard(key)
            if queue is not None:
                await self._settle(queue, pair, up)
        if up:
            try:
                await self.sa.release_acquire(event)
            except XfrmError as err:
                log.warning("ACQUIRE for %s -> %s: releasing its larval state: %s", pair[0], pair[1], err)

    async def _set_up(self, event: m.Acquire, pair: Pair, key: TunnelKey, queue: HeldQueue | None) -> bool:
        """Check the pair, then block it or make its record and hold its packets until it is up (True)."""
        try:
            spec = await self._admitted(key)
            if isinstance(spec, str):
                await self._deny(event, pair, spec)
                return False
            t = self._record(spec, "acquire")
            self._hold(pair, queue)
            if await self._wait_up(t):
                self._count("admitted")
                self.reclaimed.pop(key, None)
                return True
            # keep the larval state: the pair is asked about again only when it expires (no storm while the
            # scheduler retries with backoff); its own trap keeps holding what it sends meanwhile
            self._count("failed")
        except XfrmError as err:
            self._count("failed")
            log.warning("ACQUIRE for %s -> %s: %s", pair[0], pair[1], err)
        return False

    def _hold(self, pair: Pair, queue: HeldQueue | None) -> None:
        """The pair's own trap, and for the head of its pod's queue the hold on its flow (SaManager.hold: in the
        kernel before the pair's handshake switches any policy, and before `_settle` releases the hold)."""
        head = queue is not None and queue.head == pair
        # outlives the head's wait for its tunnel and for its pod's other pairs: the bridge releases it first
        seconds = math.ceil(2 * self.settings.handshake_timeout + self.hold_max) + 10
        self.sa.hold(pair[0], pair[1], queue.flow if queue is not None and head else None, seconds)
        if queue is not None and head:
            queue.held = True

    async def _settle(self, queue: HeldQueue, pair: Pair, up: bool) -> None:
        """`pair` of a pod's held queue is done (`up`: its tunnel is). The head's handler lets the queue go: at
        once when the head is not up (its packets never leave, so the queue is freed rather than left to block
        the pod's next first packets), else when every pair of the queue is done or `hold_max` after the queue's
        first ACQUIRE, whichever comes first (a pair still being set up then loses its first packets; TCP sends
        them again into the pair's own trap, after its initial RTO: about when `hold_max` ends)."""
        queue.pending.discard(pair)
        queue.changed.set()
        if pair != queue.head:
            return
        now = asyncio.get_running_loop().time()
        if not queue.released:
            self._catch_up()
        # The others were set up beside the head, under the same load: they come up just after it (measured: 30 ms
        # after a head that took 0.5 s at 32 set-ups at once), so waiting for them costs the pairs that are up
        # little, while letting the queue go would cost each of them TCP's 1 s RTO.
        if up and queue.pending:
            left = queue.opened + self.hold_max - now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(left, 0.0)):
                    while queue.pending:
                        queue.changed.clear()
                        await queue.changed.wait()
                        self._catch_up()
        if queue.released:
            return
        if self.queues.get(pair[0]) is queue:
            del self.queues[pair[0]]  # from here on, a first packet of the pod starts its next queue
        log.debug("on-demand: pod %s's held queue goes (head %s up: %s, %d pairs still pending, %.3fs)", pair[0],
                  pair[1], up, len(queue.pending), asyncio.get_running_loop().time() - queue.opened)  # fmt: skip
        self._let_go(queue, up)
        try:
            await self.sa.kick(pair[0], queue.flow if queue.held else None, up=up)
        except XfrmError as err:
            log.warning("on-demand: releasing the packets held for pod %s: %s", pair[0], err)

    def _let_go(self, queue: HeldQueue, up: bool) -> None:
        """Count how a queue goes: the first packets of pairs still pending are freed with it (by the kernel)."""
        given_up = len(queue.pending - {queue.head})
        outcome = "head_failed" if not up else "hold_max" if given_up else "all_up"
        self.held[outcome] += 1
        self.metrics.held_queues.inc(outcome=outcome)
        if given_up:
            self.held["pairs_given_up"] += given_up
            self.metrics.held_pairs_given_up.inc(given_up)

    def _switched(self, sel: PairSelector) -> list[m.Request]:
        """SaManager.switch_hook: the pair's out policy goes in now. When it is the head of its pod's held queue
        and no other pair of the queue is still being set up, the queue is let go in that same batch (one
        netlink round trip, and the commit and the wake-up, sooner than `_settle` would)."""
        local, peer = sel[0].network_address, sel[1].network_address
        queue = self.queues.get(local)
        # (not before the head's handler has asked for the hold: that must go in first, this batch or earlier)
        if queue is None or queue.head != (local, peer) or not queue.held:
            return []
        self._catch_up()
        if queue.pending - {queue.head}:
            return []
        del self.queues[local]  # from here on, a first packet of the pod starts its next queue
        queue.released = True
        self._let_go(queue, True)
        log.debug("on-demand: pod %s's held queue goes with its head's out policy (%s)", local, peer)
        return self.sa.kick_requests(local, queue.flow)

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

    async def forgive(self, view: NodeView) -> None:
        """Blocked pairs that `view` admits now: their blocks go at once (not when the kernel would expire them).
        Only the blocked pairs are asked about, never the whole mesh."""
        now = self._monotonic()
        for pair, until in list(self.denied.items()):
            if until <= now:
                del self.denied[pair]  # the kernel removed that block itself
        pod = TunnelScope.POD
        gone = [p for p in self.denied if not isinstance(spec_now(view, self.settings, pod, pod_key(p)), str)]
        if gone:
            await self.sa.undeny_pairs(gone)
            for pair in gone:
                del self.denied[pair]

    # --- idle reclaim ----------------------------------------------------------------------------------------
    #
    # With the peers wired in (`use_peer`), an idle pair goes on both bridges together. This side asks the peer
    # (`Initiator.teardown`, naming the generation by its SPIs); the peer removes its out policies and answers
    # STOPPED (its pods' traffic to the pair falls to its trap from then on), this side removes its pair (policies
    # first, SAs after) and says done, and the peer removes the rest. So no side ever sends under an SA the other
    # no longer has. The peer answers KEEP when its counters moved since its last check or within its own idle
    # timeout, while a handshake runs, or when it does not reclaim (eager set-up): nothing goes, and this side asks
    # again only after another idle timeout. ABSENT (it has no such generation): this side removes its own. A peer
    # that is unreachable or predates teardown requests leaves this side to decide alone, as before (logged once
    # per peer). When both sides ask at once, the initiator's request goes first.

    def use_peer(self, peer: TeardownPeer) -> TeardownHandler:
        """Reclaim with the peers: `peer` asks one; the handler returned answers them (the responder's)."""
        self._peer = peer
        return self.on_teardown_request

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

    def _pinned(self, t: Tunnel) -> bool:
        """Latency-critical (--eager-for): kept whether it talks or not."""
        return any(latency_critical(self.settings, i) for i in (t.spec.local_identity, t.spec.peer_identity))

    async def reclaim_idle(self) -> list[Tunnel]:
        """One dump of every SA; tunnels idle for `idle_timeout` go (policies first, SAs after), with the peer's
        side of them when a peer is wired in. Returns the tunnels removed."""
        counters = {(i.dst, i.spi): i.current.bytes for i in await self.sa.xfrm.sa_counters()}
        now = self._monotonic()
        if self._peer is not None:
            self._postponed = {k: at for k, at in self._postponed.items() if at > now and k in self.table.tunnels}
        idle: list[Tunnel] = []
        for t in list(self.table.tunnels.values()):
            if (t.task is not None and not t.task.done()) or t.lock.locked():
                continue  # a handshake is running: it is not idle
            if self._pinned(t):
                continue
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
            kept = self._peer is not None and t.spec.key in self._postponed  # the peer keeps it for now
            if now - max(t.active_at, g.established_mono) >= self.settings.idle_timeout and not kept:
                idle.append(t)
        if self._peer is None:
            for t in idle:
                await self._reclaimed(t, "idle", now)
            return idle
        removed: list[Tunnel] = []
        silent: set[str] = set()  # peers that did not answer in this pass: their other pairs go without asking
        limit = asyncio.Semaphore(self.settings.max_parallel_handshakes)
        async with asyncio.TaskGroup() as tg:
            for t in idle:
                work = self._reclaim_with_peer(self._peer, t, t.current, now, limit, silent, removed)
                tg.create_task(work, name=f"reclaim {describe(t.spec)}")
        return removed

    async def _reclaim_with_peer(
        self,
        ask: TeardownPeer,
        t: Tunnel,
        g: Generation | None,
        now: float,
        limit: asyncio.Semaphore,
        silent: set[str],
        removed: list[Tunnel],
    ) -> None:
        """`t` was idle with generation `g` (None: it never came up) when this pass looked."""
        peer = str(t.spec.endpoints.peer_node)
        try:
            async with limit:
                # a handshake or the peer's own teardown request (t.lock) came meanwhile: not this pass's to touch
                if t.lock.locked() or t.removed or t.current is not g:
                    return
                if g is None or peer in silent:  # nothing of ours at the peer, or the peer did not answer just now
                    reason = "idle" if g is None else "idle: this side only (the peer's bridge did not answer)"
                    if await self._reclaimed(t, reason, now):
                        removed.append(t)
                    return
                async with t.lock:
                    self._asking.add(t.spec.key)
                    try:
                        async with ask(t, g) as reply:
                            if await self._answered(t, reply, now, silent):
                                removed.append(t)
                    finally:
                        self._asking.discard(t.spec.key)
        except (XfrmError, OSError) as err:
            log.warning("idle reclaim of %s: %s", describe(t.spec), err)
        except Exception:  # a bug must not stop the other pairs' reclaim
            log.exception("idle reclaim of %s", describe(t.spec))

    async def _answered(self, t: Tunnel, reply: TeardownReply, now: float, silent: set[str]) -> bool:
        """Act on the peer's answer (t.lock held, the connection still open); True: the pair went."""
        peer = str(t.spec.endpoints.peer_node)
        if reply.status is Teardown.KEEP:
            self._alone.discard(peer)
            self._postponed[t.spec.key] = now + self.settings.idle_timeout
            log.debug("idle tunnel %s kept: the peer's bridge keeps it (%s)", describe(t.spec), reply.reason)
            return False
        if reply.status is Teardown.STOPPED:
            self._alone.discard(peer)
            return await self._reclaimed(t, "idle: reclaimed with the peer", now)
        if reply.status is Teardown.ABSENT:
            self._alone.discard(peer)
            return await self._reclaimed(t, "idle: the peer had no such generation", now)
        silent.add(peer)
        if peer not in self._alone:
            self._alone.add(peer)
            log.info("idle reclaim: the bridge at %s takes no part in it (%s); idle pairs with it are removed on this "
                     "side only until it does", peer, reply.reason)  # fmt: skip
        return await self._reclaimed(t, "idle: this side only (the peer's bridge took no part)", now)

    async def _reclaimed(self, t: Tunnel, reason: str, now: float, *, keep_record: bool = False) -> bool:
        """Remove an idle tunnel (policies first, SAs after); True if it had SAs (it counts as reclaimed).
        `keep_record`: its generations go, the record stays (pending) for traffic that already waits on it."""
        up = t.current is not None
        if keep_record:
            await self._renew(t, reason)
        else:
            await self.table.remove(t, reason)
        if up:
            self.metrics.reclaims.inc()
            if not keep_record:
                self.reclaimed[t.spec.key] = now
                while len(self.reclaimed) > 4096:  # a bounded memory of pairs that were up once
                    self.reclaimed.popitem(last=False)
            log.info("tunnel %s reclaimed: idle for %.0fs (%s)", describe(t.spec), self.settings.idle_timeout, reason)
        return up

    async def _renew(self, t: Tunnel, reason: str) -> None:
        """After `_stop_sending`: TunnelTable.remove's kernel half and its record of the removal, the tunnel's
        record kept: the in/fwd policies, then every SA of every generation; the scheduler then sets the pair up
        again at once. The out slot is left alone: the waiting ACQUIRE's pair trap holds the packets there."""
        started = self._monotonic()
        try:
            await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors, out=False)
            await self.table.delete_generations(t)
        except XfrmError as err:
            log.error("removing tunnel %s: %s", describe(t.spec), err)
        t.current = None
        t.retiring.clear()
        t.seen_bytes = (-1, -1)
        t.active_at = self._monotonic()
        t.next_attempt = t.last_nudge = 0.0
        t.nudges = 0
        if not t.spec.initiator:
            t.rekey_wanted = True  # a responder asks its initiator now, as for a new on-demand record
        self.table.record_removal(t, reason, started)
        log.info("tunnel %s removed (%s), its record kept: traffic waits for it", describe(t.spec), reason)
        self.table.touch(t)

    async def on_teardown_request(
        self, t: Tunnel, spis: tuple[int, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The peer asks to remove the idle pair `t` (its generation `spis`: (in, out) as the peer sees them)."""
        s = self.settings
        key = t.spec.key
        if key in self._asking and t.spec.initiator:
            # both sides reclaim at once: the initiator's request goes first (the peer's handler waits for ours)
            await answer_teardown(writer, Teardown.KEEP, "this side is asking to reclaim it too")
            return
        try:
            # the pair's responder, asking itself too, waits for its own request to come back KEEP
            async with asyncio.timeout(s.handshake_timeout / 2 if key in self._asking else 0.001):
                await t.lock.acquire()
        except TimeoutError:
            await answer_teardown(writer, Teardown.KEEP, "a handshake for it is running")
            return
        try:
            status, reason = await self._verdict(t, spis)
            g = t.current
            if status is not Teardown.STOPPED or g is None:
                await answer_teardown(writer, status, reason)
                return
            await self._stop_sending(t)
            # ACQUIREs of the pair (its traffic meets the trap now) wait for the removal instead of re-kicking it
            t.current = None
            try:
                async with asyncio.timeout(s.handshake_timeout):
                    await answer_teardown(writer, Teardown.STOPPED, "")
                    if not await wait_teardown_done(reader):
                        log.info("teardown of %s: the peer closed without done", describe(t.spec))
            except (OSError, TimeoutError) as err:
                log.info("teardown of %s: no done from the peer (%s): removing anyway", describe(t.spec), err)
            finally:
                t.current = g  # the removal counts and deletes what the generation holds
                # this side's traffic met the trap meanwhile: its ACQUIRE waits on this record, which stays for
                # the pair's next generation (a handshake as soon as the lock goes)
                waiting = key in self.in_flight
                await self._reclaimed(t, "idle: reclaimed by the peer", self._monotonic(), keep_record=waiting)
        except XfrmError as err:
            log.warning("teardown of %s: %s", describe(t.spec), err)
            with contextlib.suppress(OSError):
                await answer_teardown(writer, Teardown.KEEP, f"this side failed: {err}")
        finally:
            t.lock.release()

    async def _verdict(self, t: Tunnel, spis: tuple[int, int]) -> tuple[Teardown, str]:
        """May the peer's request remove `t` now (t.lock held)? STOPPED: yes; else why not."""
        s = self.settings
        g = t.current
        if s.idle_timeout <= 0:
            return Teardown.KEEP, "this bridge does not reclaim idle tunnels (--idle-timeout 0)"
        if t.removed or g is None:
            return Teardown.ABSENT, "no generation of it is up on this node"
        if self._pinned(t):
            return Teardown.KEEP, "this side keeps it: latency-critical (--eager-for)"
        if t.task is not None and not t.task.done():
            return Teardown.KEEP, "a handshake or rekey request for it is running"
        if (g.spi_out, g.spi_in) != spis:
            return Teardown.KEEP, f"this side's generation is another one (in 0x{g.spi_in:08x}, out 0x{g.spi_out:08x})"
        ep = t.spec.endpoints
        try:
            seen = (
                (await self.sa.xfrm.get_sa(self.sa.inbound_id(ep, g.spi_in))).current.bytes,
                (await self.sa.xfrm.get_sa(self.sa.outbound_id(ep, g.spi_out))).current.bytes,
            )
        except XfrmError as err:
            return Teardown.KEEP, f"reading its SA counters failed: {err}"
        if seen != t.seen_bytes:
            return Teardown.KEEP, "its SAs carried bytes since this side's last check"
        # this side notices a pair's last bytes up to one check later than the peer does
        quiet = self._monotonic() - max(t.active_at, g.established_mono)
        if quiet < s.idle_timeout - self.reclaim_interval():
            return Teardown.KEEP, f"its SAs carried bytes {quiet:.0f}s ago (idle timeout {s.idle_timeout:.0f}s here)"
        return Teardown.STOPPED, ""

    async def _stop_sending(self, t: Tunnel) -> None:
        """Delete the pair's out policies (its traffic falls to the trap); in/fwd policies and SAs stay for now."""
        await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors, inbound=False)

    # --- what the admin port shows -------------------------------------------------------------------------

    def _count(self, result: str) -> None:
        self.stats[result] += 1
        self.metrics.acquires.inc(result=result)

    def dump(self) -> dict[str, Any]:
        now = self._monotonic()
        return {
            "idle_timeout_seconds": self.settings.idle_timeout,
            "acquires": dict(self.stats),
            "held_queues": dict(self.held),
            "in_flight": len(self.in_flight),
            "denied_pairs": sorted(f"{a}->{b}" for (a, b), until in self.denied.items() if until > now),
            "reclaimed_pairs": [f"{k[1]}->{k[2]}" for k in self.reclaimed],
        }
