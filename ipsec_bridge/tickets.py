"""The initiator's TLS sessions for resumption: in memory only (never written, never logged), one per peer bridge
and identity pair, each used once (a resumption brings the next), within the bounds that force a full handshake.

A ticket is handed out (`take`) only while
- it belongs to the TLS context the handshake will use: a renewed certificate (or trust bundle) or a rotated
  context means a new one, so a renewal on this side forces a full handshake (the peer's renewal does the same
  on its side: its new context has new ticket keys and cannot read the old ticket);
- fewer than `max_resumptions` resumptions followed the full handshake at the root of its chain, and that full
  handshake is younger than `max_age`.

The responder does not trust the initiator to stop (`ResumptionChains`): per peer bridge and identity pair it
counts the resumptions it accepted since its last full handshake with them and refuses the next one past
`max_resumptions` or `max_age` (`Reject.full`: the initiator runs a full handshake, which starts a new chain).
Its memory is bounded (`max_tickets` pairs, the least recently used goes); a pair it holds nothing for gets a
full handshake, so forgetting never lets a chain grow. Both bounds hold per pair, not per ticket: two tunnels of
the same pair share one budget, as they share one ticket on the initiator. OpenSSL's own ticket lifetime cannot
stand in for the age bound: it counts from each ticket's issue, and every resumption issues a new ticket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from OpenSSL import SSL

from ipsec_bridge.handshake import Ticket
from ztcore.identity import Identity


@dataclass(frozen=True, slots=True)
class ResumptionPolicy:
    enabled: bool = True
    max_resumptions: int = 8  # then a full handshake (signatures, certificates) starts a new chain
    max_age: float = 3600.0  # seconds since the chain's full handshake; at most the server's ticket lifetime
    max_tickets: int = 65536  # memory bound: the oldest goes first

    def __post_init__(self) -> None:
        if self.max_resumptions < 0:
            raise ValueError(f"max resumptions {self.max_resumptions} is negative")
        if not 0 < self.max_age <= 7 * 24 * 3600:
            raise ValueError(f"ticket max age {self.max_age}s: must be positive and at most 7 days (RFC 8446)")
        if self.max_tickets < 1:
            raise ValueError(f"max tickets {self.max_tickets} must be at least 1")


@dataclass(frozen=True, slots=True)
class TicketKey:
    peer_bridge: str  # the peer node's underlay address: tickets never cross bridges
    local: Identity
    peer: Identity


class TicketStore:
    def __init__(self, policy: ResumptionPolicy) -> None:
        self.policy = policy
        self._tickets: dict[TicketKey, Ticket] = {}
        self.dropped: Counter[str] = Counter()  # why tickets were not used: renewed, resumptions, age, evicted...

    def __len__(self) -> int:
        return len(self._tickets)

    def take(self, key: TicketKey, context: SSL.Context, now: float) -> Ticket | None:
        """The ticket to offer for `key` (removed: each session is offered once), or None for a full handshake."""
        ticket = self._tickets.pop(key, None)
        if ticket is None or not self.policy.enabled:
            return None
        why = self.refusal(ticket, context, now)
        if why is not None:
            self.dropped[why] += 1
            return None
        return ticket

    def refusal(self, ticket: Ticket, context: SSL.Context, now: float) -> str | None:
        """Why `ticket` must not be resumed now (None: it may)."""
        if ticket.context is not context:
            return "renewed"  # a new certificate, trust bundle or rotated context on this side
        if ticket.resumptions >= self.policy.max_resumptions:
            return "resumptions"
        if now - ticket.chain_started >= self.policy.max_age:
            return "age"
        return None

    def put(self, key: TicketKey, ticket: Ticket) -> None:
        if not self.policy.enabled:
            return
        self._tickets.pop(key, None)  # re-insert: the dict's order is the eviction order
        self._tickets[key] = ticket
        while len(self._tickets) > self.policy.max_tickets:
            del self._tickets[next(iter(self._tickets))]
            self.dropped["evicted"] += 1

    def forget(self, identity: Identity) -> None:
        """A certificate of `identity` was renewed: its tickets go (the next handshakes are full ones)."""
        gone = [k for k in self._tickets if k.local == identity]
        for key in gone:
            del self._tickets[key]
        self.dropped["renewed"] += len(gone)

    def discard(self, key: TicketKey, why: str) -> None:
        if self._tickets.pop(key, None) is not None:
            self.dropped[why] += 1


class ResumptionChains:
    """The responder's bounds: for each peer bridge and identity pair (a `TicketKey` as this side sees it: the peer
    node, this side's identity, the peer's), when its last full handshake ran here (on `monotonic`) and how many
    resumptions this side accepted since."""

    def __init__(self, policy: ResumptionPolicy, monotonic: Callable[[], float]) -> None:
        self.policy = policy
        self._monotonic = monotonic
        self._chains: dict[TicketKey, tuple[float, int]] = {}  # insertion order: least recently used first
        self.refused: Counter[str] = Counter()  # why resumed sessions were refused: resumptions, age, unknown, off

    def __len__(self) -> int:
        return len(self._chains)

    def bounds(self, key: TicketKey) -> ChainBounds:
        return ChainBounds(self, key)

    def resumed(self, key: TicketKey) -> str | None:
        """Why a resumed session of `key` must not be accepted now (None: it is, and is counted)."""
        if not self.policy.enabled:
            self.refused["off"] += 1
            return "resumption is off on this bridge"
        chain = self._chains.get(key)
        if chain is None:
            self.refused["unknown"] += 1
            return "no full handshake with this peer and identity pair on record here"
        started, count = chain
        limit = self.policy.max_resumptions
        if count >= limit:
            self.refused["resumptions"] += 1
            return f"{count} resumptions since the last full handshake (at most {limit})"
        age = self._monotonic() - started
        if age >= self.policy.max_age:
            self.refused["age"] += 1
            return f"the last full handshake ran {age:.0f}s ago (at most {self.policy.max_age:.0f}s)"
        self._put(key, (started, count + 1))
        return None

    def full(self, key: TicketKey) -> None:
        self._put(key, (self._monotonic(), 0))

    def _put(self, key: TicketKey, chain: tuple[float, int]) -> None:
        self._chains.pop(key, None)
        self._chains[key] = chain
        while len(self._chains) > self.policy.max_tickets:
            del self._chains[next(iter(self._chains))]


@dataclass(frozen=True, slots=True)
class ChainBounds:
    """`ResumptionChains` for one pair, as a handshake's plan carries it (`ipsec_bridge.handshake.ChainBounds`)."""

    chains: ResumptionChains
    key: TicketKey

    def resumed(self) -> str | None:
        return self.chains.resumed(self.key)

    def full(self) -> None:
        self.chains.full(self.key)
