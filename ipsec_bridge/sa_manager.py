"""XFRM programming for the bridge: the default block, per-tunnel SAs and policies, make-before-break.

Layout in the node's netns (lower priority value wins):

    prio 50    on-demand, a pod's oldest   out  flow (5-tuple)  TRAP, until the pod's held first packets may go
               held packet's flow:
    prio 100   per tunnel, per pod pair:  out  local -> peer   tmpl tunnel(local node -> peer node, reqid R)
                                          in   peer -> local   tmpl tunnel(peer node -> local node, reqid 0)
                                          fwd  peer -> local   (same)
               on-demand, denied pair:    out  local -> peer   BLOCK, expires after deny_seconds (kernel lifetime)
    prio 200   per local pod:             out  mesh -> pod     allow (delivery to our own pods, also decrypted)
                                          fwd  pod -> mesh     allow (our pods' packets on their way out)
    prio 400   on-demand, a pair from its out  local -> peer   TRAP, in the slot of the pair's out policy, which
               ACQUIRE until it is up:                         (or its BLOCK) replaces it
    prio 450   on-demand, a released hold: out  flow (5-tuple)  TRAP, outranked by the pair's policy; expires (2 s)
    prio 500   on-demand, per local pod:  out  pod -> mesh     TRAP: tmpl transport(reqid TRAP_REQID), never an SA
    prio 1000  installed at start:        out  mesh -> mesh    BLOCK   fwd mesh -> mesh   BLOCK

So before any SA exists, and after a tunnel is removed, traffic between pods of different nodes is dropped,
never sent in clear: out BLOCK stops it leaving, fwd BLOCK stops plaintext arriving from other nodes (only
packets decrypted by an SA of the tunnel satisfy the pair's fwd template). In/fwd templates use reqid 0 so
they accept the old and the new SA during a rekey; each generation's outbound SA has a fresh reqid and the
out policy is switched to it with UPDPOLICY (make-before-break, see `GenerationInstaller`).

On-demand set-up (`SaSettings.on_demand`): a local pod's packet to a pod of another node with no pair policy
yet hits its pod's trap. The trap's template can never be satisfied, so the kernel keeps the packet (with
net.core.xfrm_larval_drop=0: in the policy's queue, <= 100 packets, see below) and sends XFRM_MSG_ACQUIRE. The
template is in transport mode on purpose: the kernel then takes the larval state's addresses from the packet
(pod -> pod), not from the template, so each pod pair gets its own larval state and ACQUIRE (a tunnel-mode
template would key one larval state per node pair, and while it exists no other pair to that node is reported).
A pair being set up is asked about once: its larval state suppresses further ACQUIREs until the bridge releases
it (ALLOCSPI with the ACQUIRE's seq, then DELSA) or it expires (net.core.xfrm_acq_expires, 30 s).

The hold queue belongs to the policy that matched (Linux 6.1 net/xfrm/xfrm_policy.c), so one pod's new pairs
share its trap's queue, and that queue leaves all at once: its timer (xfrm_policy_queue_process: after 0.1,
0.2, 0.4 ... s; the queue is purged once the step would pass 60 s) re-looks up only the oldest packet (the
head). While the head has no SA nothing moves; once it has one, every queued packet is routed again without
queueing (flags 0), so a packet whose own pair has no SA yet is freed (counted in XfrmOutNoStates), and a head
that meets a BLOCK frees the whole queue. A policy written with UPDPOLICY over one in the same slot (type,
selector, direction, mark, if_id: not the priority) takes over the old one's queue and runs it at once
(xfrm_policy_requeue); DELPOLICY frees the queue. Hence, per ACQUIRE:
- the pair gets its own trap in the slot its out policy will use (`hold`, NEWPOLICY: never over a policy that
  is already there), so its later packets wait in their own queue and the generation's UPDPOLICY of the out
  policy sends exactly them, at once, whatever the pod's other pairs are doing;
- the pod's oldest held packet (its first ACQUIRE since the queue last left) also gets a hold on its flow
  (the ACQUIRE's 5-tuple), above the pair policies, so its pair coming up does not let the pod's queue go while
  other pairs in it are still being set up; `kick` lets it go: the hold steps below the pair's policy (or, if
  that pair did not come up, becomes a BLOCK that frees the queue) and the pod's trap is re-written, which
  runs the queue at once. Flow holds have kernel lifetimes; a pair's trap goes with its record (its slot).
All of this was measured on Linux 6.1 (tests/kernel).

Ownership: every object carries `BRIDGE_MARK`; SA reqids come from `REQID_BASE`. At start (`start`), the
kernel's objects are dumped and `ipsec_bridge.adopt.plan_adoption` decides which form tunnels this bridge can
prove it made: those are adopted untouched (their traffic never stops), the rest is removed; the block policies
are only ever (re)installed in place, never removed. Reqids continue above the highest found, and SPIs held by
adopted SAs are never handed out again.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from ipsec_bridge.adopt import AdoptionPlan, Layout, plan_adoption, summary
from ipsec_bridge.handshake import HandshakeError
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import Mode, PolicyAction, PolicyDir
from ipsec_bridge.xfrm.netlink import XfrmError, XfrmSocket
from ipsec_bridge.xfrm.offload import OffloadStatus, offload_status

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

BRIDGE_MARK = m.Mark(0, 0x0F00)  # matches unmarked traffic; tells our objects apart in a dump
REQID_BASE = 0x5A00_0000
REQID_MASK = 0xFF00_0000
PAIR_PRIORITY = 100
BYPASS_PRIORITY = 200
BLOCK_PRIORITY = 1000
TRAP_PRIORITY = 500
TRAP_REQID = REQID_BASE | 0x00FF_FFFF  # transport mode: no SA of ours (all tunnel mode) ever matches it
# on-demand holds (module docstring): a pod's oldest held flow, a pair being set up, a released flow hold
FLOW_HOLD_PRIORITY = 50
PAIR_TRAP_PRIORITY = 400
RELEASED_HOLD_PRIORITY = 450
RELEASED_HOLD_SECONDS = 2  # the kernel runs the queue it took over at its next timer tick, long before this
HOLD_PRIORITIES = frozenset({TRAP_PRIORITY, FLOW_HOLD_PRIORITY, PAIR_TRAP_PRIORITY, RELEASED_HOLD_PRIORITY})
LARVAL_SPI_MIN, LARVAL_SPI_MAX = 0x100, 0xFFF  # below SPI_MIN: only ever given to a larval state, then deleted
SPI_MIN = 0x1000
SPI_MAX = 0xFFFF_FFFF
NO_ESN_SOFT_PACKETS = 1 << 31  # a 32-bit sequence number wraps at 2^32 packets
NO_ESN_HARD_PACKETS = (1 << 31) + (1 << 30)


@dataclass(frozen=True, slots=True)
class SaSettings:
    mesh_cidrs: tuple[IPNetwork, ...]
    replay_window: int = 128
    soft_bytes: int = 1 << 40
    hard_bytes: int = (1 << 40) + (1 << 38)
    soft_packets: int = 1 << 31
    hard_packets: int = (1 << 31) + (1 << 29)
    soft_seconds: int = 0  # 0: no kernel time limit (the bridge's own timer rekeys)
    hard_seconds: int = 0
    offload_mode: str = "none"  # none | crypto | packet
    offload_ifindex: int = 0
    # This node can key with 64-bit sequence numbers: false only behind an offload device without ESN
    # offload. A tunnel uses ESN when both of its sides can (negotiated in the handshake).
    esn: bool = True
    # on-demand set-up: trap policies per local pod (see the module docstring); a denied pair's block lifetime
    on_demand: bool = False
    deny_seconds: int = 30

    def __post_init__(self) -> None:
        if self.offload_mode not in ("none", "crypto", "packet"):
            raise ValueError(f"offload mode {self.offload_mode!r} is not none, crypto or packet")
        if self.offload_mode != "none" and self.offload_ifindex <= 0:
            raise ValueError("offload needs a device (--offload-dev)")

    def lifetime(self, esn: bool = True) -> m.Lifetime:
        # Without ESN the kernel stops an SA whose 32-bit counter would wrap (it never reuses a GCM nonce):
        # the limits end it first, so the rekey comes before that outage.
        soft, hard = self.soft_packets, self.hard_packets
        if not esn:
            soft, hard = min(soft, NO_ESN_SOFT_PACKETS), min(hard, NO_ESN_HARD_PACKETS)
        return m.Lifetime(
            soft_bytes=self.soft_bytes,
            hard_bytes=self.hard_bytes,
            soft_packets=soft,
            hard_packets=hard,
            soft_add_seconds=self.soft_seconds,
            hard_add_seconds=self.hard_seconds,
        )

    def sa_offload(self, inbound: bool) -> m.Offload | None:
        if self.offload_mode == "crypto":
            return m.Offload.crypto(self.offload_ifindex, inbound)
        if self.offload_mode == "packet":
            return m.Offload.packet(self.offload_ifindex, inbound)
        return None

    def policy_offload(self) -> m.Offload | None:
        return m.Offload.packet(self.offload_ifindex) if self.offload_mode == "packet" else None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """One tunnel from this node: outer addresses and the inner range its SAs cover."""

    local_node: IPAddress
    peer_node: IPAddress
    local_net: IPNetwork
    peer_net: IPNetwork

    def inbound_selector(self) -> m.Selector:
        return m.Selector(self.peer_net, self.local_net)

    def outbound_selector(self) -> m.Selector:
        return m.Selector(self.local_net, self.peer_net)


@functools.lru_cache(maxsize=8192)
def host_net(ip: IPAddress) -> IPNetwork:
    """`ip`'s /32 or /128. Shared: a pod has one per tunnel spec and selector it is in (ten peers: ten copies, ~0.3
    KiB each, without the cache), and making one parses a string."""
    return ip_network(f"{ip}/{ip.max_prefixlen}")


PairSelector = tuple[IPNetwork, IPNetwork]  # (local pod net, peer pod net)
SaKey = tuple[int, m.Aead]  # (SPI, its key)


def _ignore_missing(err: XfrmError) -> bool:
    return err.errno in (errno.ENOENT, errno.ESRCH)


Outcome = list[m.NetlinkMessage] | XfrmError


class Coalescer:
    """Requests of many handshakes that arrive while a batch is in flight go out together in the next one: one
    datagram and one worker-thread hop for all of them, each request still succeeding or failing on its own.
    Under load (a node bringing up many tunnels at once) this turns ~5 netlink round trips per tunnel into a
    fraction of one. Requests nobody waits for (`later`) ride at the head of the next batch."""

    def __init__(self, xfrm: XfrmSocket) -> None:
        self._xfrm = xfrm
        self._queue: list[tuple[list[m.Request], asyncio.Future[list[Outcome]]]] = []
        self._later: list[m.Request] = []
        self._task: asyncio.Task[None] | None = None
        self._leading = False  # a caller is about to send the next batch itself (`submit`)

    def later(self, requests: Sequence[m.Request]) -> None:
        """Send these first in the next batch, whoever's it is: before anything submitted from now on, without a
        worker-thread hop of their own (which costs the event loop milliseconds in a busy process). A refusal
        other than EEXIST (an object already in that slot, see SaManager.hold) is logged."""
        self._later.extend(requests)

    async def submit(self, requests: Sequence[m.Request]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        self._queue.append((list(requests), future))
        if not self._leading and (self._task is None or self._task.done()):
            # Nothing in flight: this caller leads the next batch. It yields one event-loop turn first, so what
            # is already scheduled adds its requests (an ACQUIRE's handler its trap), then sends the batch itself
            # when the kernel answers on the loop: one turn, where a batch task of its own took two (a turn is
            # ~80 us in UML). A batch that needs a worker thread goes to the batch task.
            self._leading = True
            try:
                await asyncio.sleep(0)
            finally:
                self._leading = False
                await self._lead(loop)
        return await future

    async def _lead(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._queue or (self._task is not None and not self._task.done()):
            return
        flat = [*self._later, *(r for reqs, _ in self._queue for r in reqs)]
        if self._xfrm.runs_inline(flat):
            await self._send_batch()  # answered on the loop: no suspension, nothing else runs meanwhile
        else:
            self._task = loop.create_task(self._drain(), name="xfrm-coalescer")

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._send_batch()
        finally:
            for _, future in self._queue:  # cancelled (shutdown): nobody waits forever
                if not future.done():
                    future.cancel()

    async def _send_batch(self) -> None:
        """Everything queued and every `later` request, in one call; each waiting request gets its own outcomes."""
        batch, self._queue = self._queue, []
        later, self._later = self._later, []
        flat = later + [r for reqs, _ in batch for r in reqs]
        try:
            results = await self._call(flat)
        except BaseException:  # cancelled mid-batch (shutdown): nobody waits forever
            for _, future in batch:
                if not future.done():
                    future.cancel()
            raise
        self._report_later(results[: len(later)])
        pos = len(later)
        for reqs, future in batch:
            if not future.done():
                future.set_result(results[pos : pos + len(reqs)])
            pos += len(reqs)

    async def _call(self, flat: list[m.Request]) -> list[Outcome]:
        try:
            return await self._xfrm.call_each(flat)
        except XfrmError as err:  # the socket itself failed: every request of the batch did
            return [err] * len(flat)

    @staticmethod
    def _report_later(results: Sequence[Outcome]) -> None:
        for result in results:
            if isinstance(result, XfrmError) and result.errno != errno.EEXIST:
                log.warning("%s", result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _trap(selector: m.Selector, priority: int, lifetime: m.Lifetime | None = None) -> m.Policy:
    """An out policy whose template no SA ever satisfies (transport mode, TRAP_REQID): the kernel holds what
    matches it and asks with ACQUIRE."""
    tmpl = (m.Template(None, None, reqid=TRAP_REQID, mode=Mode.TRANSPORT),)
    return m.Policy(selector, PolicyDir.OUT, priority=priority, templates=tmpl, mark=BRIDGE_MARK,
                    lifetime=lifetime if lifetime is not None else m.Lifetime())  # fmt: skip


def held_flow(selector: m.Selector) -> m.Selector:
    """The flow of an ACQUIRE's packet (its larval selector: addresses, protocol, ports with full masks), without
    the output interface, which the kernel fills in for a forwarded packet and no hold needs."""
    return m.Selector(selector.src, selector.dst, selector.proto, selector.sport, selector.sport_mask,
                      selector.dport, selector.dport_mask)  # fmt: skip


class InboundRefused(XfrmError):
    """The kernel refused the inbound SA of a proposed SPI (EEXIST: a live SA has it): nothing under that SPI is
    this generation's."""

    def __init__(self, err: XfrmError) -> None:
        super().__init__(err.op, err.errno, err.kernel_message, err.hint)


def _first_error(results: Sequence[Outcome], ignore_missing: bool = False) -> None:
    for result in results:
        if isinstance(result, XfrmError) and not (ignore_missing and _ignore_missing(result)):
            raise result


class SaManager:
    """All XFRM writes of one bridge. Safe to call from many tasks (requests are coalesced and serialized)."""

    def __init__(self, xfrm: XfrmSocket, settings: SaSettings) -> None:
        self.xfrm = xfrm
        self.settings = settings
        self._reqids = itertools.count(1)
        self._larval_spis = itertools.cycle(range(LARVAL_SPI_MIN, LARVAL_SPI_MAX + 1))  # release_acquire's names
        self._bypass: set[IPAddress] = set()
        self._held: set[tuple[IPAddress, int]] = set()  # (dst, SPI) of adopted SAs
        self._batches = Coalescer(xfrm)
        # on-demand (OnDemand's): requests to send right after a pair's out policy, in the same batch
        self.switch_hook: Callable[[PairSelector], list[m.Request]] | None = None

    def close(self) -> None:
        self._batches.close()

    # --- base policies -----------------------------------------------------------------------------------

    def block_policies(self) -> list[m.Policy]:
        out = []
        for src in self.settings.mesh_cidrs:
            for dst in self.settings.mesh_cidrs:
                if src.version != dst.version:
                    continue
                sel = m.Selector(src, dst)
                for direction in (PolicyDir.OUT, PolicyDir.FWD):
                    out.append(m.Policy(sel, direction, PolicyAction.BLOCK, BLOCK_PRIORITY, mark=BRIDGE_MARK))
        return out

    def layout(self, scope: TunnelScope, node_address: IPAddress | None = None) -> Layout:
        """What this configuration installs, for judging what a previous run left in the kernel."""
        return Layout(
            scope=scope,
            mesh_cidrs=self.settings.mesh_cidrs,
            mark=BRIDGE_MARK,
            block=tuple(self.block_policies()),
            reqid_base=REQID_BASE,
            reqid_mask=REQID_MASK,
            spi_min=SPI_MIN,
            pair_priority=PAIR_PRIORITY,
            bypass_priority=BYPASS_PRIORITY,
            node_address=node_address,
            trap_priority=TRAP_PRIORITY if self.settings.on_demand else 0,
            trap_reqid=TRAP_REQID,
            hold_priorities=HOLD_PRIORITIES - {TRAP_PRIORITY},
        )

    async def start(self, scope: TunnelScope = TunnelScope.POD, node_address: IPAddress | None = None) -> AdoptionPlan:
        """Adopt what a previous run left that can be proven ours, remove the rest (see ipsec_bridge.adopt).

        Missing block policies go in before anything is removed (UPDPOLICY: a present one with the same id is
        replaced in place, so the block is never absent), then the unprovable objects go, policies (out first)
        before SAs. Adopted objects are not written at all: no UPDSA, so no key or GCM nonce is ever reused."""
        policies = await self.xfrm.list_policies()
        sas = await self.xfrm.list_sas()
        plan = await asyncio.to_thread(plan_adoption, sas, policies, self.layout(scope, node_address))
        if plan.missing_block:
            await self.xfrm.add_policies(list(plan.missing_block), update=True)
        for r in (*plan.remove_policies, *plan.remove_sas):
            log.info("start: removing %s %s: %s", r.what, r.description, r.reason)
        await self._delete_policies([r.target for r in plan.remove_policies if isinstance(r.target, m.PolicyId)])
        await self.delete_sas([r.target for r in plan.remove_sas if isinstance(r.target, m.SaId)])
        for t in plan.tunnels:
            log.info("start: adopting tunnel %s (%d older generation(s))", t.describe(), len(t.older))
        self._bypass = set(plan.bypass)
        if self.settings.on_demand and plan.bypass:  # in place (UPDPOLICY): the adopted pods' traps, none missing
            await self.xfrm.add_policies([p for ip in plan.bypass for p in self.trap_policies(ip)], update=True)
        self._reqids = itertools.count(plan.highest_reqid + 1)
        self._held = set(plan.held_spis())
        log.info("start: %s", summary(plan))
        return plan

    def release(self, held: Iterable[tuple[IPAddress, int]]) -> None:
        """Adopted SAs that are gone: their SPIs are ordinary history now (the kernel keeps them unique)."""
        self._held.difference_update(held)

    async def set_local_pods(self, ips: Iterable[IPAddress]) -> None:
        """Bypass policies for delivery to, and forwarding from, this node's own pods."""
        wanted = set(ips)
        add = wanted - self._bypass
        gone = self._bypass - wanted
        if add:
            policies = [p for ip in sorted(add, key=str) for p in self._bypass_policies(ip)]
            await self.xfrm.add_policies(policies, update=True)
        if gone:
            await self._delete_policies([p.id() for ip in gone for p in self._bypass_policies(ip)])
        self._bypass = wanted

    def _bypass_policies(self, ip: IPAddress) -> list[m.Policy]:
        pod = host_net(ip)
        out = []
        for mesh in self.settings.mesh_cidrs:
            if mesh.version != pod.version:
                continue
            out.append(m.Policy(m.Selector(mesh, pod), PolicyDir.OUT, priority=BYPASS_PRIORITY, mark=BRIDGE_MARK))
            out.append(m.Policy(m.Selector(pod, mesh), PolicyDir.FWD, priority=BYPASS_PRIORITY, mark=BRIDGE_MARK))
        if self.settings.on_demand:
            out.extend(self.trap_policies(ip))
        return out

    # --- on-demand set-up --------------------------------------------------------------------------------

    def trap_policies(self, ip: IPAddress) -> list[m.Policy]:
        """A local pod's traps: out pod -> mesh with a template no SA satisfies, so the kernel holds the pair's
        first packets and sends ACQUIRE (transport mode: one larval state per pod pair, see the docstring)."""
        pod = host_net(ip)
        return [_trap(m.Selector(pod, mesh), TRAP_PRIORITY) for mesh in self.settings.mesh_cidrs
                if mesh.version == pod.version]  # fmt: skip

    def pair_trap(self, local: IPAddress, peer: IPAddress) -> m.Policy:
        """A pair's own trap, from its ACQUIRE until its out policy (or block) takes the same slot over, and with
        it the packets held here (see the docstring)."""
        return _trap(m.Selector(host_net(local), host_net(peer)), PAIR_TRAP_PRIORITY)

    @staticmethod
    def flow_hold(flow: m.Selector, seconds: int) -> m.Policy:
        """Holds a pod's oldest held packet's flow above its pair's policy; the kernel removes it after
        `seconds` (a bound the bridge's own release always comes before)."""
        return _trap(flow, FLOW_HOLD_PRIORITY, m.Lifetime(hard_add_seconds=seconds))

    @staticmethod
    def released_hold(flow: m.Selector, up: bool) -> m.Policy:
        """What a flow hold becomes when the pod's queue may go (same slot: its own queue moves on). `up`: a trap
        below the pair's policy, so the held packets are looked up again and take it; else a BLOCK, so they and
        the pod's queue behind them are freed (their pair did not come up). Gone from the kernel shortly."""
        lifetime = m.Lifetime(hard_add_seconds=RELEASED_HOLD_SECONDS)
        if up:
            return _trap(flow, RELEASED_HOLD_PRIORITY, lifetime)
        return m.Policy(flow, PolicyDir.OUT, PolicyAction.BLOCK, FLOW_HOLD_PRIORITY, mark=BRIDGE_MARK,
                        lifetime=lifetime)  # fmt: skip

    def hold(self, local: IPAddress, peer: IPAddress, flow: m.Selector | None, seconds: int) -> None:
        """The pair's trap (NEWPOLICY, so never over the out policy or block already in its slot: EEXIST then)
        and, for the pod's oldest held packet, the hold on its `flow` (the ACQUIRE's selector, see `held_flow`).

        They ride with the next batch (`Coalescer.later`), which comes before any policy the pair's handshake
        switches (that is a batch too) or any kick, so they cost the handshake no netlink round trip of its own."""
        requests = [m.new_policy(self.pair_trap(local, peer))]
        if flow is not None:
            requests.append(m.new_policy(self.flow_hold(flow, seconds), update=True))
        self._batches.later(requests)

    def deny_policy(self, local: IPAddress, peer: IPAddress) -> m.Policy:
        """A pair policy refuses: its packets are dropped here (not held, not asked about) until the kernel
        expires this block, after which the next packet asks again."""
        return m.Policy(
            m.Selector(host_net(local), host_net(peer)), PolicyDir.OUT, PolicyAction.BLOCK, PAIR_PRIORITY,
            mark=BRIDGE_MARK, lifetime=m.Lifetime(hard_add_seconds=self.settings.deny_seconds),
        )  # fmt: skip

    async def deny_pairs(self, pairs: Sequence[tuple[IPAddress, IPAddress]]) -> None:
        if pairs:
            requests = [m.new_policy(self.deny_policy(local, peer), update=True) for local, peer in pairs]
            _first_error(await self._batches.submit(requests))

    async def undeny_pairs(self, pairs: Sequence[tuple[IPAddress, IPAddress]]) -> None:
        """Policy admits these pairs now: their blocks go (if the kernel has not expired them already)."""
        await self._delete_policies([self.deny_policy(local, peer).id() for local, peer in pairs])

    async def release_acquire(self, acquire: m.Acquire) -> None:
        """Delete the larval state behind an ACQUIRE, so the pair's next trapped packet is reported again.

        The larval state has no SPI, and DELSA finds ESP states only by SPI: ALLOCSPI with the ACQUIRE's seq gives it
        the one we name (min = max, from a range no SA of ours uses), so the DELSA follows in the same batch: one
        round trip, nothing to decode. Gone already (expired): fine. If another larval state still held that SPI
        (its own release failed), the ALLOCSPI is refused and this one expires on its own (xfrm_acq_expires)."""
        spi = next(self._larval_spis)
        request = m.SpiRequest(
            acquire.src, acquire.dst, spi, spi, reqid=TRAP_REQID, mode=Mode.TRANSPORT, seq=acquire.seq,
            mark=BRIDGE_MARK,
        )  # fmt: skip
        larval = m.SaId(acquire.dst, spi, mark=BRIDGE_MARK, src=acquire.src)
        _first_error(await self._batches.submit([m.alloc_spi(request), m.delete_sa(larval)]), ignore_missing=True)

    async def kick(self, ip: IPAddress, flow: m.Selector | None = None, *, up: bool = True) -> None:
        """Let the packets a local pod's trap holds go now, in one batch (`kick_requests`)."""
        requests = self.kick_requests(ip, flow, up=up)
        if requests:
            _first_error(await self._batches.submit(requests))

    def kick_requests(self, ip: IPAddress, flow: m.Selector | None = None, *, up: bool = True) -> list[m.Request]:
        """The hold on the queue's head `flow` steps aside (`released_hold`), then UPDPOLICY of the pod's trap
        moves its queue to the new policy object and runs it at once (instead of at the queue timer's next tick,
        up to seconds later)."""
        requests = [m.new_policy(self.released_hold(flow, up), update=True)] if flow is not None else []
        if ip in self._bypass:
            requests.extend(m.new_policy(p, update=True) for p in self.trap_policies(ip))
        return requests

    # --- SAs ---------------------------------------------------------------------------------------------

    def next_reqid(self) -> int:
        return REQID_BASE | (next(self._reqids) & ~REQID_MASK)

    async def alloc_spi(self, ep: Endpoints, reqid: int) -> int:
        """A fresh SPI for an inbound SA (peer node -> this node), reserved by the kernel, never reused."""
        request = m.alloc_spi(
            m.SpiRequest(ep.peer_node, ep.local_node, SPI_MIN, SPI_MAX, reqid=reqid, mark=BRIDGE_MARK)
        )
        (result,) = await self._batches.submit([request])
        if isinstance(result, XfrmError):
            raise result
        found = m.decode_sas(result)
        if len(found) != 1:
            raise XfrmError("ALLOCSPI", errno.EPROTO, f"expected one SA in the reply, got {len(found)}")
        spi = found[0].sa.spi
        if (ep.local_node, spi) in self._held:
            # the kernel never hands out a live SPI (tests/kernel pins it); this keeps the promise visible
            raise XfrmError("ALLOCSPI", errno.EEXIST, f"the kernel returned SPI 0x{spi:08x} of an adopted SA")
        return spi

    def propose_spi(self, ep: Endpoints) -> int:
        """An SPI for an inbound SA, chosen at random and reserved by nothing until the SA goes in with NEWSA (which
        the kernel refuses if a live SA has it: the handshake fails and is retried; odds ~ live SAs / 2^32). The
        kernel's own ALLOCSPI chooses the same way, among SPIs that are not live."""
        while True:
            spi = SPI_MIN + secrets.randbelow(SPI_MAX - SPI_MIN + 1)
            if (ep.local_node, spi) not in self._held:
                return spi

    def inbound_sa(
        self, ep: Endpoints, spi: int, aead: m.Aead, reqid: int, *, esn: bool = True
    ) -> m.SecurityAssociation:
        return self._sa(ep, spi, aead, reqid, inbound=True, esn=esn)

    def outbound_sa(
        self, ep: Endpoints, spi: int, aead: m.Aead, reqid: int, *, esn: bool = True
    ) -> m.SecurityAssociation:
        return self._sa(ep, spi, aead, reqid, inbound=False, esn=esn)

    def _sa(
        self, ep: Endpoints, spi: int, aead: m.Aead, reqid: int, *, inbound: bool, esn: bool
    ) -> m.SecurityAssociation:
        # The two directions differ only in which node is the source and which selector applies.
        return m.SecurityAssociation(
            src=ep.peer_node if inbound else ep.local_node,
            dst=ep.local_node if inbound else ep.peer_node,
            spi=spi,
            aead=aead,
            selector=ep.inbound_selector() if inbound else ep.outbound_selector(),
            reqid=reqid,
            mode=Mode.TUNNEL,
            replay_window=self.settings.replay_window,
            esn=esn,
            lifetime=self.settings.lifetime(esn),
            mark=BRIDGE_MARK,
            offload=self.settings.sa_offload(inbound=inbound),
        )

    async def install(
        self,
        ep: Endpoints,
        reqid: int,
        selectors: Sequence[PairSelector],
        inbound: SaKey | None,
        outbound: SaKey | None,
        *,
        switch: bool = True,
        in_place: Iterable[PairSelector] = (),
        esn: bool = True,
        inbound_policies: bool = False,
        inbound_proposed: bool = False,
    ) -> tuple[OffloadStatus, OffloadStatus]:
        """One netlink batch, applied in order: the inbound SA (UPDSA over ALLOCSPI's larval state; NEWSA for an SPI
        from `propose_spi`) and, with `inbound_policies`, the pairs' in/fwd policies, then the outbound SA, then
        (with `switch`, see `switch_policies`) the pairs' policies switched to `reqid`.

        Returns the offload each SA really got (read back only when offload was asked for). A proposed SPI's SA
        that did not go in raises `InboundRefused`: that SPI is not ours to remove."""
        requests: list[m.Request] = []
        sa_in = sa_out = None
        if inbound is not None:
            sa_in = self.inbound_sa(ep, inbound[0], inbound[1], reqid, esn=esn)
            requests.append(m.new_sa(sa_in, update=not inbound_proposed))
            if inbound_policies:
                requests.extend(m.new_policy(p, update=True) for sel in selectors for p in self.in_policies(ep, sel))
        if outbound is not None:
            sa_out = self.outbound_sa(ep, outbound[0], outbound[1], reqid, esn=esn)
            requests.append(m.new_sa(sa_out))
            if switch:
                requests.extend(self._switch_requests(ep, selectors, reqid, in_place))
                requests.extend(self._after_switch(selectors))
        results = await self._batches.submit(requests)
        if inbound_proposed and sa_in is not None and isinstance(results[0], XfrmError):
            raise InboundRefused(results[0])
        _first_error(results)
        status_in = await self._offload_of(sa_in)
        status_out = await self._offload_of(sa_out)
        if outbound is not None and switch:
            await self._check_policy_offload(ep, selectors, reqid)
        return status_in, status_out

    async def _offload_of(self, sa: m.SecurityAssociation | None) -> OffloadStatus:
        if sa is None or sa.offload is None:
            return OffloadStatus.NONE
        status = offload_status(sa.offload, (await self.xfrm.get_sa(sa.id())).sa.offload)
        if sa.offload.is_packet and status is OffloadStatus.FALLBACK:
            raise XfrmError(
                f"NEWSA {sa.describe()}", errno.EOPNOTSUPP, "the kernel accepted packet offload but did not offload"
            )
        return status

    async def _check_policy_offload(self, ep: Endpoints, selectors: Sequence[PairSelector], reqid: int) -> None:
        if self.settings.policy_offload() is None:
            return
        for sel in selectors:
            wanted = self.out_policy(ep, sel, reqid)
            installed = (await self.xfrm.get_policy(wanted.id())).policy.offload
            if offload_status(wanted.offload, installed) is OffloadStatus.FALLBACK:
                raise XfrmError(
                    f"NEWPOLICY {wanted.describe()}", errno.EOPNOTSUPP,
                    "the kernel ignored the packet offload request (policy offload needs Linux >= 6.2)",
                )  # fmt: skip

    async def delete_sas(self, ids: Sequence[m.SaId]) -> None:
        """One batch; SAs already gone (expired, deleted by a peer's rollback) are not an error."""
        if ids:
            _first_error(await self._batches.submit([m.delete_sa(i) for i in ids]), ignore_missing=True)

    async def delete_sa_groups(self, groups: Sequence[Sequence[m.SaId]]) -> list[XfrmError | None]:
        """Many tunnels' SAs in one batch; per group its first error (None: all gone), as `delete_sas` would."""
        requests = [m.delete_sa(i) for ids in groups for i in ids]
        results = await self._batches.submit(requests) if requests else []
        out: list[XfrmError | None] = []
        pos = 0
        for ids in groups:
            try:
                _first_error(results[pos : pos + len(ids)], ignore_missing=True)
                out.append(None)
            except XfrmError as err:
                out.append(err)
            pos += len(ids)
        return out

    def inbound_id(self, ep: Endpoints, spi: int) -> m.SaId:
        return m.SaId(ep.local_node, spi, mark=BRIDGE_MARK, src=ep.peer_node)

    def outbound_id(self, ep: Endpoints, spi: int) -> m.SaId:
        return m.SaId(ep.peer_node, spi, mark=BRIDGE_MARK, src=ep.local_node)

    # --- per-pair policies -------------------------------------------------------------------------------

    def out_policy(self, ep: Endpoints, sel: PairSelector, reqid: int) -> m.Policy:
        return m.Policy(
            m.Selector(sel[0], sel[1]),
            PolicyDir.OUT,
            priority=PAIR_PRIORITY,
            templates=(m.Template(ep.local_node, ep.peer_node, reqid=reqid),),
            mark=BRIDGE_MARK,
            offload=self.settings.policy_offload(),
        )

    def in_policies(self, ep: Endpoints, sel: PairSelector) -> list[m.Policy]:
        tmpl = (m.Template(ep.peer_node, ep.local_node, reqid=0),)
        selector = m.Selector(sel[1], sel[0])
        return [
            m.Policy(selector, d, priority=PAIR_PRIORITY, templates=tmpl, mark=BRIDGE_MARK)
            for d in (PolicyDir.IN, PolicyDir.FWD)
        ]

    def _after_switch(self, selectors: Sequence[PairSelector]) -> list[m.Request]:
        """What goes in the same batch right after these pairs' out policies: on demand, the release of a pod's
        held queue whose last pair this is (`switch_hook`, OnDemand's), so its first packets leave with no round
        trip of their own."""
        hook = self.switch_hook
        return [r for sel in selectors for r in hook(sel)] if hook is not None else []

    def _switch_requests(
        self, ep: Endpoints, selectors: Sequence[PairSelector], reqid: int, in_place: Iterable[PairSelector]
    ) -> list[m.Request]:
        # in/fwd policies carry no reqid: for pairs whose ones are in place, only the out policy changes
        keep = set(in_place)
        out: list[m.Request] = []
        for sel in selectors:
            if sel not in keep:
                out.extend(m.new_policy(p, update=True) for p in self.in_policies(ep, sel))
            out.append(m.new_policy(self.out_policy(ep, sel, reqid), update=True))
        return out

    async def switch_policies(
        self, ep: Endpoints, selectors: Sequence[PairSelector], reqid: int, in_place: Iterable[PairSelector] = ()
    ) -> None:
        """Point the out policies of these pairs at generation `reqid` (UPDPOLICY: insert or replace), and put
        in their in/fwd policies, except for the pairs in `in_place` (a previous generation's are there)."""
        requests = self._switch_requests(ep, selectors, reqid, in_place)
        _first_error(await self._batches.submit([*requests, *self._after_switch(selectors)]))
        await self._check_policy_offload(ep, selectors, reqid)

    async def remove_policies(
        self, ep: Endpoints, selectors: Sequence[PairSelector], *, out: bool = True, inbound: bool = True
    ) -> None:
        """The pairs' out policies (first: their traffic falls to the block or trap at once) and in/fwd policies;
        `out`/`inbound` False leaves that half (idle reclaim with the peer stops sending before it stops receiving)."""
        ids = []
        for sel in selectors:
            if out:
                ids.append(self.out_policy(ep, sel, 0).id())
            if inbound:
                ids.extend(p.id() for p in self.in_policies(ep, sel))
        await self._delete_policies(ids)

    async def _delete_policies(self, ids: Sequence[m.PolicyId]) -> None:
        if ids:
            _first_error(await self._batches.submit([m.delete_policy(i) for i in ids]), ignore_missing=True)


@dataclass(slots=True)
class GenerationInstaller:
    """One handshake's writes (ipsec_bridge.handshake.Installer), undone by `rollback` on failure.

    Order: the inbound SPI (`propose_spi`, chosen here; or, with a revision-1 peer, ALLOCSPI) -> inbound SA (NEWSA,
    which reserves a proposed SPI; UPDSA over ALLOCSPI's larval state) -> outbound SA -> switch the out policies;
    the responder installs both SAs and the policies in one netlink batch, the initiator in two.

    With `defer_policies`, `install` puts in the SAs only and the caller switches the policies with `switch`
    once the exchange is over: a node tunnel carries thousands of pod pairs, and their policies must not
    count against the peer-facing handshake deadline. A new on-demand pod pair is the exception: its in/fwd
    policies go in with its inbound SA and its out policy with its outbound SA (`switch` then has nothing left
    to do), because its first packets are waiting and one pair's policies cost no deadline.
    """

    manager: SaManager
    endpoints: Endpoints
    selectors: tuple[PairSelector, ...]
    reqid: int
    previous_reqid: int | None
    spi_in: int = 0
    spi_out: int = 0
    offload_in: OffloadStatus = OffloadStatus.NONE
    offload_out: OffloadStatus = OffloadStatus.NONE
    switched: bool = False
    guard: list[str] = field(default_factory=list)  # non-empty: the tunnel went away, stop installing
    defer_policies: bool = False
    in_place: tuple[PairSelector, ...] = ()  # pairs whose in/fwd policies a previous generation put in
    inbound_early: bool = False  # this generation put in/fwd policies in with its inbound SA (on-demand)
    proposed: bool = False  # spi_in came from propose_spi: its SA may not exist (and then is not ours)
    inbound_in: bool = False  # its inbound SA was sent and not refused: ours to remove (a larval state always is)
    switched_with_sa: bool = False  # the out policies went in with the outbound SA (a new on-demand pair)

    def _check(self) -> None:
        if self.guard:
            raise HandshakeError("denied", self.guard[0])

    async def allocate_spi(self) -> int:
        self._check()
        self.spi_in = await self.manager.alloc_spi(self.endpoints, self.reqid)
        return self.spi_in

    def propose_spi(self) -> int:
        self._check()
        self.spi_in = self.manager.propose_spi(self.endpoints)
        self.proposed = True  # the inbound SA is ours to remove only once `install` has put it in
        return self.spi_in

    async def install(self, inbound: SaKey | None, outbound: SaKey | None, *, esn: bool = True) -> None:
        self._check()
        # On-demand, a new tunnel's first packets are waiting: the in/fwd policies go in with the inbound SA, so
        # they exist before the peer learns our SPI and none of its first packets meets the fwd block here.
        early = self.manager.settings.on_demand and inbound is not None and self.defer_policies and not self.in_place
        # ... and then its out policy goes in with the outbound SA, in the same batch: the peer's inbound SA and
        # in/fwd policies exist by then (it installed them before answering), and a pod pair's one policy costs
        # the exchange's deadline nothing (what `defer_policies` is for: a node tunnel's thousands)
        with_sa = outbound is not None and (early or self.inbound_early) and len(self.selectors) == 1
        switch = not self.defer_policies or with_sa
        if outbound is not None:
            self.spi_out = outbound[0]  # known before the batch: a failed batch is rolled back whole
            self.switched = self.switched or switch
            self.switched_with_sa = with_sa
        if early:
            self.inbound_early = True  # before the batch: a failed one is rolled back whole
        if inbound is not None:
            self.inbound_in = True  # before the batch as well, unless the kernel refused the SA itself (below)
        try:
            status_in, status_out = await self.manager.install(
                self.endpoints, self.reqid, self.selectors, inbound, outbound,
                switch=switch, in_place=self.selectors if self.inbound_early else self.in_place, esn=esn,
                inbound_policies=early, inbound_proposed=self.proposed,
            )  # fmt: skip
        except InboundRefused:
            self.inbound_in = False  # a live SA has that SPI: not ours to remove
            raise
        if early:
            self.in_place = self.selectors  # the deferred switch changes the out policies only
        if inbound is not None:
            self.offload_in = status_in
        if outbound is not None:
            self.offload_out = status_out
        self._check()

    async def switch(self, selectors: Sequence[PairSelector] | None = None) -> None:
        """The deferred policies (after both SAs exist): the pairs' out policies to this generation, and the
        in/fwd policies of pairs not `in_place`. `selectors`: the tunnel's pairs as they are now, if changed."""
        self._check()
        if not self.spi_in or not self.spi_out:
            raise XfrmError("switch", errno.EINVAL, "the generation's SAs are not installed")
        if self.switched_with_sa and (selectors is None or tuple(selectors) == self.selectors):
            return  # they went in with the outbound SA
        if selectors is not None:
            self.selectors = tuple(selectors)
        self.switched = True  # before the batch: a failed one is rolled back whole
        await self.manager.switch_policies(self.endpoints, self.selectors, self.reqid, self.in_place)
        self._check()

    def sa_ids(self) -> list[m.SaId]:
        ids = []
        if self.spi_out:
            ids.append(self.manager.outbound_id(self.endpoints, self.spi_out))
        if self.spi_in and (self.inbound_in or not self.proposed):
            ids.append(self.manager.inbound_id(self.endpoints, self.spi_in))
        return ids

    async def rollback(self) -> None:
        """Undo this generation: out policies back to the previous one (or gone), then its SAs."""
        try:
            if self.switched or self.inbound_early:
                if self.previous_reqid is not None and not self.guard:
                    await self.manager.switch_policies(
                        self.endpoints, self.selectors, self.previous_reqid, self.in_place
                    )
                else:
                    await self.manager.remove_policies(self.endpoints, self.selectors)
            await self.manager.delete_sas(self.sa_ids())
        except XfrmError as err:
            log.warning("rolling back generation reqid 0x%x: %s", self.reqid, err)

    @property
    def offload(self) -> OffloadStatus:
        """The weaker of the two directions: a fallback on either side is a fallback."""
        order = [OffloadStatus.FALLBACK, OffloadStatus.NONE, OffloadStatus.CRYPTO, OffloadStatus.PACKET]
        return min((self.offload_in, self.offload_out), key=order.index)
