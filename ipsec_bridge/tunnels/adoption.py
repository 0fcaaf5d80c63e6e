"""Restart, after start-up: what becomes of the tunnels a previous run left in the kernel.

ipsec_bridge.adopt decides at start which kernel objects are provably ours (pure, from the dump). This room
holds those tunnels untouched until the first synced workload state, then keeps (and rekeys) the ones it admits
with the same endpoints and removes the rest; none may outlive `adopt_max_age` without a synced state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from ipsec_bridge.adopt import AdoptedGeneration, AdoptedTunnel, AdoptionPlan, removal_reasons
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import Endpoints, SaManager
from ipsec_bridge.tunnels.desired import TunnelSpec
from ipsec_bridge.tunnels.records import Generation, Tunnel, adopted_endpoints, adopted_sa_ids, describe
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic, Wall
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadStatus

log = logging.getLogger(__name__)


def adopted_generation(g: AdoptedGeneration, now: float, wall: dt.datetime, deadline: dt.datetime) -> Generation:
    """Pure: an adopted generation as a record; its age comes from when the kernel added the SA."""
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
        not_after=deadline,
        handshake_seconds=0.0,
        origin="adopted",
    )


class Adoption:
    def __init__(
        self,
        settings: BridgeSettings,
        table: TunnelTable,
        sa: SaManager,
        metrics: BridgeMetrics,
        *,
        monotonic: Monotonic,
        wall: Wall,
    ) -> None:
        self.settings = settings
        self.table = table
        self.sa = sa
        self.metrics = metrics
        self._monotonic = monotonic
        self._wall = wall
        self.pending: list[AdoptedTunnel] = []
        self.settled = True  # nothing to decide until `adopt` hands over a plan
        self.deadline = wall()
        self.stats: dict[str, Any] = {"adopted": 0, "removed_at_start": {"sas": 0, "policies": 0}}

    def adopt(self, plan: AdoptionPlan) -> None:
        """Take over the tunnels `SaManager.start` found provable; they wait for the first synced state."""
        self.pending = list(plan.tunnels)
        self.settled = False
        self.deadline = self._wall() + dt.timedelta(seconds=self.settings.adopt_max_age)
        self.stats = {
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

    async def settle(self, spec_for: Callable[[Endpoints], TunnelSpec | None]) -> None:
        """First synced state: adopted tunnels it admits (`spec_for` their endpoints) are kept and rekeyed, the
        rest go."""
        adopted, self.pending = self.pending, []
        now, wall = self._monotonic(), self._wall()
        grace = self.settings.grace
        for a in adopted:
            spec = spec_for(adopted_endpoints(a))
            if spec is None:
                await self.drop(a, "not admitted after restart")
                continue
            gens = [adopted_generation(g, now, wall, self.deadline) for g in a.generations()]
            t = self.table.tunnels.get(spec.key)
            if t is not None and t.current is not None:  # cannot happen (handshakes wait), but never lose a gen
                t.retiring.extend((g, now + grace) for g in gens)
                continue
            t = self.table.add(Tunnel(dataclasses.replace(spec, selectors=a.selectors), now))
            t.current = gens[0]
            t.retiring = [(g, now + grace) for g in gens[1:]]
            t.record(0, "adopted at restart", gens[0].established)
            t.want_rekey("replacing adopted keys")
            self.metrics.adoption.inc(decision="kept")
            self.stats["kept"] = self.stats.get("kept", 0) + 1
            log.info("adopted tunnel %s is admitted: %s", describe(spec),
                     "rekeying it" if spec.initiator else "asking its initiator for a rekey")  # fmt: skip
        self.settled = True

    async def expire_due(self, wall: dt.datetime) -> None:
        """Never synced within the deadline: the adopted keys cannot stay."""
        if self.pending and wall >= self.deadline:
            adopted, self.pending = self.pending, []
            for a in adopted:
                await self.drop(a, "no workload state within the adoption deadline")

    async def drop(self, a: AdoptedTunnel, reason: str) -> None:
        ep = adopted_endpoints(a)
        started = self._monotonic()
        try:
            await self.sa.remove_policies(ep, a.selectors)  # out first: the block takes the pair's traffic
            await self.sa.delete_sas([i for g in a.generations() for i in adopted_sa_ids(self.sa, ep, g)])
        except XfrmError as err:
            log.error("removing adopted tunnel %s: %s", a.describe(), err)
        self.sa.release({(ep.local_node, g.spi_in) for g in a.generations()}
                        | {(ep.peer_node, g.spi_out) for g in a.generations()})  # fmt: skip
        self.metrics.adoption.inc(decision="removed")
        self.stats["removed_after_sync"] = self.stats.get("removed_after_sync", 0) + 1
        if a.scope is TunnelScope.POD:
            key = f"adopted/{ep.local_net.network_address}/{ep.peer_net.network_address}"
        else:
            key = f"adopted/{ep.local_node}/{ep.peer_node}"
        seconds = round(self._monotonic() - started, 4)
        self.table.removals.append({"tunnel": key, "reason": reason, "seconds": seconds})
        log.info("adopted tunnel %s removed: %s", a.describe(), reason)
