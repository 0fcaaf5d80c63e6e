"""The bridge's admin HTTP port: /config_dump (tunnels), /metrics, /ready, and POST /rekey.

Counters that live in the kernel (SA bytes/packets, /proc/net/xfrm_stat of the node's netns) are read at
scrape time, so /metrics is exactly as fresh as the kernel.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ipsec_bridge.netns import Netns
from ipsec_bridge.reconcile import TunnelManager, matching
from ipsec_bridge.sa_manager import BRIDGE_MARK
from ipsec_bridge.state import StateStore, describe
from ipsec_bridge.xfrm.netlink import XfrmError
from ztcore.metrics import Registry


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """/proc/net/xfrm_stat: one `Name value` per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


class Admin:
    def __init__(
        self,
        manager: TunnelManager,
        store: StateStore,
        netns: Netns,
        metrics: Registry,
        *,
        extra: Callable[[], dict[str, Any]] = dict,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.manager = manager
        self.store = store
        self.netns = netns
        self.registry = metrics
        self._extra = extra
        self._ready = ready
        self.tunnels = metrics.gauge("zt_bridge_tunnels", "Tunnels this bridge keeps, by state (up, pending, failing)")
        self.sas = metrics.gauge("zt_bridge_sas", "SAs of this bridge in the kernel (larval ALLOCSPI states included)")
        self.sa_bytes = metrics.gauge("zt_bridge_sa_bytes", "Bytes through this bridge's SAs, by direction")
        self.sa_packets = metrics.gauge("zt_bridge_sa_packets", "Packets through this bridge's SAs, by direction")
        self.xfrm_stat = metrics.gauge(
            "zt_bridge_xfrm_stat", "The node netns's /proc/net/xfrm_stat counters (XfrmInNoStates, ...)"
        )

    async def refresh(self) -> None:
        for state, count in self.manager.counts().items():
            self.tunnels.set(count, state=state)
        local = {t.spec.endpoints.local_node for t in self.manager.tunnels.values()}
        totals = {"in": [0, 0], "out": [0, 0]}
        count = 0
        try:
            for info in await self.manager.sa.xfrm.list_sas():
                if info.sa.mark != BRIDGE_MARK:
                    continue
                count += 1
                direction = "in" if info.sa.dst in local else "out"
                totals[direction][0] += info.current.bytes
                totals[direction][1] += info.current.packets
        except XfrmError:
            pass
        self.sas.set(count)
        for direction, (nbytes, npackets) in totals.items():
            self.sa_bytes.set(nbytes, direction=direction)
            self.sa_packets.set(npackets, direction=direction)
        try:
            stats = parse_xfrm_stat(await self.netns.read_proc_net("xfrm_stat"))
        except OSError:
            stats = {}
        for name, value in stats.items():
            self.xfrm_stat.set(value, counter=name)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/config_dump", self._config_dump)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready_handler)
        app.router.add_post("/rekey", self._rekey)
        return app

    async def _config_dump(self, _: web.Request) -> web.Response:
        dump = await self.manager.dump()
        dump["state"] = describe(self.store.view)
        dump.update(self._extra())
        return web.json_response(dump, dumps=_dumps)

    async def _metrics(self, _: web.Request) -> web.Response:
        await self.refresh()
        return web.Response(body=self.registry.render().encode(), headers={"Content-Type": self.registry.content_type})

    async def _ready_handler(self, _: web.Request) -> web.Response:
        if self._ready() and self.store.view.synced:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="no workload state yet\n")

    async def _rekey(self, request: web.Request) -> web.Response:
        count = self.manager.rekey(matching(request.query.get("peer"), request.query.get("local")))
        return web.json_response({"rekeyed": count})


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
