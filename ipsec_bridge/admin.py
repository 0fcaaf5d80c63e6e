"""The bridge's admin HTTP port: /config_dump (tunnels), /metrics, /ready, and POST /rekey.

Counters that live in the kernel (SA bytes/packets, /proc/net/xfrm_stat of the node's netns) are read at
scrape time, so /metrics is exactly as fresh as the kernel. So are the gauges derived from the tunnels
(their states, their offload, the pods' VFs).

Metrics (counters carry `_total`; all names start with zt_bridge_):
    handshakes_total{role, result}           result: ok, or the failure code (connect, timeout, identity, ...)
    rekeys_total{role, trigger}              trigger: time, bytes, packets, renewal, demand, peer
    rekey_requests_total{direction}          tunnel_removals_total{reason}    offload_fallback_total
    handshake_duration_seconds, removal_duration_seconds (histograms)
    tunnels{state}                           up, pending, failing
    pairs{state}                             active, idle, reclaimed (--setup on-demand: idle ones are reclaimed)
    acquires_total{result}, reclaims_total   --setup on-demand: ACQUIREs received, admitted, denied, duplicate, ...
    tunnel_offload{offload}                  up tunnels by what the kernel gave them: none, crypto, packet, fallback
    offload_usable{device, mode}             1 when the start-up probe SA was accepted (0: packet mode refused)
    sas, sa_bytes{direction}, sa_packets{direction}
    vf_sa_bytes{vf, direction}, vf_sa_packets{vf, direction}   per VF (--vf-map, pod scope): the SAs the kernel
                                             holds now for that VF's tunnels (they restart with each rekey, as sa_*)
    vf_pods{vf, pod}, vf_refused_pods, vf_map_entries, vf_map_errors_total
    xfrm_stat{counter}                       /proc/net/xfrm_stat
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import ip_address
from typing import Any

from aiohttp import web

from ipsec_bridge.netns import Netns
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import BRIDGE_MARK
from ipsec_bridge.state import NodeView, StateStore, describe
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.records import matching
from ipsec_bridge.vfmap import VfMapFile
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadProbe, OffloadStatus
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
        vf_map: VfMapFile | None = None,
        offload: OffloadProbe | None = None,
    ) -> None:
        self.manager = manager
        self.store = store
        self.netns = netns
        self.registry = metrics
        self._extra = extra
        self._ready = ready
        self.vf_map = vf_map
        self.offload = offload
        self.tunnels = metrics.gauge("zt_bridge_tunnels", "Tunnels this bridge keeps, by state (up, pending, failing)")
        self.pairs = metrics.gauge(
            "zt_bridge_pairs",
            "Pod pairs by activity: active (bytes lately), idle (none lately), reclaimed (removed when idle, not back)",
        )
        self.sas = metrics.gauge("zt_bridge_sas", "SAs of this bridge in the kernel (larval ALLOCSPI states included)")
        self.sa_bytes = metrics.gauge("zt_bridge_sa_bytes", "Bytes through this bridge's SAs, by direction")
        self.sa_packets = metrics.gauge("zt_bridge_sa_packets", "Packets through this bridge's SAs, by direction")
        self.xfrm_stat = metrics.gauge(
            "zt_bridge_xfrm_stat", "The node netns's /proc/net/xfrm_stat counters (XfrmInNoStates, ...)"
        )
        self.tunnel_offload = metrics.gauge(
            "zt_bridge_tunnel_offload",
            "Up tunnels by the offload the kernel gave their SAs (none, crypto, packet, fallback)",
        )
        if offload is not None:
            usable = metrics.gauge(
                "zt_bridge_offload_usable", "1 when the start-up probe SA with --offload was accepted by the kernel"
            )
            usable.set(1 if offload.usable else 0, device=offload.device, mode=offload.mode)
        if vf_map is not None:
            self.vf_sa_bytes = metrics.gauge("zt_bridge_vf_sa_bytes", "Bytes through the tunnels of the pod on each VF")
            self.vf_sa_packets = metrics.gauge(
                "zt_bridge_vf_sa_packets", "Packets through the tunnels of the pod on each VF"
            )
            self.vf_pods = metrics.gauge("zt_bridge_vf_pods", "Local pods the VF map admits (1 per VF and pod)")
            status = vf_map.status
            metrics.function_gauge("zt_bridge_vf_refused_pods", "Local mesh pods without a usable VF: no tunnels",
                                   lambda: _refused(self.store))  # fmt: skip
            metrics.function_gauge("zt_bridge_vf_map_entries", "Entries of the VF map in force", lambda: status.entries)
            errors = metrics.counter("zt_bridge_vf_map_errors_total", "Bad versions of the VF map file (kept the old)")
            vf_map.on_error(lambda _message: errors.inc())

    async def refresh(self) -> None:
        for state, count in self.manager.counts().items():
            self.tunnels.set(count, state=state)
        for state, count in self.manager.pair_counts().items():
            self.pairs.set(count, state=state)
        offloads = dict.fromkeys((s.value for s in OffloadStatus), 0)
        for t in self.manager.tunnels.values():
            if t.current is not None:
                offloads[t.current.offload.value] += 1
        for status, count in offloads.items():
            self.tunnel_offload.set(count, offload=status)
        local = {t.spec.endpoints.local_node for t in self.manager.tunnels.values()}
        totals = {"in": [0, 0], "out": [0, 0]}
        count = 0
        spis: dict[tuple[str, int], tuple[int, int]] = {}
        try:
            for info in await self.manager.sa.xfrm.sa_counters():
                if info.mark != BRIDGE_MARK:
                    continue
                count += 1
                direction = "in" if info.dst in local else "out"
                totals[direction][0] += info.current.bytes
                totals[direction][1] += info.current.packets
                spis[(str(info.dst), info.spi)] = (info.current.bytes, info.current.packets)
        except XfrmError:
            pass
        self.sas.set(count)
        for direction, (nbytes, npackets) in totals.items():
            self.sa_bytes.set(nbytes, direction=direction)
            self.sa_packets.set(npackets, direction=direction)
        if self.vf_map is not None:
            self._refresh_vfs(spis)
        try:
            stats = parse_xfrm_stat(await self.netns.read_proc_net("xfrm_stat"))
        except OSError:
            stats = {}
        for name, value in stats.items():
            self.xfrm_stat.set(value, counter=name)

    def _refresh_vfs(self, spis: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Per-VF gauges: which pod each VF carries, and (pod scope) the bytes/packets of its SAs."""
        view = self.store.view
        vf_pods: list[tuple[dict[str, str], float]] = []
        traffic: dict[tuple[str, str], list[int]] = {}
        for pod in view.pods_on(self.manager.settings.node):
            if pod.vf is not None:
                vf_pods.append(({"vf": str(pod.vf), "pod": pod.name}, 1))
                for direction in ("in", "out"):
                    traffic[(str(pod.vf), direction)] = [0, 0]
        if self.manager.settings.scope is TunnelScope.POD:
            for t in self.manager.tunnels.values():
                local = view.pod(t.spec.local_address)
                if local is None or local.vf is None:
                    continue
                ep = t.spec.endpoints
                for g in [g for g in [t.current, *(g for g, _ in t.retiring)] if g is not None]:
                    keys = (("in", (str(ep.local_node), g.spi_in)), ("out", (str(ep.peer_node), g.spi_out)))
                    for direction, key in keys:
                        nbytes, npackets = spis.get(key, (0, 0))
                        sums = traffic.setdefault((str(local.vf), direction), [0, 0])
                        sums[0] += nbytes
                        sums[1] += npackets
        self.vf_pods.replace(vf_pods)
        self.vf_sa_bytes.replace([({"vf": vf, "direction": d}, v[0]) for (vf, d), v in traffic.items()])
        self.vf_sa_packets.replace([({"vf": vf, "direction": d}, v[1]) for (vf, d), v in traffic.items()])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/config_dump", self._config_dump)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/ready", self._ready_handler)
        app.router.add_post("/rekey", self._rekey)
        return app

    async def _config_dump(self, request: web.Request) -> web.StreamResponse:
        """Written as its rows are made: thousands of tunnels are never one document in memory (a 2,000-tunnel
        dump is ~2.5 MiB of JSON and ten times that in objects), and the bytes are the same as json.dumps'."""
        dump = await self.manager.dump()
        view = self.store.view
        dump["state"] = describe(view)
        dump["tunnels"] = (self._with_vf(row, view) for row in dump["tunnels"])
        if self.offload is not None:
            dump["offload"] = {"mode": self.offload.mode, "device": self.offload.device, "usable": self.offload.usable,
                               "probe": self.offload.status.value if self.offload.status else "refused",
                               "error": self.offload.error}  # fmt: skip
            if not self.offload.usable:
                dump.setdefault("errors", {})["offload"] = self.offload.describe()
        if self.vf_map is not None:
            dump["vf_map"] = self.vf_map.status.to_json()
        dump.update(self._extra())
        resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        await resp.prepare(request)
        for chunk in json_chunks(dump):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    @staticmethod
    def _with_vf(row: dict[str, Any], view: NodeView) -> dict[str, Any]:
        if row.get("scope") == TunnelScope.POD.value:
            pod = view.pod(ip_address(row["local_address"]))
            row["vf"] = pod.vf if pod is not None else None
        return row

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


def _refused(store: StateStore) -> float:
    vf = store.view.vf
    return float(sum(1 for v in vf.verdicts.values() if not v.ok)) if vf is not None else 0.0


def json_chunks(doc: dict[str, Any], size: int = 64 * 1024) -> Iterator[bytes]:
    """`doc` as json.dumps(doc, indent=2) writes it, in chunks of about `size` bytes; a value that is an iterator
    (the tunnel rows) is written as a list, one item at a time."""
    out: list[str] = []
    held = 0
    for piece in _pieces(doc):
        out.append(piece)
        held += len(piece)
        if held >= size:
            yield "".join(out).encode()
            out, held = [], 0
    if out:
        yield "".join(out).encode()


def _pieces(doc: dict[str, Any]) -> Iterator[str]:
    if not doc:
        yield "{}"
        return
    for i, (key, value) in enumerate(doc.items()):
        yield ("{" if i == 0 else ",") + "\n  " + json.dumps(key) + ": "
        if isinstance(value, Iterator):
            first = True
            for item in value:
                yield ("[" if first else ",") + "\n    " + _nested(item, 4)
                first = False
            yield "[]" if first else "\n  ]"
        else:
            yield _nested(value, 2)
    yield "\n}"


def _nested(value: object, depth: int) -> str:
    return json.dumps(value, indent=2).replace("\n", "\n" + " " * depth)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
