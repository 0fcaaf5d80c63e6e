"""When each tunnel needs work: set-up and retries (with backoff) for the tunnels this node initiates, rekeys
(interval, soft/hard EXPIRE, certificate renewal, on demand; responders ask their initiator instead), deleting
retired generations after the grace period, and dropping SAs whose certificates expired."""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterable

from ipsec_bridge.sa_manager import BRIDGE_MARK, SaManager
from ipsec_bridge.tunnels.adoption import Adoption
from ipsec_bridge.tunnels.initiator import Initiator
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe, limit_kind
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic, Wall
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import EventsLost, XfrmError, XfrmEvents
from ztcore.backoff import Backoff
from ztcore.identity import Identity

log = logging.getLogger(__name__)

TIMER_GRID = 0.25  # seconds: timed passes start on multiples of this (a tunnel's look is at most this late)


class Scheduler:
    def __init__(
        self,
        settings: BridgeSettings,
        table: TunnelTable,
        sa: SaManager,
        metrics: BridgeMetrics,
        initiator: Initiator,
        adoption: Adoption,
        *,
        monotonic: Monotonic,
        wall: Wall,
    ) -> None:
        self.settings = settings
        self.table = table
        self.sa = sa
        self.metrics = metrics
        self.initiator = initiator
        self.adoption = adoption
        self._monotonic = monotonic
        self._wall = wall
        # what the passes cost (/config_dump)
        self.passes = 0
        self.looks = 0  # tunnels looked at, over all passes
        self.pass_seconds = 0.0
        # when each tunnel is next looked at: a heap of (time, order, tunnel), and the time that counts per tunnel
        # (id: the records are not hashable); a look before its time leaves the old entry behind, skipped
        self._due: list[tuple[float, int, Tunnel]] = []
        self._next: dict[int, float] = {}
        self._order = itertools.count()

    async def run(self, tg: asyncio.TaskGroup) -> None:
        """Until cancelled: the due work of the tunnels that need a look, then sleep until the next is due or
        something wakes us. Handshakes and rekey requests run as tasks of `tg`, so their owner's lifetime bounds
        them.

        A pass looks at every tunnel only when asked to (`Wake.set`: a new view) and at start; otherwise at the
        tunnels touched since (`TunnelTable.touch`: a record made, a commit, a request, a handshake's end) and
        those whose own time came (each is looked at again about 1 s after its last look, on the timer's grid).
        So a commit costs its tunnel, not the table: at 2,000 tunnels a whole pass took ~1.6 ms on the host."""
        wake = self.table.wake
        loop = asyncio.get_running_loop()
        wake.set()  # the first pass looks at everything
        while True:
            wake.clear()
            now = self._monotonic()
            wall = self._wall()
            await self.adoption.expire_due(wall)
            # (a record removed or replaced since it was queued is not looked at: a new record is touched itself)
            batch = [t for t in self._work(now) if self.table.tunnels.get(t.spec.key) is t]
            await self.retire_due(now, batch)
            self.looks += len(batch)
            for t in batch:
                wait = await self._tick(t, tg, now, wall)
                self._next[id(t)] = due = now + max(wait, 0.0)
                heapq.heappush(self._due, (due, next(self._order), t))
            self.passes += 1
            self.pass_seconds += self._monotonic() - now
            wait = min(1.0, self._due[0][0] - now) if self._due else 1.0
            if not wake.is_set():
                # A timer that sets the event, not wait_for: wait_for wraps the wait in a task of its own, and its
                # wake-up takes four event-loop turns instead of one (a turn is ~4 syscalls, ~80 us in UML). The
                # timer fires on a grid, so tunnels due at scattered moments share one pass instead of one each.
                deadline = math.ceil((loop.time() + max(wait, 0.01)) / TIMER_GRID) * TIMER_GRID
                timer = loop.call_at(deadline, wake.tick)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()

    def _work(self, now: float) -> list[Tunnel]:
        """The tunnels this pass looks at: all of them when asked, else the touched ones and the due ones."""
        everything, touched = self.table.take_work()
        if everything:
            self._due.clear()
            self._next.clear()
            return list(self.table.tunnels.values())
        batch = {id(t): t for t in touched}
        while self._due and self._due[0][0] <= now:
            due, _, t = heapq.heappop(self._due)
            if self._next.get(id(t)) != due:
                continue  # a later look replaced this one
            del self._next[id(t)]
            batch[id(t)] = t
        return list(batch.values())

    async def retire_due(self, now: float, tunnels: Iterable[Tunnel]) -> None:
        """Delete the generations of `tunnels` whose grace period is over, all in one netlink batch (after a bulk
        rekey thousands are due together); each tunnel's SAs still succeed or fail on their own."""
        due: list[tuple[Tunnel, list[Generation]]] = []
        for t in tunnels:
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
                self.table.forget(t, gens)
            else:
                log.warning("deleting retired SAs of %s: %s", describe(t.spec), error)

    async def _tick(self, t: Tunnel, tg: asyncio.TaskGroup, now: float, wall: dt.datetime) -> float:
        """Due work for one tunnel (its retired SAs went in `retire_due`); returns seconds until it next needs
        attention (at most 1)."""
        wait = 1.0
        if t.retiring:
            wait = min(wait, min(at for _, at in t.retiring) - now)
        g = t.current
        if g is not None and g.not_after <= wall:
            # a certificate behind the keys expired: the SAs go, the block stays, a new handshake may follow
            if g.origin == "adopted":
                log.warning("tunnel %s: no handshake replaced its adopted keys within %.0fs", describe(t.spec),
                            self.settings.adopt_max_age)  # fmt: skip
                t.last_error = "adopted keys were not replaced in time"
            else:
                log.warning("tunnel %s: a certificate expired at %s", describe(t.spec), g.not_after.isoformat())
            t.current = None
            try:
                await self.sa.remove_policies(t.spec.endpoints, t.spec.selectors)
                await self.sa.delete_sas(g.sa_ids(self.sa, t.spec.endpoints))
                self.table.forget(t, [g])
            except XfrmError as err:
                log.error("removing expired tunnel %s: %s", describe(t.spec), err)
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
                t.task = tg.create_task(self.initiator.initiate(t), name=f"handshake {describe(t.spec)}")
                t.task.add_done_callback(self._touch_when_done(t))  # a failure's retry time
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
            t.task = tg.create_task(self.initiator.nudge(t), name=f"rekey request {describe(t.spec)}")
            t.task.add_done_callback(self._touch_when_done(t))
        return wait

    def _touch_when_done(self, t: Tunnel) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            if t.task is task:
                t.task = None  # a finished task held by its record costs ~0.8 KiB per tunnel, for nothing
            self.table.touch(t)

        return done

    def _nudge_interval(self, t: Tunnel) -> float:
        s = self.settings
        return Backoff(min(max(s.retry_initial, 1.0), s.retry_max), s.retry_max).delay(max(t.nudges, 1))

    # --- triggers: they only mark tunnels and wake the loop above --------------------------------------------

    def on_renewed(self, identity: Identity) -> None:
        for t in self.table.tunnels.values():
            if t.spec.local_identity == identity and t.current is not None:
                t.want_rekey("certificate renewal")
        self.table.wake.set()

    def rekey(self, match: Callable[[Tunnel], bool] = lambda _t: True) -> int:
        """On demand: initiators rekey, responders ask their initiator. Returns how many tunnels."""
        count = 0
        for t in self.table.tunnels.values():
            if match(t):
                t.want_rekey("requested")
                t.next_attempt = 0.0
                t.last_nudge = 0.0
                t.nudges = 0
                count += 1
        self.table.wake.set()
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
            for t in self.table.tunnels.values():
                g = t.current
                if g is not None and spi in (g.spi_in, g.spi_out):
                    log.info("tunnel %s: %s limit reached on spi 0x%08x", describe(t.spec),
                             "hard" if event.hard else "soft", spi)  # fmt: skip
                    if event.hard:
                        t.current = None
                    t.limit_kind = limit_kind(event)
                    t.want_rekey(f"{'hard' if event.hard else 'soft'} limit")
                    t.next_attempt = 0.0
                    self.table.touch(t)
