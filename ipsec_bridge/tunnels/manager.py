"""TunnelManager: the owner of one node's tunnel rooms. It wires them, reconciles each new view (desired vs
established) and owns the scheduler's and the handshakes' lifetimes in one TaskGroup (`run`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ipsec_bridge.adopt import AdoptionPlan
from ipsec_bridge.certs import Certificates
from ipsec_bridge.netns import Netns
from ipsec_bridge.pairs import PodPair, TunnelScope
from ipsec_bridge.sa_manager import Endpoints, SaManager
from ipsec_bridge.state import NodeView, StateStore
from ipsec_bridge.tunnels import view as admin_view
from ipsec_bridge.tunnels.adoption import Adoption
from ipsec_bridge.tunnels.desired import (
    Desired,
    TunnelKey,
    TunnelSpec,
    desired,
    latency_critical_specs,
    local_desired,
    pair_basis,
    pod_key_of,
    spec_now,
)
from ipsec_bridge.tunnels.generations import Generations
from ipsec_bridge.tunnels.initiator import Initiator
from ipsec_bridge.tunnels.ondemand import OnDemand
from ipsec_bridge.tunnels.records import Tunnel
from ipsec_bridge.tunnels.responder import Responder
from ipsec_bridge.tunnels.scheduler import Scheduler
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic, Wall, wall_now
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import XfrmError, XfrmEvents

log = logging.getLogger(__name__)


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
        wall: Wall = wall_now,
        monotonic: Monotonic = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sa = sa
        self.certs = certs
        self.netns = netns
        self.metrics = metrics
        self._monotonic = monotonic
        self._wall = wall
        rng = rng or random.Random()  # noqa: S311 - rekey jitter spreads load, it is not a secret
        self.table = TunnelTable(sa, metrics, monotonic)
        self.adoption = Adoption(settings, self.table, sa, metrics, monotonic=monotonic, wall=wall)
        self.generations = Generations(
            settings, store, sa, certs, metrics, self.table, rng=rng, monotonic=monotonic, wall=wall
        )
        self.initiator = Initiator(settings, netns, self.generations, metrics)
        self.scheduler = Scheduler(
            settings, self.table, sa, metrics, self.initiator, self.adoption, monotonic=monotonic, wall=wall
        )
        self.responder = Responder(
            settings, store, self.table, self.generations, metrics,
            ready=lambda: self.adoption.settled, monotonic=monotonic,
        )  # fmt: skip
        self.on_demand = (
            OnDemand(settings, store, self.table, sa, metrics, monotonic=monotonic) if settings.on_demand else None
        )
        if self.on_demand is not None:  # idle reclaim: both bridges remove a pair together (a teardown request)
            self.responder.on_teardown = self.on_demand.use_peer(self.initiator.teardown)
        self.refused: tuple[PodPair, ...] = ()
        self.view_version = -1
        self.errors: dict[str, str] = {}
        certs.on_renewed(self.scheduler.on_renewed)

    @property
    def tunnels(self) -> dict[TunnelKey, Tunnel]:
        return self.table.tunnels

    @property
    def removals(self) -> deque[dict[str, Any]]:
        return self.table.removals

    # --- lifetimes ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Own handshake tasks until cancelled; reconcile on every view change."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_view(), name="reconcile")
            tg.create_task(self.scheduler.run(tg), name="scheduler")
            if self.on_demand is not None:
                tg.create_task(self.on_demand.run_reclaim(), name="idle-reclaim")

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

    # --- reconcile ---------------------------------------------------------------------------------------

    def adopt(self, plan: AdoptionPlan) -> None:
        """Restart: the tunnels `SaManager.start` found provable wait for the first synced state."""
        self.adoption.adopt(plan)

    async def reconcile(self, view: NodeView) -> None:
        """Tunnels the view no longer admits go (all at once); new ones get a record for the scheduler.

        Eager set-up asks the view about every pod pair of the node; on demand only the pairs that have a
        record (or a block) are asked about again, so a change costs what talks, not local x remote pods."""
        if not view.synced:
            return
        on_demand = self.on_demand is not None
        if on_demand:
            want = local_desired(view, self.settings)
        else:
            want = await asyncio.to_thread(desired, view, self.settings)
        self.refused = want.refused
        self.view_version = view.version
        if want.error is not None:
            self.errors["node-address"] = want.error
        else:
            self.errors.pop("node-address", None)
        if not self.adoption.settled:
            await self.adoption.settle(self._spec_for(view, want))
        tunnels = self.table.tunnels
        specs: Mapping[TunnelKey, TunnelSpec]
        if on_demand:
            specs = await asyncio.to_thread(self._on_demand_specs, view, list(tunnels.values()))
        else:
            specs = want.tunnels
        gone = [t for key, t in tunnels.items() if key not in specs or not specs[key].same_keys(t.spec)]
        if gone:
            since = view.received_at or None
            await asyncio.gather(*(self.remove(t, "policy or workload change", since=since) for t in gone))
        for key, spec in specs.items():
            t = tunnels.get(key)
            if t is None:
                # eager; on demand only the pairs --eager-for marks (the rest come with their first packet)
                self.table.add(Tunnel(spec, self._monotonic()))
                continue
            if spec.initiator != t.spec.initiator:
                self.generations.take_role(t, spec)
            if spec.selectors != t.spec.selectors:
                await self._update_selectors(t, spec)
        if self.on_demand is not None:
            await self.on_demand.forgive(view)
        await self.sa.set_local_pods(list(want.local_pods))
        self.certs.want(set(want.identities))
        self.table.wake.set()

    def _on_demand_specs(self, view: NodeView, records: list[Tunnel]) -> dict[TunnelKey, TunnelSpec]:
        """The records' pairs the view still admits, and the latency-critical pairs (--eager-for). A record whose
        two pods and rules did not change since it was last checked keeps its spec: a change costs the pairs it
        touches, not every pair that talks."""
        marked = latency_critical_specs(view, self.settings)
        out: dict[TunnelKey, TunnelSpec] = {}
        for t in records:
            key = t.spec.key
            if key in marked:
                continue
            basis = pair_basis(view, t.spec)
            if basis is not None and basis == t.basis:
                out[key] = t.spec
                continue
            spec = spec_now(view, self.settings, TunnelScope.POD, key)
            if not isinstance(spec, str):
                out[key] = spec
                t.basis = basis
        return out | marked

    def _spec_for(self, view: NodeView, want: Desired) -> Callable[[Endpoints], TunnelSpec | None]:
        """How the first synced state judges an adopted tunnel: by its endpoints among the desired tunnels, or,
        on demand, by asking the view about the pod pair its endpoints name."""
        if self.on_demand is None:
            by_endpoints = {spec.endpoints: spec for spec in want.tunnels.values()}
            return by_endpoints.get

        def on_demand(ep: Endpoints) -> TunnelSpec | None:
            spec = spec_now(view, self.settings, TunnelScope.POD, pod_key_of(ep))
            return spec if not isinstance(spec, str) and spec.endpoints == ep else None

        return on_demand

    async def _update_selectors(self, t: Tunnel, spec: TunnelSpec) -> None:
        old, new = set(t.spec.selectors), set(spec.selectors)
        t.spec = spec
        if old - new:
            await self.sa.remove_policies(spec.endpoints, sorted(old - new, key=str))
        if t.current is not None and new - old:
            await self.sa.switch_policies(spec.endpoints, sorted(new - old, key=str), t.current.reqid)

    async def remove(self, t: Tunnel, reason: str, since: float | None = None) -> None:
        await self.table.remove(t, reason, since)

    # --- the rooms' entry points, for main and the admin port ---------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.responder.serve_connection(reader, writer)

    async def watch_expire(self, events: XfrmEvents) -> None:
        await self.scheduler.watch_expire(events)

    async def watch_acquire(self, events: XfrmEvents) -> None:
        if self.on_demand is not None:
            await self.on_demand.watch(events)

    def rekey(self, match: Callable[[Tunnel], bool] = lambda _t: True) -> int:
        return self.scheduler.rekey(match)

    async def dump(self) -> dict[str, Any]:
        counters: dict[tuple[str, int], m.SaCounters] = {}
        with contextlib.suppress(XfrmError):
            for info in await self.sa.xfrm.sa_counters():
                counters[(str(info.dst), info.spi)] = info
        a = self.adoption
        return {
            "node": self.settings.node,
            "scope": self.settings.scope.value,
            "state_version": self.view_version,
            "setup": "on-demand" if self.on_demand is not None else "eager",
            "tunnels": admin_view.tunnel_rows(
                self.table.tunnels.values(),
                a.pending,
                counters,
                self._monotonic(),
                self._wall(),
                idle_after=self._idle_after(),
            ),
            "refused_pairs": admin_view.refused_rows(self.refused),
            "recent_removals": list(self.table.removals),
            "errors": dict(self.errors),
            "adoption": {**a.stats, "pending": len(a.pending), "settled": a.settled},
            "scheduler": {
                "passes": self.scheduler.passes,
                "looks": self.scheduler.looks,
                "pass_seconds": round(self.scheduler.pass_seconds, 3),
            },
            **({"on_demand": self.on_demand.dump()} if self.on_demand is not None else {}),
        }

    def _idle_after(self) -> float:
        """A tunnel counts as idle once its SAs carried no byte for this long (one reclaim check)."""
        return 2 * self.on_demand.reclaim_interval() if self.on_demand is not None else 0.0

    def counts(self) -> dict[str, int]:
        return admin_view.counts(self.table.tunnels.values(), len(self.adoption.pending))

    def pair_counts(self) -> dict[str, int]:
        """Active, idle and reclaimed pod pairs (on-demand; eager tunnels count as active when up)."""
        reclaimed = len(self.on_demand.reclaimed) if self.on_demand is not None else 0
        return admin_view.pair_counts(self.table.tunnels.values(), self._monotonic(), self._idle_after(), reclaimed)
