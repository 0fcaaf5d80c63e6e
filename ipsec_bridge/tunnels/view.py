"""Pure: what the admin endpoint shows of the tunnels (/config_dump rows, state counts). The kernel's counters
and the clocks' readings come in as arguments."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ipsec_bridge.adopt import AdoptedTunnel
from ipsec_bridge.pairs import PodPair, TunnelScope
from ipsec_bridge.tunnels.records import Tunnel, activity, adopted_endpoints, tunnel_state
from ipsec_bridge.xfrm import messages as m

Counters = Mapping[tuple[str, int], m.SaCounters]  # (SA destination, SPI) -> the kernel's counters of that SA


def counts(tunnels: Iterable[Tunnel], adopted: int) -> dict[str, int]:
    out = {"up": 0, "adopted": adopted, "pending": 0, "failing": 0}
    for t in tunnels:
        out[tunnel_state(t)] += 1
    return out


def pair_counts(tunnels: Iterable[Tunnel], now: float, idle_after: float, reclaimed: int) -> dict[str, int]:
    """Up tunnels by activity (bytes within `idle_after`, or not), and pairs reclaimed and not back yet."""
    out = {"active": 0, "idle": 0, "reclaimed": reclaimed}
    for t in tunnels:
        state = activity(t, now, idle_after)
        if state:
            out[state] += 1
    return out


def refused_rows(pairs: Iterable[PodPair]) -> list[dict[str, Any]]:
    return [
        {
            "local_pod": p.local.name,
            "local_ip": str(p.local.ip),
            "peer_pod": p.remote.name,
            "peer_ip": str(p.remote.ip),
            "outbound": p.outbound.reason,
            "inbound": p.inbound.reason,
        }
        for p in pairs
    ]


def adopted_row(a: AdoptedTunnel, counters: Counters, wall: dt.datetime) -> dict[str, Any]:
    """A tunnel adopted at start, before the workload state says whose it is."""
    ep, g = adopted_endpoints(a), a.current
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


def tunnel_row(t: Tunnel, counters: Counters, now: float, idle_after: float = 0.0) -> dict[str, Any]:
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
        "state": tunnel_state(t),
        "origin": g.origin if g is not None else None,
        "last_error": t.last_error,
        "retiring_spis": [f"0x{r.spi_in:08x}/0x{r.spi_out:08x}" for r, _ in t.retiring],
        "history": [{"generation": n, "reason": why, "at": at.isoformat()} for n, why, at in t.history],
        "origin_setup": t.origin,
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
        activity=activity(t, now, idle_after),
        idle_seconds=round(max(0.0, now - max(t.active_at, g.established_mono)), 1),
    )
    return row


def tunnel_rows(
    tunnels: Iterable[Tunnel],
    adopted: Iterable[AdoptedTunnel],
    counters: Counters,
    now: float,
    wall: dt.datetime,
    *,
    idle_after: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Every tunnel by key, then the adopted ones still waiting for the workload state: one row at a time, so a
    dump of thousands is written as it is made (the records are taken when the first row is asked for)."""
    ordered, waiting = sorted(tunnels, key=lambda t: t.spec.key), list(adopted)
    for t in ordered:
        yield tunnel_row(t, counters, now, idle_after)
    for a in waiting:
        yield adopted_row(a, counters, wall)
