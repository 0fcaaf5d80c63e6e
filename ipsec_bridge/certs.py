"""The bridge's certificates: one SVID per identity of its node's pods (CreateCertificate with
ImpersonatedIdentity, through ztcore.identity.manager.SecretManager: renewed at half life, kept when a renewal
fails) and, for --tunnel-scope node, its own. TLS contexts are built once per certificate, off the loop, and
again every ticket lifetime: a context holds the server-side session ticket keys (random, in memory, per context),
so a new context rotates them; tickets made under a replaced context are no longer accepted (full handshake).
Contexts are built ahead of use (ztunnel prefetches its local workloads' certificates the same way): when a
wanted identity's certificate is issued or renewed, and again once a context has lived `REFRESH_AT` of the ticket
lifetime (the handshake that notices gets the current one; the next gets the new one). A pair's first handshake
used to build its identity's context on the responder: 2-9 ms of its first connection in UML.
That rotation is what ends a chain of resumptions on the server side (with the responder's own count,
`ipsec_bridge.tickets.ResumptionChains`): OpenSSL counts a ticket's lifetime from its issue, and every resumption
issues a new ticket, so a chain that resumes within each ticket's lifetime would otherwise never expire. A chain
never crosses contexts (each ticket is sealed by the context that issued it), so none outlives its context.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Iterable

from OpenSSL import SSL

from ipsec_bridge.handshake import DEFAULT_TICKET_LIFETIME, BridgeContext, Credential, HandshakeError, tls_context
from ztcore.identity import Identity
from ztcore.identity.manager import SecretEvent, SecretManager

log = logging.getLogger(__name__)

ContextKey = tuple[Identity, int, str]  # identity, certificate serial, trust bundle digest
REFRESH_AT = 0.9  # of the ticket lifetime: a context that old is rebuilt in the background


class Certificates:
    def __init__(
        self,
        secrets: SecretManager,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        *,
        ticket_lifetime: int = DEFAULT_TICKET_LIFETIME,
    ) -> None:
        if not 0 < ticket_lifetime <= 7 * 24 * 3600:
            raise ValueError(f"ticket lifetime {ticket_lifetime}s: must be positive and at most 7 days (RFC 8446)")
        self._secrets = secrets
        self._clock = clock
        self.ticket_lifetime = ticket_lifetime
        self._wanted: set[Identity] = set()
        self._ready: dict[Identity, asyncio.Event] = {}
        self._contexts: dict[ContextKey, SSL.Context] = {}
        self._building: dict[ContextKey, asyncio.Task[SSL.Context]] = {}
        self._serials: dict[Identity, int] = {}
        self._renewed: list[Callable[[Identity], None]] = []
        secrets.add_listener(self._on_event)

    def on_renewed(self, callback: Callable[[Identity], None]) -> None:
        self._renewed.append(callback)

    def _event(self, identity: Identity) -> asyncio.Event:
        event = self._ready.get(identity)
        if event is None:
            event = self._ready[identity] = asyncio.Event()
        return event

    def _on_event(self, event: SecretEvent) -> None:
        if event.kind != "cert" or event.identity is None or event.cert is None:
            return
        identity = event.identity
        previous = self._serials.get(identity)
        self._serials[identity] = event.cert.serial
        self._event(identity).set()
        if identity in self._wanted:
            self._warm(identity)
        if previous is not None and previous != event.cert.serial:
            for callback in self._renewed:
                callback(identity)

    def want(self, identities: Iterable[Identity]) -> None:
        """Keep certificates for exactly these identities (pods on this node that have tunnels)."""
        wanted = set(identities)
        added = wanted - self._wanted
        for identity in added:
            self._secrets.acquire(identity)
        for identity in self._wanted - wanted:
            self._secrets.release(identity)
            for key in [k for k in self._contexts if k[0] == identity]:
                del self._contexts[key]
        self._wanted = wanted
        for identity in added:
            self._warm(identity)  # a certificate already held; one still coming is warmed when it arrives

    def current(self, identity: Identity) -> Credential | None:
        cert = self._secrets.current(identity)
        if cert is None:
            return None
        roots = self._secrets.roots_pem or cert.roots_pem
        return Credential(identity, cert.chain_pem, cert.key_pem, roots, cert.not_after)

    async def credential(self, identity: Identity, wait_s: float) -> tuple[Credential, SSL.Context]:
        """The current SVID of `identity` and its TLS context; waits up to `wait_s` for a first issue."""
        if identity not in self._wanted:
            self.want(self._wanted | {identity})
        cred = self.current(identity)
        if cred is None:
            try:
                await asyncio.wait_for(self._event(identity).wait(), wait_s)
            except TimeoutError:
                why = f"no certificate for {identity.uri} yet (is the CA reachable?)"
                raise HandshakeError("no-cert", why) from None
            cred = self.current(identity)
            assert cred is not None
        cert = self._secrets.current(identity)
        assert cert is not None
        if cert.not_after <= self._clock():
            # the CA has been unreachable for a whole lifetime: no handshake with a dead certificate
            why = f"the certificate of {identity.uri} expired at {cert.not_after.isoformat()} and was not renewed"
            raise HandshakeError("no-cert", why)
        key = _key(identity, cert.serial, cred)
        ctx = self._contexts.get(key)
        now = self._clock().timestamp()
        if isinstance(ctx, BridgeContext) and now - ctx.created >= self.ticket_lifetime:
            ctx = None  # rotate the ticket keys
        if ctx is None:
            ctx = await self._context(key, cred, now)
        elif self._due(ctx, now) and key not in self._building:
            self._start(key, cred, now)  # this handshake keeps the current one
        return cred, ctx

    def _due(self, ctx: SSL.Context, now: float) -> bool:
        return isinstance(ctx, BridgeContext) and now - ctx.created >= REFRESH_AT * self.ticket_lifetime

    def _warm(self, identity: Identity) -> None:
        """Build `identity`'s context now, off the loop, if its certificate has none (or an old one)."""
        cred, cert = self.current(identity), self._secrets.current(identity)
        if cred is None or cert is None:
            return
        key = _key(identity, cert.serial, cred)
        ctx = self._contexts.get(key)
        now = self._clock().timestamp()
        if key in self._building or (ctx is not None and not self._due(ctx, now)):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the first handshake builds it
        self._start(key, cred, now)

    async def _context(self, key: ContextKey, cred: Credential, now: float) -> SSL.Context:
        """A new context for `key`, built once however many handshakes ask at the same time (a pod's first burst
        of new pairs, a rotation): each used to build its own, and the tickets made with the contexts not kept
        were refused as "renewed"."""
        task = self._building.get(key) or self._start(key, cred, now)
        return await asyncio.shield(task)  # a waiter's deadline does not cancel the others' context

    def _start(self, key: ContextKey, cred: Credential, now: float) -> asyncio.Task[SSL.Context]:
        task = asyncio.get_running_loop().create_task(self._build(key, cred, now), name="tls context")
        self._building[key] = task
        task.add_done_callback(_retrieved)  # a warm-up has no waiter; a failed one is built again on use
        return task

    async def _build(self, key: ContextKey, cred: Credential, now: float) -> SSL.Context:
        try:
            ctx = await asyncio.to_thread(tls_context, cred, ticket_lifetime=self.ticket_lifetime, created=now)
        finally:
            del self._building[key]
        # one context per identity: drop the ones of replaced certificates
        for old in [k for k in self._contexts if k[0] == key[0]]:
            del self._contexts[old]
        if key[0] in self._wanted:  # not one for an identity released while it was built
            self._contexts[key] = ctx
        return ctx


def _key(identity: Identity, serial: int, cred: Credential) -> ContextKey:
    return (identity, serial, hashlib.sha256(cred.roots_pem).hexdigest())


def _retrieved(task: asyncio.Task[SSL.Context]) -> None:
    if not task.cancelled() and (err := task.exception()) is not None:
        log.debug("building a TLS context: %s", err)
