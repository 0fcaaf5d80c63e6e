"""The responder's role: answer the peer bridges' handshakes for the tunnels this node responds to (enforcing the
resumption bounds on its side too: `ipsec_bridge.tickets.ResumptionChains`), the rekey requests of the peers
that respond to this node's tunnels, and the peers' idle teardown requests (on-demand set-up: answered by
`ipsec_bridge.tunnels.ondemand`).

Requests that change or remove a tunnel (rekey, teardown) must come from the underlay address of the tunnel's
peer node, as handshakes must (`check_source_address`): no other host can rekey or tear down a tunnel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address, ip_address

from ipsec_bridge.handshake import (
    HandshakeError,
    Kind,
    Preamble,
    Teardown,
    answer_teardown,
    read_preamble,
    refuse,
    respond,
    small_reads,
    status_ok,
)
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.state import StateStore
from ipsec_bridge.tickets import ResumptionChains, ResumptionPolicy
from ipsec_bridge.tunnels.desired import TunnelKey, TunnelSpec, spec_now
from ipsec_bridge.tunnels.generations import Generations
from ipsec_bridge.tunnels.records import Tunnel, describe, error_code
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm.netlink import XfrmError

log = logging.getLogger(__name__)

REPEATED_REQUEST = "a rekey was requested less than 1s ago"  # a repeat: the first request stands

# answers a peer's teardown request for one of this node's tunnels, on the request's connection (the generation's
# SPIs as the peer sees them: (in, out)); ipsec_bridge.tunnels.ondemand.OnDemand.on_teardown_request
TeardownHandler = Callable[[Tunnel, tuple[int, int], asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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


class Responder:
    def __init__(
        self,
        settings: BridgeSettings,
        store: StateStore,
        table: TunnelTable,
        generations: Generations,
        metrics: BridgeMetrics,
        *,
        ready: Callable[[], bool],
        monotonic: Monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.table = table
        self.generations = generations
        self.metrics = metrics
        self._ready = ready  # restart: false until adoption is decided (keys the previous run left)
        self._monotonic = monotonic
        # the initiators' resumptions this side accepted, per peer bridge and identity pair (issue 15's bounds)
        self.chains = ResumptionChains(
            ResumptionPolicy(settings.resumption, settings.max_resumptions, settings.ticket_max_age), monotonic
        )
        self.on_teardown: TeardownHandler | None = None  # on-demand set-up (the manager wires it); eager: None

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        g = self.generations
        t: Tunnel | None = None
        small_reads(writer)
        deadline = asyncio.get_running_loop().time() + s.handshake_timeout
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    preamble = await read_preamble(reader)
                except HandshakeError as err:
                    # an unknown kind (a newer bridge) or garbage: say why instead of just closing
                    await refuse(writer, str(err))
                    raise
            if preamble.kind is Kind.TEARDOWN_REQUEST:
                # not under the deadline: the handler bounds its waits itself and never cuts a removal short
                await self.serve_teardown(preamble, reader, writer)
                return
            async with contextlib.AsyncExitStack() as held:  # t.lock, from the exchange to the commit
                async with asyncio.timeout_at(deadline):
                    if preamble.kind is Kind.REKEY_REQUEST:
                        peername = writer.get_extra_info("peername")
                        refusal = self.request_source_refusal(preamble, peername) or self.on_rekey_request(preamble)
                        if refusal is not None:
                            await refuse(writer, refusal)
                            if refusal == REPEATED_REQUEST:
                                # the peer asked twice at once and its first request stands: answered and
                                # counted, but not a warning per connection (a peer could fill the log)
                                self.metrics.handshakes.inc(role="responder", result="refused")
                                log.debug("rekey request %s -> %s: %s", preamble.src, preamble.dst, refusal)
                                return
                            raise HandshakeError("refused", f"rekey request refused: {refusal}")
                        writer.write(status_ok())
                        await writer.drain()
                        return
                    t = await self._resolve(preamble, writer)
                    await held.enter_async_context(t.lock)
                    if t.removed:  # it went while we waited (an idle teardown, a revoke): answer for its successor
                        t = await self._resolve(preamble, writer)
                        await held.enter_async_context(t.lock)
                    installer = g.installer(t)
                    try:
                        plan = await g.plan(t, installer)
                    except HandshakeError as err:
                        await refuse(writer, str(err))
                        raise
                    plan = dataclasses.replace(plan, chains=self.chains.bounds(g.ticket_key(t.spec)))
                    result = await respond(reader, writer, preamble, plan)
                writer.close()  # the exchange is over; the policies follow under their own deadline
                try:
                    switch_seconds = await g.switch(t, installer)
                except (TimeoutError, XfrmError, HandshakeError):
                    # the initiator may already use the new SAs the rollback removed: ask it for a fresh generation
                    if not t.removed:
                        t.want_rekey("policy install failed")
                    raise
                await g.commit(t, installer, result, switch_seconds)
        except (HandshakeError, OSError, TimeoutError, XfrmError) as err:
            code = error_code(err)
            self.metrics.handshakes.inc(role="responder", result=code)
            peer = writer.get_extra_info("peername")
            what = describe(t.spec) if t is not None else f"connection from {peer}"
            log.warning("handshake (responder) for %s failed: %s: %s", what, code, err)
            if t is not None:
                t.last_error = f"{code}: {err}"
        except Exception:
            log.exception("serving a handshake")
        finally:
            writer.close()

    async def _resolve(self, preamble: Preamble, writer: asyncio.StreamWriter) -> Tunnel:
        """The tunnel a handshake preamble asks for, from its peer node's address; else refuse and raise."""
        try:
            t = self.tunnel_for(preamble)
            if self.settings.check_source_address:
                refusal = source_refusal(writer.get_extra_info("peername"), t.spec)
                if refusal is not None:
                    raise HandshakeError("identity", refusal)  # the tunnel is not this caller's to fail
        except HandshakeError as err:
            await refuse(writer, str(err))
            raise
        return t

    def tunnel_for(self, preamble: Preamble) -> Tunnel:
        """The tunnel a preamble asks for, if this node is its responder; HandshakeError why not."""
        view = self.store.view
        s = self.settings
        wanted = KeyScope.POD if s.scope is TunnelScope.POD else KeyScope.NODE
        if preamble.scope is not wanted:
            raise HandshakeError("protocol", f"this bridge runs in {s.scope.value} scope")
        if not view.synced or not self._ready():
            raise HandshakeError("not-ready", "this bridge has no workload state yet")
        if preamble.scope is KeyScope.POD:
            src, dst = preamble.addresses()
            key: TunnelKey = ("pod", str(dst), str(src))
        else:
            if preamble.dst != s.node:
                raise HandshakeError("unknown-pod", f"this is node {s.node}, not {preamble.dst}")
            key = ("node", s.node, preamble.src)
        spec = spec_now(view, s, s.scope, key)
        if isinstance(spec, str):
            raise HandshakeError("denied", spec)
        if spec.initiator:
            raise HandshakeError("refused", f"this node initiates the tunnel {describe(spec)}")
        t = self.table.tunnels.get(key)
        if t is not None and t.spec.initiator and t.spec.same_keys(spec):
            # our view turned this side into the responder before the peer's handshake came: its keys stay
            self.generations.take_role(t, spec)
        elif t is None or not t.spec.same_tunnel(spec):
            t = self.table.add(Tunnel(spec, self._monotonic()))
        return t

    def request_source_refusal(self, preamble: Preamble, peername: object) -> str | None:
        """A rekey request must come from the peer node of the tunnel it names (as a handshake must); None: it
        does, or the tunnel is unknown here (`on_rekey_request` then refuses it by itself)."""
        if not self.settings.check_source_address:
            return None
        key = _request_key(preamble)
        t = self.table.tunnels.get(key)
        spec = t.spec if t is not None else spec_now(self.store.view, self.settings, self.settings.scope, key)
        return None if isinstance(spec, str) else source_refusal(peername, spec)

    def on_rekey_request(self, preamble: Preamble) -> str | None:
        """A responder asks this node (its initiator) for a new generation; why not (None: it will come)."""
        # on-demand: the peer's first packet asks for the tunnel
        t = self.table.get_or_activate(_request_key(preamble))
        if t is None or not t.spec.initiator:
            return f"this node initiates no tunnel {preamble.dst} <-> {preamble.src}"
        now = self._monotonic()
        if now - t.last_request < 1.0:
            return REPEATED_REQUEST
        t.last_request = now
        if t.task is not None and not t.task.done():
            return None  # a handshake is under way: its generation is the fresh one asked for
        if t.current is not None and now - t.current.established_mono < self.settings.min_rekey_gap:
            return f"rekeyed {now - t.current.established_mono:.1f}s ago"
        t.want_rekey("peer request")
        if t.failures == 0:  # a failing tunnel keeps its backoff: requests must not turn into a storm
            t.next_attempt = 0.0
        self.metrics.rekey_requests.inc(direction="received")
        self.table.touch(t)
        return None

    # --- idle teardown (on-demand) ---------------------------------------------------------------------------

    async def serve_teardown(
        self, preamble: Preamble, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A peer asks to remove an idle pair with it. What can be answered without the pair's counters is answered
        here; the rest is on-demand's (`on_teardown`)."""
        found = self.teardown_target(preamble, writer.get_extra_info("peername"))
        handler = self.on_teardown
        try:
            if isinstance(found, Tunnel):
                if handler is not None and preamble.spis is not None:  # both checked by teardown_target
                    await handler(found, preamble.spis, reader, writer)
                return
            status, reason = found
            log.debug("teardown request %s -> %s: %s (%s)", preamble.src, preamble.dst, status.name, reason)
            await answer_teardown(writer, status, reason)
        except (OSError, TimeoutError, HandshakeError) as err:
            log.info("teardown request %s -> %s: %s", preamble.src, preamble.dst, err)

    def teardown_target(self, preamble: Preamble, peername: object) -> Tunnel | tuple[Teardown, str]:
        """The tunnel a teardown request may be about, or the answer when there is none to ask about."""
        if self.on_teardown is None:
            return Teardown.KEEP, "this bridge sets tunnels up eagerly: they stay while policy admits them"
        if preamble.scope is not KeyScope.POD or preamble.spis is None:
            return Teardown.KEEP, "teardown requests name a pod tunnel's generation"
        if not self.store.view.synced or not self._ready():
            return Teardown.KEEP, "this bridge has no workload state yet"
        t = self.table.tunnels.get(_request_key(preamble))  # never made for a request: nothing to remove then
        if t is None:
            return Teardown.ABSENT, f"no tunnel {preamble.dst} <-> {preamble.src} on this node"
        if self.settings.check_source_address:
            refusal = source_refusal(peername, t.spec)
            if refusal is not None:
                return Teardown.KEEP, refusal
        return t


def _request_key(preamble: Preamble) -> TunnelKey:
    """The tunnel a rekey or teardown request names, as this node keys it (its end first)."""
    kind = "pod" if preamble.scope is KeyScope.POD else "node"
    return (kind, preamble.dst, preamble.src)
