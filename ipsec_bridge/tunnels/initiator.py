"""The initiator's role: connect to the peer's bridge and run the handshake (the scheduler decides when), or, as a
responder that wants a new generation, ask the initiator for one; and, for idle reclaim (either role), ask the
peer to remove an idle pair together with this side (`teardown`). Every connection leaves from this node's
underlay address: the peer checks it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from ipsec_bridge.handshake import (
    HandshakeError,
    Kind,
    Plan,
    Result,
    Teardown,
    TeardownReply,
    initiate,
    request_rekey,
    request_teardown,
    small_reads,
    teardown_done,
)
from ipsec_bridge.netns import Netns
from ipsec_bridge.sa_manager import GenerationInstaller
from ipsec_bridge.tunnels.generations import Generations
from ipsec_bridge.tunnels.records import Generation, Tunnel, describe, error_code
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.xfrm.netlink import XfrmError

log = logging.getLogger(__name__)


class Initiator:
    def __init__(
        self, settings: BridgeSettings, netns: Netns, generations: Generations, metrics: BridgeMetrics
    ) -> None:
        self.settings = settings
        self.netns = netns
        self.generations = generations
        self.metrics = metrics
        self._parallel = asyncio.Semaphore(settings.max_parallel_handshakes)

    async def initiate(self, t: Tunnel) -> None:
        """One handshake for `t`; a failure is recorded on it (with its backoff), never raised."""
        s = self.settings
        g = self.generations
        installer: GenerationInstaller | None = None
        try:
            async with self._parallel, t.lock:
                if t.removed:
                    return
                async with asyncio.timeout(s.handshake_timeout):
                    installer = g.installer(t)
                    plan = await g.plan(t, installer)
                    try:
                        result = await self._exchange(t, plan)
                    except HandshakeError as err:
                        if err.code != "resumption":
                            raise
                        # the resumed session (the certificate it was made with) was refused, and what the attempt
                        # installed was rolled back: the current certificates may well pass, in a full handshake
                        log.info("resumption for %s refused, full handshake: %s", describe(t.spec), err)
                        self.metrics.handshakes.inc(role="initiator", result="resumption")
                        installer = g.installer(t)  # the refused attempt's was rolled back: a clean one
                        result = await self._exchange(t, await g.plan(t, installer, resume=False))
                switch_seconds = await g.switch(t, installer)
                await g.commit(t, installer, result, switch_seconds)
        except asyncio.CancelledError:
            raise
        except (HandshakeError, OSError, TimeoutError, XfrmError) as err:
            g.failed(t, "initiator", err)
        except Exception as err:  # a bug must not stop the other tunnels
            log.exception("handshake for %s", describe(t.spec))
            g.failed(t, "initiator", err)

    async def _connect(self, t: Tunnel) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the peer's bridge, from this node's underlay address (the peer checks the source)."""
        ep, s = t.spec.endpoints, self.settings
        reader, writer = await self.netns.connect(str(ep.peer_node), s.port, s.handshake_timeout,
                                                  source=str(ep.local_node))  # fmt: skip
        small_reads(writer)  # as the responder does for every connection it accepts
        return reader, writer

    async def _exchange(self, t: Tunnel, plan: Plan) -> Result:
        reader, writer = await self._connect(t)
        try:
            return await initiate(reader, writer, self.generations.preamble(t.spec, Kind.HANDSHAKE), plan)
        finally:
            writer.close()

    async def nudge(self, t: Tunnel) -> None:
        """Ask the initiator to (re)key this tunnel."""
        s = self.settings
        try:
            async with asyncio.timeout(s.handshake_timeout):
                reader, writer = await self._connect(t)
                try:
                    await request_rekey(reader, writer, self.generations.preamble(t.spec, Kind.REKEY_REQUEST))
                finally:
                    writer.close()
            self.metrics.rekey_requests.inc(direction="sent")
        except (HandshakeError, OSError, TimeoutError) as err:
            t.last_error = f"rekey request: {error_code(err)}: {err}"
            log.info("rekey request for %s: %s", describe(t.spec), err)

    @contextlib.asynccontextmanager
    async def teardown(self, t: Tunnel, g: Generation) -> AsyncIterator[TeardownReply]:
        """Ask the peer to remove the idle pair `t` (generation `g`) with this side; the body removes this side's
        pair when the answer is STOPPED, and the peer hears done when the body is over. Connection errors and
        timeouts come back as a reply without a status (the peer is gone or does not answer: this side decides
        alone)."""
        s = self.settings
        preamble = dataclasses.replace(
            self.generations.preamble(t.spec, Kind.TEARDOWN_REQUEST), spis=(g.spi_in, g.spi_out)
        )
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(s.handshake_timeout):
                reader, writer = await self._connect(t)
                reply = await request_teardown(reader, writer, preamble)
        except (OSError, TimeoutError) as err:
            if writer is not None:
                writer.close()
                writer = None
            reply = TeardownReply(None, f"{error_code(err)}: {err}" if str(err) else error_code(err))
        try:
            yield reply
        finally:
            if writer is not None:
                if reply.status is Teardown.STOPPED:  # even if the removal failed: the peer must not wait for long
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(s.handshake_timeout):
                            await teardown_done(writer)
                writer.close()
