"""The tunnel records every room shares, and the one way a tunnel leaves them (with its kernel objects)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ipsec_bridge.sa_manager import SaManager
from ipsec_bridge.tunnels.desired import TunnelKey
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe
from ipsec_bridge.tunnels.settings import BridgeMetrics, Monotonic
from ipsec_bridge.xfrm.netlink import XfrmError

log = logging.getLogger(__name__)


class Wake:
    """The scheduler's event, which it clears; `changed()` lets others wait for the next `set` as well.

    `set()` asks for a look at every tunnel (a new view may touch any of them); `TunnelTable.touch` asks for one
    tunnel's, so a commit or an ACQUIRE costs the scheduler that tunnel, not the table.

    Not an asyncio.Event: Event.wait looks the running loop up on every call, and on Python 3.11 that lookup is a
    getpid() syscall (~20 us in UML), several times per tunnel; this keeps the loop it first ran on."""

    def __init__(self) -> None:
        self._set = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._watchers: list[asyncio.Future[None]] = []
        self.everything = False  # a `set()` since the scheduler last took the work

    def is_set(self) -> bool:
        return self._set

    def clear(self) -> None:
        self._set = False

    def set(self) -> None:
        self.everything = True
        self.notify()

    def tick(self) -> None:
        """The scheduler's own timer: wake it for the tunnels whose time came (no watcher, not every tunnel)."""
        self._set = True
        self._waiters = _release(self._waiters)

    def notify(self) -> None:
        """Wake the scheduler for the tunnels `TunnelTable.touch` named (not every tunnel)."""
        self.tick()
        self._watchers = _release(self._watchers)

    async def wait(self) -> None:
        if not self._set:
            await self._future(self._waiters)

    async def changed(self) -> None:
        await self._future(self._watchers)

    def _future(self, into: list[asyncio.Future[None]]) -> asyncio.Future[None]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = self._loop.create_future()
        into.append(future)
        return future


def _release(futures: list[asyncio.Future[None]]) -> list[asyncio.Future[None]]:
    for future in futures:
        if not future.done():
            future.set_result(None)
    return []


class TunnelTable:
    def __init__(self, sa: SaManager, metrics: BridgeMetrics, monotonic: Monotonic) -> None:
        self.sa = sa
        self.metrics = metrics
        self._monotonic = monotonic
        self.tunnels: dict[TunnelKey, Tunnel] = {}
        self.removals: collections.deque[dict[str, Any]] = collections.deque(maxlen=32)
        # The scheduler sleeps on it; whatever gives a tunnel work (a view, a commit, a request) sets it (or
        # `touch`es the tunnel).
        self.wake = Wake()
        self._touched: dict[int, Tunnel] = {}  # id -> tunnel: the ones `touch`ed since the scheduler last looked
        # on-demand set-up: makes the record of an admitted tunnel the table does not hold yet (None: eager)
        self.activator: Callable[[TunnelKey], Tunnel | None] | None = None

    def add(self, t: Tunnel) -> Tunnel:
        """A new record: the scheduler looks at it at once (and from then on at least every second)."""
        self.tunnels[t.spec.key] = t
        self.touch(t)
        return t

    def touch(self, t: Tunnel) -> None:
        """`t` has work now (a record made, a commit, a request): the scheduler looks at it, and only it, at once."""
        self._touched[id(t)] = t
        self.wake.notify()

    def take_work(self) -> tuple[bool, list[Tunnel]]:
        """For the scheduler: (every tunnel wanted, the tunnels touched), both reset."""
        everything, self.wake.everything = self.wake.everything, False
        touched, self._touched = list(self._touched.values()), {}
        return everything, touched

    def get_or_activate(self, key: TunnelKey) -> Tunnel | None:
        """The tunnel `key`, made now if on-demand set-up is on and the view admits it (a peer asks for it)."""
        t = self.tunnels.get(key)
        if t is None and self.activator is not None:
            t = self.activator(key)
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
            await self.delete_generations(t)
        except XfrmError as err:
            log.error("removing tunnel %s: %s", describe(t.spec), err)
        t.current = None
        t.retiring.clear()
        if had_sas:
            seconds = self.record_removal(t, reason, started)
            log.info("tunnel %s removed (%s) %.3fs after the change", describe(t.spec), reason, seconds)

    async def delete_generations(self, t: Tunnel) -> None:
        """Every SA of every generation of `t` (its policies are gone already, or pointed elsewhere)."""
        gens = [g for g in [t.current, *(g for g, _ in t.retiring)] if g is not None]
        await self.sa.delete_sas([i for g in gens for i in g.sa_ids(self.sa, t.spec.endpoints)])
        self.forget(t, gens)

    def record_removal(self, t: Tunnel, reason: str, started: float) -> float:
        """Count a removal that took its SAs (metrics, /config_dump's recent removals); returns its seconds."""
        seconds = self._monotonic() - started
        self.metrics.removals.inc(reason=reason.split(":")[0])
        self.metrics.removal_seconds.observe(seconds)
        self.removals.append({"tunnel": "/".join(t.spec.key), "reason": reason, "seconds": round(seconds, 4)})
        return seconds

    def forget(self, t: Tunnel, gens: Iterable[Generation]) -> None:
        """Adopted generations deleted from the kernel: their SPIs need no guarding any more."""
        ep = t.spec.endpoints
        held = [((ep.local_node, g.spi_in), (ep.peer_node, g.spi_out)) for g in gens if g.origin == "adopted"]
        if held:
            self.sa.release([x for pair in held for x in pair])
