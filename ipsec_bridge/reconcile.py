"""The tunnels of one node: desired (from the NodeView) vs established, kept in step.

- `desired_specs` (pure) turns the view into one TunnelSpec per tunnel this node should have.
- `TunnelManager.reconcile` removes tunnels that are no longer admitted at once (policies first, so their
  traffic hits the block, then every SA) and creates records for new ones.
- The scheduler starts handshakes for the tunnels this node initiates (and retries them with backoff),
  rekeys them before their time is up, on a soft EXPIRE, on a certificate renewal and on demand, deletes
  retired generations after the grace period, and drops SAs whose certificates expired.
- The server answers the peers' handshakes for the tunnels this node responds to, and their rekey requests.
A responder never starts a handshake: when it wants a rekey (its own soft EXPIRE, renewal, restart, an
operator) it asks the initiator, so the two sides never race to replace a generation.
- Restart (`adopt`, see ipsec_bridge.adopt): tunnels a previous run left in the kernel stay untouched until the
  workload state is synced; then each one the policies still admit becomes a record whose current generation
  is the adopted one, rekeyed at once (make-before-break, the adopted SAs retire after the grace period), and
  the others are removed. Until that decision, handshakes are answered with not-ready.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

from ipsec_bridge.adopt import AdoptedGeneration, AdoptedTunnel, AdoptionPlan, removal_reasons
from ipsec_bridge.certs import Certificates
from ipsec_bridge.handshake import (
    HandshakeError,
    Kind,
    Plan,
    Preamble,
    Result,
    initiate,
    read_preamble,
    refuse,
    request_rekey,
    respond,
    status_ok,
)
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.netns import Netns
from ipsec_bridge.pairs import PodPair, TunnelScope, node_tunnels, pair_for, pod_pairs
from ipsec_bridge.sa_manager import BRIDGE_MARK, Endpoints, GenerationInstaller, PairSelector, SaManager, host_net
from ipsec_bridge.state import NodeView, StateStore
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import EventsLost, XfrmError, XfrmEvents
from ipsec_bridge.xfrm.offload import OffloadStatus
from ztcore.backoff import Backoff
from ztcore.identity import Identity
from ztcore.metrics import Registry

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
TunnelKey = tuple[str, str, str]  # ("pod", local ip, peer ip) or ("node", local node, peer node)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    node: str
    scope: TunnelScope = TunnelScope.POD
    port: int = 15009
    node_address: IPAddress | None = None  # else: this node's bridge pod address from WDS
    rekey_interval: float = 3600.0
    rekey_jitter: float = 0.1
    grace: float = 2.0
    handshake_timeout: float = 10.0  # the exchange with the peer (TLS, SPIs, the SAs); not the pair policies
    # The pair policies go in after the exchange, under their own deadline: handshake_timeout plus this much per
    # policy (a node tunnel with 10,000 pod pairs switches 10,000-30,000 of them; UML needed up to 31 s).
    policy_seconds_each: float = 0.005
    cert_wait: float = 10.0
    key_bytes: int = 16
    max_parallel_handshakes: int = 32
    retry_initial: float = 0.5
    retry_max: float = 30.0
    responder_nudge_after: float = 3.0  # a responder without a tunnel asks the initiator after this long
    min_rekey_gap: float = 2.0  # rekey requests right after a handshake are answered by that handshake
    # An adopted generation's certificates are unknown: one no handshake replaced within this long is removed.
    adopt_max_age: float = 600.0
    # A handshake must come from the peer node's underlay address. In node scope the certificate names only the
    # bridges' shared service account, so without this one node's bridge could claim another node's tunnel.
    # Off only where bridges share one host address (tests over loopback).
    check_source_address: bool = True


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    key: TunnelKey
    scope: TunnelScope
    initiator: bool
    endpoints: Endpoints
    selectors: tuple[PairSelector, ...]
    local_identity: Identity
    peer_identity: Identity
    local_name: str
    peer_name: str
    local_address: IPAddress  # what the keys bind: pod addresses, or node addresses in node scope
    peer_address: IPAddress
    peer_node: str

    def same_tunnel(self, other: TunnelSpec) -> bool:
        """Everything but the pod pairs a node tunnel carries: a change here means a new tunnel."""
        return (
            self.initiator == other.initiator
            and self.endpoints == other.endpoints
            and self.local_identity == other.local_identity
            and self.peer_identity == other.peer_identity
        )


def pod_spec(view: NodeView, pair: PodPair, local_address: IPAddress) -> TunnelSpec | None:
    peer_address = view.node_address(pair.remote.node)
    if peer_address is None or peer_address.version != local_address.version:
        return None
    local_net, peer_net = host_net(pair.local.ip), host_net(pair.remote.ip)
    return TunnelSpec(
        key=("pod", str(pair.local.ip), str(pair.remote.ip)),
        scope=TunnelScope.POD,
        initiator=pair.initiator,
        endpoints=Endpoints(local_address, peer_address, local_net, peer_net),
        selectors=((local_net, peer_net),),
        local_identity=pair.local.identity,
        peer_identity=pair.remote.identity,
        local_name=pair.local.name,
        peer_name=pair.remote.name,
        local_address=pair.local.ip,
        peer_address=pair.remote.ip,
        peer_node=pair.remote.node,
    )


def desired_specs(
    view: NodeView, node: str, scope: TunnelScope, node_address: IPAddress | None
) -> tuple[dict[TunnelKey, TunnelSpec], list[PodPair]]:
    """Pure: the tunnels this node should have, and the pod pairs policy refuses (for the config dump)."""
    local_address = node_address or view.node_address(node)
    if local_address is None:
        return {}, []
    admitted, refused = pod_pairs(view, node)
    specs: dict[TunnelKey, TunnelSpec] = {}
    if scope is TunnelScope.POD:
        for pair in admitted.values():
            spec = pod_spec(view, pair, local_address)
            if spec is not None:
                specs[spec.key] = spec
        return specs, refused
    bridge = view.settings.bridge_identity
    for peer, tunnel in node_tunnels(view, node, local_address).items():
        any_net = ip_network("0.0.0.0/0") if tunnel.local_address.version == 4 else ip_network("::/0")
        key: TunnelKey = ("node", node, peer)
        specs[key] = TunnelSpec(
            key=key,
            scope=TunnelScope.NODE,
            initiator=tunnel.initiator,
            endpoints=Endpoints(tunnel.local_address, tunnel.peer_address, any_net, any_net),
            selectors=tuple((host_net(p.local.ip), host_net(p.remote.ip)) for p in tunnel.pairs),
            local_identity=bridge,
            peer_identity=bridge,
            local_name=node,
            peer_name=peer,
            local_address=tunnel.local_address,
            peer_address=tunnel.peer_address,
            peer_node=peer,
        )
    return specs, refused


# --- runtime records ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Generation:
    number: int
    reqid: int
    spi_in: int
    spi_out: int
    key_bytes: int
    offload: OffloadStatus
    established: dt.datetime
    established_mono: float
    not_after: dt.datetime  # the earlier of the two certificates' expiry (adopted: the adoption deadline)
    handshake_seconds: float
    origin: str = "handshake"  # or "adopted": found in the kernel at start, keyed by a previous run
    esn: bool = True  # 64-bit sequence numbers (negotiated: false when either side's offload device lacks them)

    def sa_ids(self, sa: SaManager, ep: Endpoints) -> list[m.SaId]:
        return [sa.outbound_id(ep, self.spi_out), sa.inbound_id(ep, self.spi_in)]


@dataclass(slots=True)
class Tunnel:
    spec: TunnelSpec
    created: float
    current: Generation | None = None
    retiring: list[tuple[Generation, float]] = field(default_factory=list)
    generations: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    next_rekey: float | None = None
    rekey_wanted: bool = False
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    last_nudge: float = 0.0
    nudges: int = 0  # unanswered rekey requests in a row (they back off like handshakes)
    last_request: float = 0.0
    guard: list[str] = field(default_factory=list)  # set on removal; in-flight installers stop
    rekey_reason: str = ""
    limit_kind: str = ""  # "bytes" or "packets": which kernel limit the last EXPIRE was about (metrics)
    history: collections.deque[tuple[int, str, str]] = field(default_factory=lambda: collections.deque(maxlen=8))

    def want_rekey(self, reason: str) -> None:
        self.rekey_wanted = True
        if not self.rekey_reason:
            self.rekey_reason = reason

    @property
    def removed(self) -> bool:
        return bool(self.guard)


class BridgeMetrics:
    def __init__(self, registry: Registry) -> None:
        self.handshakes = registry.counter(
            "zt_bridge_handshakes_total", "Tunnel handshakes by role and result (ok, or the failure code)"
        )
        self.rekeys = registry.counter(
            "zt_bridge_rekeys_total",
            "Completed rekeys (a new generation replaced one), by role and trigger (time, bytes, packets, renewal, "
            "demand, peer)",
        )
        self.removals = registry.counter("zt_bridge_tunnel_removals_total", "Tunnels whose SAs were removed, by reason")
        self.rekey_requests = registry.counter(
            "zt_bridge_rekey_requests_total", "Rekey requests sent to or received from peers, by direction"
        )
        self.offload_fallbacks = registry.counter(
            "zt_bridge_offload_fallback_total", "Generations whose SAs asked for offload but run in software"
        )
        self.handshake_seconds = registry.histogram(
            "zt_bridge_handshake_duration_seconds",
            "Handshake + key export + SA/SP install, per successful handshake",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.adoption = registry.counter(
            "zt_bridge_adoption_total",
            "Restart decisions: tunnels adopted at start, then kept (rekeyed) or removed; unprovable objects removed",
        )
        self.removal_seconds = registry.histogram(
            "zt_bridge_removal_duration_seconds",
            "From the state change that refused a tunnel until its policies and SAs are gone",
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1),
        )


def _wall() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TunnelManager:
    def __init__(
        self,
        settings: BridgeSettings,
        store: StateStore,
        sa: SaManager,
        certs: Certificates,
        netns: Netns,
        metrics: BridgeMetrics,
        *,
        clock: Callable[[], dt.datetime] = _wall,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sa = sa
        self.certs = certs
        self.netns = netns
        self.metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - rekey jitter spreads load, it is not a secret
        self.tunnels: dict[TunnelKey, Tunnel] = {}
        self.refused: list[PodPair] = []
        self.view_version = -1
        self._wake = asyncio.Event()
        self._parallel = asyncio.Semaphore(settings.max_parallel_handshakes)
        self._tg: asyncio.TaskGroup | None = None
        self.errors: dict[str, str] = {}
        self.removals: collections.deque[dict[str, Any]] = collections.deque(maxlen=32)
        self._adopted: list[AdoptedTunnel] = []
        self._adoption_settled = True
        self._adopt_deadline = self._clock()
        self.adoption: dict[str, Any] = {"adopted": 0, "removed_at_start": {"sas": 0, "policies": 0}}
        certs.on_renewed(self._on_renewed)

    # --- restart -----------------------------------------------------------------------------------------

    def adopt(self, plan: AdoptionPlan) -> None:
        """Take over the tunnels `SaManager.start` found provable; they wait for the first synced state."""
        self._adopted = list(plan.tunnels)
        self._adoption_settled = False
        self._adopt_deadline = self._clock() + dt.timedelta(seconds=self.settings.adopt_max_age)
        self.adoption = {
            "adopted": len(plan.tunnels),
            "removed_at_start": {"sas": len(plan.remove_sas), "policies": len(plan.remove_policies)},
            "removal_reasons": removal_reasons((*plan.remove_policies, *plan.remove_sas)),
            "kept": 0,
            "removed_after_sync": 0,
        }
        if plan.tunnels:
            self.metrics.adoption.inc(len(plan.tunnels), decision="adopted")
        if plan.remove_sas:
            self.metrics.adoption.inc(len(plan.remove_sas), decision="unprovable sa")
        if plan.remove_policies:
            self.metrics.adoption.inc(len(plan.remove_policies), decision="unprovable policy")

    def _adopted_generation(self, g: AdoptedGeneration, now: float, wall: dt.datetime) -> Generation:
        age = max(0.0, wall.timestamp() - g.added) if g.added else 0.0
        return Generation(
            number=0,
            reqid=g.reqid,
            spi_in=g.spi_in,
            spi_out=g.spi_out,
            key_bytes=g.key_bytes,
            offload=OffloadStatus.NONE,
            established=wall - dt.timedelta(seconds=age),
            established_mono=now - age,
            not_after=self._adopt_deadline,
            handshake_seconds=0.0,
            origin="adopted",
        )

    async def _settle_adoption(self, specs: dict[TunnelKey, TunnelSpec]) -> None:
        """First synced state: adopted tunnels it admits (same endpoints) are kept and rekeyed, the rest go."""
        by_endpoints = {spec.endpoints: spec for spec in specs.values()}
        adopted, self._adopted = self._adopted, []
        now, wall = time.monotonic(), self._clock()
        for a in adopted:
            spec = by_endpoints.get(_adopted_endpoints(a))
            if spec is None:
                await self._drop_adopted(a, "not admitted after restart")
                continue
            gens = [self._adopted_generation(g, now, wall) for g in a.generations()]
            t = self.tunnels.get(spec.key)
            if t is not None and t.current is not None:  # cannot happen (handshakes wait), but never lose a gen
                t.retiring.extend((g, now + self.settings.grace) for g in gens)
                continue
            t = self.tunnels[spec.key] = Tunnel(dataclasses.replace(spec, selectors=a.selectors), now)
            t.current = gens[0]
            t.retiring = [(g, now + self.settings.grace) for g in gens[1:]]
            t.history.append((0, "adopted at restart", gens[0].established.isoformat()))
            t.want_rekey("replacing adopted keys")
            self.metrics.adoption.inc(decision="kept")
            self.adoption["kept"] = self.adoption.get("kept", 0) + 1
            log.info("adopted tunnel %s is admitted: %s", _describe(spec),
                     "rekeying it" if spec.initiator else "asking its initiator for a rekey")  # fmt: skip
        self._adoption_settled = True

    async def _drop_adopted(self, a: AdoptedTunnel, reason: str) -> None:
        ep = _adopted_endpoints(a)
        started = time.monotonic()
        try:
            await self.sa.remove_policies(ep, a.selectors)  # out first: the block takes the pair's traffic
            await self.sa.delete_sas([i for g in a.generations() for i in _gen_ids(self.sa, ep, g)])
        except XfrmError as err:
            log.error("removing adopted tunnel %s: %s", a.describe(), err)
        self.sa.release({(ep.local_node, g.spi_in) for g in a.generations()}
                        | {(ep.peer_node, g.spi_out) for g in a.generations()})  # fmt: skip
        self.metrics.adoption.inc(decision="removed")
        self.adoption["removed_after_sync"] = self.adoption.get("removed_after_sync", 0) + 1
        if a.scope is TunnelScope.POD:
            key = f"adopted/{ep.local_net.network_address}/{ep.peer_net.network_address}"
        else:
            key = f"adopted/{ep.local_node}/{ep.peer_node}"
        self.removals.append({"tunnel": key, "reason": reason, "seconds": round(time.monotonic() - started, 4)})
        log.info("adopted tunnel %s removed: %s", a.describe(), reason)

    def _forget(self, t: Tunnel, gens: Iterable[Generation]) -> None:
        """Adopted generations deleted from the kernel: their SPIs need no guarding any more."""
        ep = t.spec.endpoints
        held = [((ep.local_node, g.spi_in), (ep.peer_node, g.spi_out)) for g in gens if g.origin == "adopted"]
        if held:
            self.sa.release([x for pair in held for x in pair])

    # --- reconcile ---------------------------------------------------------------------------------------

    def _local_address(self, view: NodeView) -> IPAddress | None:
        return self.settings.node_address or view.node_address(self.settings.node)

    async def reconcile(self, view: NodeView) -> None:
        if not view.synced:
            return
        s = self.settings
        specs, refused = await asyncio.to_thread(desired_specs, view, s.node, s.scope, s.node_address)
        self.refused = refused
        self.view_version = view.version
        if self._local_address(view) is None:
            self.errors["node-address"] = (
                f"no address for node {s.node}: no bridge pod of {view.settings.bridge_namespace}/"
                f"{view.settings.bridge_service_account} on it in WDS, and no --node-address"
            )
        else:
            self.errors.pop("node-address", None)
        if not self._adoption_settled:
            await self._settle_adoption(specs)
        gone = [t for key, t in self.tunnels.items() if key not in specs or not specs[key].same_tunnel(t.spec)]
        if gone:
            since = view.received_at or None
            await asyncio.gather(*(self.remove(t, "policy or workload change", since=since) for t in gone))
        for key, spec in specs.items():
            t = self.tunnels.get(key)
            if t is None:
                self.tunnels[key] = Tunnel(spec, time.monotonic())
            elif spec.selectors != t.spec.selectors:
                await self._update_selectors(t, spec)
        local_ips = [p.ip for p in view.pods_on(s.node)]
        await self.sa.set_local_pods(local_ips)
        if s.scope is TunnelScope.POD:
            self.certs.want({spec.local_identity for spec in specs.values()})
        else:
            self.certs.want({view.settings.bridge_identity})
        self._wake.set()

    async def _update_selectors(self, t: Tunnel, spec: TunnelSpec) -> None:
        old, new = set(t.spec.selectors), set(spec.selectors)
        t.spec = spec
        if old - new:
            await self.sa.remove_policies(spec.endpoints, sorted(old - new, key=str))
        if t.current is not None and new - old:
            await self.sa.switch_policies(spec.endpoints, sorted(new - old, key=str), t.current.reqid)

    async def remove(self, t: Tunnel, reason: str, since: float | None = None) -> None:
        """Policies first (their traffic falls to the block), then every SA of every generation.

        `since`: when the state change that removed the tunnel arrived (the latency is measured from it)."""
        started = since if since is not None else time.monotonic()
        t.guard.append(reason)
        if t.task is not None and not t.task.done():
            t.task.cancel()
        if self.tunnels.get(t.spec.key) is t:
            del self.tunnels[t.spec.key]
        had_sas = t.current is not None or bool(t.retiring)
        try:
            await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors)
            gens = [g for g in [t.current, *(g for g, _ in t.retiring)] if g is not None]
            ids = [i for g in gens for i in g.sa_ids(self.sa, t.spec.endpoints)]
            await self.sa.delete_sas(ids)
            self._forget(t, gens)
        except XfrmError as err:
            log.error("removing tunnel %s: %s", _describe(t.spec), err)
        t.current = None
        t.retiring.clear()
        if had_sas:
            seconds = time.monotonic() - started
            self.metrics.removals.inc(reason=reason.split(":")[0])
            self.metrics.removal_seconds.observe(seconds)
            self.removals.append({"tunnel": "/".join(t.spec.key), "reason": reason, "seconds": round(seconds, 4)})
            log.info("tunnel %s removed (%s) %.3fs after the change", _describe(t.spec), reason, seconds)

    # --- handshakes --------------------------------------------------------------------------------------

    def _recheck(self, spec: TunnelSpec) -> str | None:
        view = self.store.view
        specs_now = self._spec_now(view, spec.scope, spec.key)
        if isinstance(specs_now, str):
            return specs_now
        if not specs_now.same_tunnel(spec):
            return "the tunnel changed while its handshake ran"
        return None

    def _spec_now(self, view: NodeView, scope: TunnelScope, key: TunnelKey) -> TunnelSpec | str:
        """The spec of tunnel `key` in `view`, or why the view has no such tunnel."""
        local_address = self._local_address(view)
        if local_address is None:
            return f"no address for node {self.settings.node}"
        if scope is TunnelScope.POD:
            pair = pair_for(view, self.settings.node, ip_address(key[1]), ip_address(key[2]))
            if isinstance(pair, str):
                return pair
            found = pod_spec(view, pair, local_address)
            return found if found is not None else f"no bridge address for node {pair.remote.node}"
        specs, _ = desired_specs(view, self.settings.node, scope, self.settings.node_address)
        return specs.get(key) or f"no admitted pod pair with node {key[2]}"

    def _installer(self, t: Tunnel) -> GenerationInstaller:
        previous = t.current.reqid if t.current is not None else None
        return GenerationInstaller(
            self.sa, t.spec.endpoints, t.spec.selectors, self.sa.next_reqid(), previous, guard=t.guard,
            defer_policies=True,
            # a rekey: the current generation's in/fwd policies (reqid 0) stay as they are, only out switches
            in_place=t.spec.selectors if t.current is not None else (),
        )  # fmt: skip

    async def _switch(self, t: Tunnel, installer: GenerationInstaller) -> float:
        """The exchange is over and both SAs exist: switch the pair policies under their own deadline, which
        grows with the number of policies. Rolls the generation back if that fails. Returns the seconds taken."""
        started = time.monotonic()
        s = self.settings
        pairs = len(t.spec.selectors)
        policies = pairs if t.current is not None else 3 * pairs
        try:
            async with asyncio.timeout(s.handshake_timeout + policies * s.policy_seconds_each):
                await installer.switch(t.spec.selectors)  # the pairs as they are now (the state may have moved)
        except BaseException:
            await installer.rollback()
            raise
        return time.monotonic() - started

    def _preamble(self, spec: TunnelSpec, kind: Kind) -> Preamble:
        key_bytes = self.settings.key_bytes
        if spec.scope is TunnelScope.POD:
            return Preamble(kind, KeyScope.POD, str(spec.local_address), str(spec.peer_address), key_bytes)
        return Preamble(kind, KeyScope.NODE, spec.local_name, spec.peer_name, key_bytes)

    async def _plan(self, t: Tunnel, installer: GenerationInstaller) -> Plan:
        spec = t.spec
        cred, ctx = await self.certs.credential(spec.local_identity, self.settings.cert_wait)
        ends = (spec.local_address, spec.peer_address)
        if not spec.initiator:
            ends = (spec.peer_address, spec.local_address)
        return Plan(
            credential=cred,
            context=ctx,
            expected_peer=spec.peer_identity,
            initiator_address=ends[0],
            responder_address=ends[1],
            installer=installer,
            recheck=lambda: self._recheck(spec),
            esn=self.sa.settings.esn,
        )

    async def _initiate(self, t: Tunnel) -> None:
        s = self.settings
        installer: GenerationInstaller | None = None
        try:
            async with self._parallel, t.lock:
                if t.removed:
                    return
                async with asyncio.timeout(s.handshake_timeout):
                    installer = self._installer(t)
                    plan = await self._plan(t, installer)
                    peer = str(t.spec.endpoints.peer_node)
                    reader, writer = await self.netns.connect(
                        peer, s.port, s.handshake_timeout, source=str(t.spec.endpoints.local_node)
                    )
                    try:
                        result = await initiate(reader, writer, self._preamble(t.spec, Kind.HANDSHAKE), plan)
                    finally:
                        writer.close()
                switch_seconds = await self._switch(t, installer)
                await self._commit(t, installer, result, switch_seconds)
        except asyncio.CancelledError:
            raise
        except (HandshakeError, OSError, TimeoutError, XfrmError) as err:
            self._failed(t, "initiator", err)
        except Exception as err:  # a bug must not stop the other tunnels
            log.exception("handshake for %s", _describe(t.spec))
            self._failed(t, "initiator", err)

    def _failed(self, t: Tunnel, role: str, err: BaseException) -> None:
        code = _code(err)
        self.metrics.handshakes.inc(role=role, result=code)
        t.failures += 1
        delay = Backoff(self.settings.retry_initial, self.settings.retry_max, jitter=(0.8, 1.0)).jittered(
            t.failures, self._rng
        )
        t.next_attempt = time.monotonic() + delay
        t.last_error = f"{code}: {err}"
        log.warning("handshake (%s) for %s failed: %s; retry in %.1fs", role, _describe(t.spec), t.last_error, delay)

    async def _commit(self, t: Tunnel, installer: GenerationInstaller, result: Result, switch_seconds: float) -> None:
        role = "initiator" if result.initiator else "responder"
        if t.removed:
            await installer.rollback()
            await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors)
            self.metrics.handshakes.inc(role=role, result="removed")
            return
        switched = set(installer.selectors)
        added = [sel for sel in t.spec.selectors if sel not in switched]
        if added:  # pairs the state added while the policies were switched went to the old generation
            await self.sa.switch_policies(t.spec.endpoints, added, installer.reqid)
        now = time.monotonic()
        t.generations += 1
        gen = Generation(
            number=t.generations,
            reqid=installer.reqid,
            spi_in=result.spi_in,
            spi_out=result.spi_out,
            key_bytes=result.key_bytes,
            offload=installer.offload,
            established=self._clock(),
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
        t.history.append((gen.number, reason, gen.established.isoformat()))
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
        if gen.offload is OffloadStatus.FALLBACK:
            self.metrics.offload_fallbacks.inc()
            log.warning("tunnel %s: offload requested but the kernel runs its SAs in software", _describe(t.spec))
        log.info(
            "tunnel %s generation %d up: spi in 0x%08x out 0x%08x (%s, %.1f ms)",
            _describe(t.spec), gen.number, gen.spi_in, gen.spi_out, role, result.seconds * 1000,
        )  # fmt: skip
        self._wake.set()

    # --- the server side ---------------------------------------------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        t: Tunnel | None = None
        try:
            async with contextlib.AsyncExitStack() as held:  # t.lock, from the exchange to the commit
                async with asyncio.timeout(s.handshake_timeout):
                    preamble = await read_preamble(reader)
                    if preamble.kind is Kind.REKEY_REQUEST:
                        refusal = self._on_rekey_request(preamble)
                        if refusal is not None:
                            await refuse(writer, refusal)
                            raise HandshakeError("refused", f"rekey request refused: {refusal}")
                        writer.write(status_ok())
                        await writer.drain()
                        return
                    try:
                        t = self._responder_tunnel(preamble)
                        if s.check_source_address:
                            refusal = source_refusal(writer.get_extra_info("peername"), t.spec)
                            if refusal is not None:
                                t = None  # the tunnel is not this caller's to fail
                                raise HandshakeError("identity", refusal)
                    except HandshakeError as err:
                        await refuse(writer, str(err))
                        raise
                    await held.enter_async_context(t.lock)
                    installer = self._installer(t)
                    try:
                        plan = await self._plan(t, installer)
                    except HandshakeError as err:
                        await refuse(writer, str(err))
                        raise
                    result = await respond(reader, writer, preamble, plan)
                writer.close()  # the exchange is over; the policies follow under their own deadline
                try:
                    switch_seconds = await self._switch(t, installer)
                except (TimeoutError, XfrmError, HandshakeError):
                    # the initiator may already use the new SAs the rollback removed: ask it for a fresh generation
                    if not t.removed:
                        t.want_rekey("policy install failed")
                    raise
                await self._commit(t, installer, result, switch_seconds)
        except (HandshakeError, OSError, TimeoutError, XfrmError) as err:
            code = _code(err)
            self.metrics.handshakes.inc(role="responder", result=code)
            peer = writer.get_extra_info("peername")
            what = _describe(t.spec) if t is not None else f"connection from {peer}"
            log.warning("handshake (responder) for %s failed: %s: %s", what, code, err)
            if t is not None:
                t.last_error = f"{code}: {err}"
        except Exception:
            log.exception("serving a handshake")
        finally:
            writer.close()

    def _responder_tunnel(self, preamble: Preamble) -> Tunnel:
        """The tunnel a preamble asks for, if this node is its responder; HandshakeError why not."""
        view = self.store.view
        s = self.settings
        wanted = KeyScope.POD if s.scope is TunnelScope.POD else KeyScope.NODE
        if preamble.scope is not wanted:
            raise HandshakeError("protocol", f"this bridge runs in {s.scope.value} scope")
        if not view.synced or not self._adoption_settled:
            raise HandshakeError("not-ready", "this bridge has no workload state yet")
        if preamble.scope is KeyScope.POD:
            src, dst = preamble.addresses()
            key: TunnelKey = ("pod", str(dst), str(src))
        else:
            if preamble.dst != s.node:
                raise HandshakeError("unknown-pod", f"this is node {s.node}, not {preamble.dst}")
            key = ("node", s.node, preamble.src)
        spec = self._spec_now(view, s.scope, key)
        if isinstance(spec, str):
            raise HandshakeError("denied", spec)
        if spec.initiator:
            raise HandshakeError("refused", f"this node initiates the tunnel {_describe(spec)}")
        t = self.tunnels.get(key)
        if t is None or not t.spec.same_tunnel(spec):
            t = self.tunnels[key] = Tunnel(spec, time.monotonic())
        return t

    def _on_rekey_request(self, preamble: Preamble) -> str | None:
        if preamble.scope is KeyScope.POD:
            key: TunnelKey = ("pod", preamble.dst, preamble.src)
        else:
            key = ("node", preamble.dst, preamble.src)
        t = self.tunnels.get(key)
        if t is None or not t.spec.initiator:
            return f"this node initiates no tunnel {preamble.dst} <-> {preamble.src}"
        now = time.monotonic()
        if now - t.last_request < 1.0:
            return "a rekey was requested less than 1s ago"
        t.last_request = now
        if t.task is not None and not t.task.done():
            return None  # a handshake is under way: its generation is the fresh one asked for
        if t.current is not None and now - t.current.established_mono < self.settings.min_rekey_gap:
            return f"rekeyed {now - t.current.established_mono:.1f}s ago"
        t.want_rekey("peer request")
        if t.failures == 0:  # a failing tunnel keeps its backoff: requests must not turn into a storm
            t.next_attempt = 0.0
        self.metrics.rekey_requests.inc(direction="received")
        self._wake.set()
        return None

    async def _nudge(self, t: Tunnel) -> None:
        """Ask the initiator to (re)key this tunnel."""
        s = self.settings
        try:
            async with asyncio.timeout(s.handshake_timeout):
                peer = str(t.spec.endpoints.peer_node)
                reader, writer = await self.netns.connect(peer, s.port, s.handshake_timeout)
                try:
                    await request_rekey(reader, writer, self._preamble(t.spec, Kind.REKEY_REQUEST))
                finally:
                    writer.close()
            self.metrics.rekey_requests.inc(direction="sent")
        except (HandshakeError, OSError, TimeoutError) as err:
            t.last_error = f"rekey request: {_code(err)}: {err}"
            log.info("rekey request for %s: %s", _describe(t.spec), err)

    # --- triggers ----------------------------------------------------------------------------------------

    def _on_renewed(self, identity: Identity) -> None:
        for t in self.tunnels.values():
            if t.spec.local_identity == identity and t.current is not None:
                t.want_rekey("certificate renewal")
        self._wake.set()

    def rekey(self, match: Callable[[Tunnel], bool] = lambda _t: True) -> int:
        """On demand: initiators rekey, responders ask their initiator. Returns how many tunnels."""
        count = 0
        for t in self.tunnels.values():
            if match(t):
                t.want_rekey("requested")
                t.next_attempt = 0.0
                t.last_nudge = 0.0
                t.nudges = 0
                count += 1
        self._wake.set()
        return count

    async def watch_expire(self, events: XfrmEvents) -> None:
        """Soft EXPIRE: rekey (or ask for it); hard EXPIRE: the kernel removed the SA, so re-key now."""
        async for event in events:
            if isinstance(event, EventsLost):
                log.warning("XFRM notifications were lost; relying on the rekey timers")
                continue
            if not isinstance(event, m.Expire) or event.sa.sa.mark != BRIDGE_MARK:
                continue
            spi = event.sa.sa.spi
            for t in self.tunnels.values():
                g = t.current
                if g is not None and spi in (g.spi_in, g.spi_out):
                    log.info("tunnel %s: %s limit reached on spi 0x%08x", _describe(t.spec),
                             "hard" if event.hard else "soft", spi)  # fmt: skip
                    if event.hard:
                        t.current = None
                    t.limit_kind = _limit_kind(event)
                    t.want_rekey(f"{'hard' if event.hard else 'soft'} limit")
                    t.next_attempt = 0.0
                    self._wake.set()

    # --- the scheduler -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Own handshake tasks until cancelled; reconcile on every view change."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._follow_view(), name="reconcile")
            tg.create_task(self._schedule(tg), name="scheduler")

    async def _follow_view(self) -> None:
        version = -1
        while True:
            view = await self.store.wait_changed(version)
            version = view.version
            try:
                await self.reconcile(view)
            except XfrmError as err:
                log.error("reconcile of state version %d: %s", version, err)
                await asyncio.sleep(1.0)

    async def _schedule(self, tg: asyncio.TaskGroup) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            wall = self._clock()
            wait = 1.0
            if self._adopted and wall >= self._adopt_deadline:  # never synced: the adopted keys cannot stay
                adopted, self._adopted = self._adopted, []
                for a in adopted:
                    await self._drop_adopted(a, "no workload state within the adoption deadline")
            await self._retire_due(now)
            for t in list(self.tunnels.values()):
                wait = min(wait, await self._tick(t, tg, now, wall))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.01))

    async def _retire_due(self, now: float) -> None:
        """Delete every tunnel's generations whose grace period is over, all in one netlink batch (after a bulk
        rekey thousands are due together); each tunnel's SAs still succeed or fail on their own."""
        due: list[tuple[Tunnel, list[Generation]]] = []
        for t in self.tunnels.values():
            gens = [g for g, at in t.retiring if at <= now]
            if gens:
                t.retiring = [(g, at) for g, at in t.retiring if at > now]
                due.append((t, gens))
        if not due:
            return
        groups = [[i for g in gens for i in g.sa_ids(self.sa, t.spec.endpoints)] for t, gens in due]
        try:
            errors = await self.sa.delete_sa_groups(groups)
        except XfrmError as err:  # not one answer came back
            errors = [err] * len(due)
        for (t, gens), error in zip(due, errors, strict=True):
            if error is None:
                self._forget(t, gens)
            else:
                log.warning("deleting retired SAs of %s: %s", _describe(t.spec), error)

    async def _tick(self, t: Tunnel, tg: asyncio.TaskGroup, now: float, wall: dt.datetime) -> float:
        """Due work for one tunnel (its retired SAs went in `_retire_due`); returns seconds until it next needs
        attention (at most 1)."""
        wait = 1.0
        if t.retiring:
            wait = min(wait, min(at for _, at in t.retiring) - now)
        g = t.current
        if g is not None and g.not_after <= wall:
            # a certificate behind the keys expired: the SAs go, the block stays, a new handshake may follow
            if g.origin == "adopted":
                log.warning("tunnel %s: no handshake replaced its adopted keys within %.0fs", _describe(t.spec),
                            self.settings.adopt_max_age)  # fmt: skip
                t.last_error = "adopted keys were not replaced in time"
            else:
                log.warning("tunnel %s: a certificate expired at %s", _describe(t.spec), g.not_after.isoformat())
            t.current = None
            try:
                await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors)
                await self.sa.delete_sas(g.sa_ids(self.sa, t.spec.endpoints))
                self._forget(t, [g])
            except XfrmError as err:
                log.error("removing expired tunnel %s: %s", _describe(t.spec), err)
            expired = "adopted keys not replaced" if g.origin == "adopted" else "certificate expired"
            self.metrics.removals.inc(reason=expired)
        busy = t.task is not None and not t.task.done()
        if t.spec.initiator:
            if busy:
                return wait
            if t.next_rekey is not None and now >= t.next_rekey and not t.rekey_wanted:
                t.want_rekey("interval")
            needed = t.current is None or t.rekey_wanted
            if needed and now >= t.next_attempt:
                t.task = tg.create_task(self._initiate(t), name=f"handshake {_describe(t.spec)}")
            elif needed:
                wait = min(wait, t.next_attempt - now)
            elif t.next_rekey is not None:
                wait = min(wait, t.next_rekey - now)
            return wait
        stale = t.current is None and now - t.created >= self.settings.responder_nudge_after
        # adopted keys are replaced as soon as the initiator agrees: keep asking (with backoff) until it does
        stale = stale or (t.current is not None and t.current.origin == "adopted")
        # t.lock is held while we answer a handshake for this tunnel: that one is the fresh generation
        if (
            (t.rekey_wanted or stale)
            and not busy
            and not t.lock.locked()
            and now - t.last_nudge >= self._nudge_interval(t)
        ):
            t.last_nudge = now
            t.nudges += 1
            t.rekey_wanted = False
            t.task = tg.create_task(self._nudge(t), name=f"rekey request {_describe(t.spec)}")
        return wait

    def _nudge_interval(self, t: Tunnel) -> float:
        s = self.settings
        return Backoff(min(max(s.retry_initial, 1.0), s.retry_max), s.retry_max).delay(max(t.nudges, 1))

    # --- views for the admin endpoint --------------------------------------------------------------------

    async def dump(self) -> dict[str, Any]:
        counters: dict[tuple[str, int], m.SaInfo] = {}
        with contextlib.suppress(XfrmError):
            for info in await self.sa.xfrm.list_sas():
                counters[(str(info.sa.dst), info.sa.spi)] = info
        now = time.monotonic()
        wall = self._clock()
        rows = [self._row(t, counters, now, wall) for t in sorted(self.tunnels.values(), key=lambda t: t.spec.key)]
        rows.extend(self._adopted_row(a, counters, wall) for a in self._adopted)
        refused = [
            {
                "local_pod": p.local.name,
                "local_ip": str(p.local.ip),
                "peer_pod": p.remote.name,
                "peer_ip": str(p.remote.ip),
                "outbound": p.outbound.reason,
                "inbound": p.inbound.reason,
            }
            for p in self.refused
        ]
        return {
            "node": self.settings.node,
            "scope": self.settings.scope.value,
            "state_version": self.view_version,
            "tunnels": rows,
            "refused_pairs": refused,
            "recent_removals": list(self.removals),
            "errors": dict(self.errors),
            "adoption": {**self.adoption, "pending": len(self._adopted), "settled": self._adoption_settled},
        }

    def _adopted_row(
        self, a: AdoptedTunnel, counters: dict[tuple[str, int], m.SaInfo], wall: dt.datetime
    ) -> dict[str, Any]:
        """A tunnel adopted at start, before the workload state says whose it is."""
        ep, g = _adopted_endpoints(a), a.current
        pod = a.scope is TunnelScope.POD
        local = ep.local_net.network_address if pod else ep.local_node
        peer = ep.peer_net.network_address if pod else ep.peer_node
        inbound = counters.get((str(ep.local_node), g.spi_in))
        outbound = counters.get((str(ep.peer_node), g.spi_out))
        return {
            "key": f"adopted/{local}/{peer}",
            "scope": a.scope.value,
            "role": "unknown",
            "local": str(local),
            "local_address": str(local),
            "local_identity": "",
            "peer": str(peer),
            "peer_address": str(peer),
            "peer_identity": "",
            "peer_node": "",
            "local_node_address": str(ep.local_node),
            "peer_node_address": str(ep.peer_node),
            "pairs": len(a.selectors),
            "state": "adopted",
            "origin": "adopted",
            "last_error": "",
            "retiring_spis": [f"0x{r.spi_in:08x}/0x{r.spi_out:08x}" for r in a.older],
            "history": [],
            "generation": 0,
            "reqid": f"0x{g.reqid:08x}",
            "spi_in": f"0x{g.spi_in:08x}",
            "spi_out": f"0x{g.spi_out:08x}",
            "key_bits": g.key_bytes * 8,
            "age_seconds": round(max(0.0, wall.timestamp() - g.added), 3) if g.added else None,
            "bytes_in": inbound.current.bytes if inbound else None,
            "packets_in": inbound.current.packets if inbound else None,
            "bytes_out": outbound.current.bytes if outbound else None,
            "packets_out": outbound.current.packets if outbound else None,
            "offload": "none",
            "next_rekey_seconds": None,
        }

    def _row(
        self, t: Tunnel, counters: dict[tuple[str, int], m.SaInfo], now: float, wall: dt.datetime
    ) -> dict[str, Any]:
        spec, g = t.spec, t.current
        row: dict[str, Any] = {
            "key": "/".join(spec.key),
            "scope": spec.scope.value,
            "role": "initiator" if spec.initiator else "responder",
            "local": spec.local_name,
            "local_address": str(spec.local_address),
            "local_identity": spec.local_identity.uri,
            "peer": spec.peer_name,
            "peer_address": str(spec.peer_address),
            "peer_identity": spec.peer_identity.uri,
            "peer_node": spec.peer_node,
            "local_node_address": str(spec.endpoints.local_node),
            "peer_node_address": str(spec.endpoints.peer_node),
            "pairs": len(spec.selectors),
            "state": _state(t),
            "origin": g.origin if g is not None else None,
            "last_error": t.last_error,
            "retiring_spis": [f"0x{r.spi_in:08x}/0x{r.spi_out:08x}" for r, _ in t.retiring],
            "history": [{"generation": n, "reason": why, "at": at} for n, why, at in t.history],
        }
        if g is None:
            return row
        inbound = counters.get((str(spec.endpoints.local_node), g.spi_in))
        outbound = counters.get((str(spec.endpoints.peer_node), g.spi_out))
        row.update(
            generation=g.number,
            reqid=f"0x{g.reqid:08x}",
            spi_in=f"0x{g.spi_in:08x}",
            spi_out=f"0x{g.spi_out:08x}",
            key_bits=g.key_bytes * 8,
            esn=g.esn,
            established=g.established.isoformat(),
            age_seconds=round(now - g.established_mono, 3),
            expires=g.not_after.isoformat(),
            handshake_ms=round(g.handshake_seconds * 1000, 2),
            offload=g.offload.value,
            bytes_in=inbound.current.bytes if inbound else None,
            packets_in=inbound.current.packets if inbound else None,
            bytes_out=outbound.current.bytes if outbound else None,
            packets_out=outbound.current.packets if outbound else None,
            next_rekey_seconds=(round(t.next_rekey - now, 1) if spec.initiator and t.next_rekey is not None else None),
        )
        return row

    def counts(self) -> dict[str, int]:
        out = {"up": 0, "adopted": len(self._adopted), "pending": 0, "failing": 0}
        for t in self.tunnels.values():
            out[_state(t)] += 1
        return out


def _state(t: Tunnel) -> str:
    if t.current is not None:
        return "adopted" if t.current.origin == "adopted" else "up"
    return "failing" if t.last_error else "pending"


def _adopted_endpoints(a: AdoptedTunnel) -> Endpoints:
    return Endpoints(a.local_node, a.peer_node, a.local_net, a.peer_net)


def _gen_ids(sa: SaManager, ep: Endpoints, g: AdoptedGeneration) -> list[m.SaId]:
    return [sa.outbound_id(ep, g.spi_out), sa.inbound_id(ep, g.spi_in)]


def rekey_trigger(reason: str, limit_kind: str, initiator: bool) -> str:
    """The metrics label of a rekey: what started it on this side (a responder's own reasons included)."""
    if reason == "interval":
        return "time"
    if reason in ("soft limit", "hard limit"):
        return limit_kind or "limit"
    if reason == "certificate renewal":
        return "renewal"
    if reason == "requested":
        return "demand"
    return "peer" if not reason or reason == "peer request" or not initiator else "other"


def _limit_kind(event: m.Expire) -> str:
    life, cur = event.sa.sa.lifetime, event.sa.current
    limit = life.hard_bytes if event.hard else life.soft_bytes
    return "bytes" if cur.bytes >= limit else "packets"


def source_refusal(peername: object, spec: TunnelSpec) -> str | None:
    """Why a handshake connection may not speak for `spec`'s peer node (None: it may)."""
    host = peername[0] if isinstance(peername, tuple) and peername else None
    try:
        source = ip_address(str(host).split("%", 1)[0]) if host is not None else None
    except ValueError:
        source = None
    if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
        source = source.ipv4_mapped
    want = spec.endpoints.peer_node
    if source == want:
        return None
    return f"connection from {host}, but node {spec.peer_node}'s bridge is at {want}"


def _code(err: BaseException) -> str:
    if isinstance(err, HandshakeError):
        return err.code
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, XfrmError):
        return "dataplane"
    if isinstance(err, OSError):
        return "connect"
    return "internal"


def _describe(spec: TunnelSpec) -> str:
    if spec.scope is TunnelScope.POD:
        return f"{spec.local_name}({spec.local_address}) <-> {spec.peer_name}({spec.peer_address})"
    return f"node {spec.local_name} <-> node {spec.peer_name}"


def matching(peer: str | None = None, local: str | None = None) -> Callable[[Tunnel], bool]:
    """Tunnels whose peer/local name or address equals the given strings (None: any)."""

    def check(t: Tunnel) -> bool:
        spec = t.spec
        if peer and peer not in (spec.peer_name, str(spec.peer_address), spec.peer_node):
            return False
        return not (local and local not in (spec.local_name, str(spec.local_address)))

    return check


def iter_identities(specs: Iterable[TunnelSpec]) -> set[Identity]:
    return {s.local_identity for s in specs}
