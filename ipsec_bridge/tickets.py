"""The initiator's TLS sessions for resumption: in memory only (never written, never logged), a few per peer bridge
and identity pair, each used once (a resumption brings the next), within the bounds that force a full handshake.

Up to `per_pair` sessions are kept per pair, newest offered first, so that handshakes of one pair that run at
the same time (a bulk rekey, a pod's new peers of one service account) each resume one: with a single session
per pair all but the first went full. Each session carries its own chain (the full handshake at its root and
the resumptions since).

A ticket is handed out (`take`) only while
- it belongs to the TLS context the handshake will use: a renewed certificate (or trust bundle) or a rotated
  context means a new one, so a renewal on this side forces a full handshake (the peer's renewal does the same
  on its side: its new context has new ticket keys and cannot read the old ticket);
- fewer than `max_resumptions` resumptions followed the full handshake at the root of its chain, and that full
  handshake is younger than `max_age`.

The responder does not trust the initiator to stop (`ResumptionChains`): per peer bridge and identity pair it
counts the resumptions it accepted since its last full handshake with them and refuses the next one past
`max_resumptions` x `per_pair` (it cannot tell the initiator's chains apart: the tickets are stateless) or
`max_age` (`Reject.full`: the initiator runs a full handshake, which starts a new chain). Its memory is bounded
(`max_tickets` pairs, the least recently used goes); a pair it holds nothing for gets a full handshake, so
forgetting never lets a chain grow. OpenSSL's own ticket lifetime cannot stand in for the age bound: it counts
from each ticket's issue, and every resumption issues a new ticket.
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
    max_tickets: int = 65536  # memory bound (sessions held; responder: pairs): the least recently used go first
    per_pair: int = 8  # sessions held per peer bridge and identity pair: concurrent handshakes of a pair resume

    def __post_init__(self) -> None:
        if self.max_resumptions < 0:
            raise ValueError(f"max resumptions {self.max_resumptions} is negative")
        if not 0 < self.max_age <= 7 * 24 * 3600:
            raise ValueError(f"ticket max age {self.max_age}s: must be positive and at most 7 days (RFC 8446)")
        if self.max_tickets < 1:
            raise ValueError(f"max tickets {self.max_tickets} must be at least 1")
        if self.per_pair < 1:
            raise ValueError(f"sessions per pair {self.per_pair} must be at least 1")

    @property
    def pair_budget(self) -> int:
        """The responder's bound on a pair's resumptions between two full handshakes: `per_pair` chains."""
        return self.max_resumptions * self.per_pair


@dataclass(frozen=True, slots=True)
class TicketKey:
    peer_bridge: str  # the peer node's underlay address: tickets never cross bridges
    local: Identity
    peer: Identity


class TicketStore:
    def __init__(self, policy: ResumptionPolicy) -> None:
        self.policy = policy
        # per pair, oldest first; the dict's order is the pairs' eviction order (least recently used first)
        self._tickets: dict[TicketKey, list[Ticket]] = {}
        self._count = 0
        self.dropped: Counter[str] = Counter()  # why tickets were not used: renewed, resumptions, age, evicted...

    def __len__(self) -> int:
        return self._count

    def take(self, key: TicketKey, context: SSL.Context, now: float) -> Ticket | None:
        """The newest ticket to offer for `key` within bounds (removed: each session is offered once), or None
        for a full handshake. Tickets found out of bounds on the way go."""
        held = self._tickets.get(key)  # none when resumption is off: `put` keeps nothing then
        while held:
            ticket = held.pop()
            self._count -= 1
            why = self.refusal(ticket, context, now)
            if why is None:
                if not held:
                    del self._tickets[key]
                return ticket
            self.dropped[why] += 1
        self._tickets.pop(key, None)
        return None

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
        held = self._tickets.pop(key, None) or []  # re-insert: the pair is the most recently used now
        self._tickets[key] = held
        held.append(ticket)
        self._count += 1
        if len(held) > self.policy.per_pair:
            del held[0]
            self._count -= 1
            self.dropped["surplus"] += 1
        while self._count > self.policy.max_tickets:
            self.discard(next(iter(self._tickets)), "evicted")

    def forget(self, identity: Identity) -> None:
        """A certificate of `identity` was renewed: its tickets go (the next handshakes are full ones)."""
        for key in [k for k in self._tickets if k.local == identity]:
            self.discard(key, "renewed")

    def discard(self, key: TicketKey, why: str) -> None:
        held = self._tickets.pop(key, None) or []
        self._count -= len(held)
        self.dropped[why] += len(held)


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
        limit = self.policy.pair_budget
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
