"""The tunnel records every room shares, and the one way a tunnel leaves them (with its kernel objects)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from typing import Any

from ipsec_bridge.sa_manager import SaManager
from ipsec_bridge.tunnels.desired import TunnelKey
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe
from ipsec_bridge.tunnels.settings import BridgeMetrics, Monotonic
from ipsec_bridge.xfrm.netlink import XfrmError

log = logging.getLogger(__name__)


class TunnelTable:
    def __init__(self, sa: SaManager, metrics: BridgeMetrics, monotonic: Monotonic) -> None:
        self.sa = sa
        self.metrics = metrics
        self._monotonic = monotonic
        self.tunnels: dict[TunnelKey, Tunnel] = {}
        self.removals: collections.deque[dict[str, Any]] = collections.deque(maxlen=32)
        # The scheduler sleeps on it; whatever gives a tunnel work (a view, a commit, a request) sets it.
        self.wake = asyncio.Event()

    def add(self, t: Tunnel) -> Tunnel:
        self.tunnels[t.spec.key] = t
        return t

    async def remove(self, t: Tunnel, reason: str, since: float | None = None) -> None:
        """Policies first (their traffic falls to the block), then every SA of every generation.

        `since`: when the state change that removed the tunnel arrived (the latency is measured from it)."""
        started = since if since is not None else self._monotonic()
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
            self.forget(t, gens)
        except XfrmError as err:
            log.error("removing tunnel %s: %s", describe(t.spec), err)
        t.current = None
        t.retiring.clear()
        if had_sas:
            seconds = self._monotonic() - started
            self.metrics.removals.inc(reason=reason.split(":")[0])
            self.metrics.removal_seconds.observe(seconds)
            self.removals.append({"tunnel": "/".join(t.spec.key), "reason": reason, "seconds": round(seconds, 4)})
            log.info("tunnel %s removed (%s) %.3fs after the change", describe(t.spec), reason, seconds)

    def forget(self, t: Tunnel, gens: Iterable[Generation]) -> None:
        """Adopted generations deleted from the kernel: their SPIs need no guarding any more."""
        ep = t.spec.endpoints
        held = [((ep.local_node, g.spi_in), (ep.peer_node, g.spi_out)) for g in gens if g.origin == "adopted"]
        if held:
            self.sa.release([x for pair in held for x in pair])
