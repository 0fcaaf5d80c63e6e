"""The responder's role: answer the peer bridges' handshakes for the tunnels this node responds to, and the
rekey requests of the peers that respond to this node's tunnels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address

from ipsec_bridge.handshake import HandshakeError, Kind, Preamble, read_preamble, refuse, respond, status_ok
from ipsec_bridge.keys import KeyScope
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.desired import TunnelKey, TunnelSpec, spec_now
from ipsec_bridge.tunnels.generations import Generations
from ipsec_bridge.tunnels.records import Tunnel, describe, error_code
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings, Monotonic
from ipsec_bridge.tunnels.table import TunnelTable
from ipsec_bridge.xfrm.netlink import XfrmError

log = logging.getLogger(__name__)


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

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.settings
        g = self.generations
        t: Tunnel | None = None
        try:
            async with contextlib.AsyncExitStack() as held:  # t.lock, from the exchange to the commit
                async with asyncio.timeout(s.handshake_timeout):
                    preamble = await read_preamble(reader)
                    if preamble.kind is Kind.REKEY_REQUEST:
                        refusal = self.on_rekey_request(preamble)
                        if refusal is not None:
                            await refuse(writer, refusal)
                            raise HandshakeError("refused", f"rekey request refused: {refusal}")
                        writer.write(status_ok())
                        await writer.drain()
                        return
                    try:
                        t = self.tunnel_for(preamble)
                        if s.check_source_address:
                            refusal = source_refusal(writer.get_extra_info("peername"), t.spec)
                            if refusal is not None:
                                t = None  # the tunnel is not this caller's to fail
                                raise HandshakeError("identity", refusal)
                    except HandshakeError as err:
                        await refuse(writer, str(err))
                        raise
                    await held.enter_async_context(t.lock)
                    installer = g.installer(t)
                    try:
                        plan = await g.plan(t, installer)
                    except HandshakeError as err:
                        await refuse(writer, str(err))
                        raise
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
        if t is None or not t.spec.same_tunnel(spec):
            t = self.table.tunnels[key] = Tunnel(spec, self._monotonic())
        return t

    def on_rekey_request(self, preamble: Preamble) -> str | None:
        """A responder asks this node (its initiator) for a new generation; why not (None: it will come)."""
        if preamble.scope is KeyScope.POD:
            key: TunnelKey = ("pod", preamble.dst, preamble.src)
        else:
            key = ("node", preamble.dst, preamble.src)
        t = self.table.get_or_activate(key)  # on-demand: the peer's first packet asks for the tunnel
        if t is None or not t.spec.initiator:
            return f"this node initiates no tunnel {preamble.dst} <-> {preamble.src}"
        now = self._monotonic()
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
        self.table.wake.set()
        return None
