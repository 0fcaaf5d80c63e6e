"""The runtime records of a tunnel (mutable: the rooms update them in place) and small pure helpers on them."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

from ipsec_bridge.adopt import AdoptedGeneration, AdoptedTunnel
from ipsec_bridge.handshake import HandshakeError
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.sa_manager import Endpoints, SaManager
from ipsec_bridge.tunnels.desired import TunnelSpec
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadStatus

HISTORY = 8  # generations a record remembers (/config_dump)


@dataclass(slots=True)
class Generation:
    number: int
    reqid: int
    spi_in: int
    spi_out: int
    key_bytes: int
    offload: OffloadStatus
    established: dt.datetime
    established_mono: float
    not_after: dt.datetime  # the earlier of the two certificates' expiry (adopted: the adoption deadline)
    handshake_seconds: float
    origin: str = "handshake"  # or "adopted": found in the kernel at start, keyed by a previous run
    esn: bool = True  # 64-bit sequence numbers (negotiated: false when either side's offload device lacks them)

    def sa_ids(self, sa: SaManager, ep: Endpoints) -> list[m.SaId]:
        return [sa.outbound_id(ep, self.spi_out), sa.inbound_id(ep, self.spi_in)]


@dataclass(slots=True)
class Tunnel:
    spec: TunnelSpec
    created: float
    current: Generation | None = None
    retiring: list[tuple[Generation, float]] = field(default_factory=list)
    generations: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    next_rekey: float | None = None
    rekey_wanted: bool = False
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    last_nudge: float = 0.0
    nudges: int = 0  # unanswered rekey requests in a row (they back off like handshakes)
    last_request: float = 0.0
    guard: list[str] = field(default_factory=list)  # set on removal; in-flight installers stop
    rekey_reason: str = ""
    limit_kind: str = ""  # "bytes" or "packets": which kernel limit the last EXPIRE was about (metrics)
    # the last HISTORY generations (number, why, when): a tuple, not a deque (a deque is ~600 B even when empty,
    # and a node holds thousands of records)
    history: tuple[tuple[int, str, dt.datetime], ...] = ()
    # idle reclaim (on-demand): the SA byte counters last read, and when they last moved (monotonic)
    seen_bytes: tuple[int, int] = (-1, -1)  # (in, out)
    active_at: float = 0.0
    origin: str = "eager"  # eager, acquire (this node's first packet) or peer (the peer's handshake or request)
    # on-demand reconcile: what the spec was last checked against (the view's rules_version and the two pods'
    # workload objects); the same basis in a new view means the same answer, so the pair is not asked again
    basis: tuple[int, object, object] | None = None

    def record(self, number: int, reason: str, at: dt.datetime) -> None:
        self.history = (*self.history[1 - HISTORY :], (number, reason, at))

    def want_rekey(self, reason: str) -> None:
        self.rekey_wanted = True
        if not self.rekey_reason:
            self.rekey_reason = reason

    @property
    def removed(self) -> bool:
        return bool(self.guard)


def activity(t: Tunnel, now: float, idle_after: float) -> str:
    """active: its SAs carried bytes within `idle_after` seconds (or it is new); idle: they did not."""
    if t.current is None:
        return ""
    last = max(t.active_at, t.current.established_mono)
    return "idle" if idle_after > 0 and now - last >= idle_after else "active"


def tunnel_state(t: Tunnel) -> str:
    if t.current is not None:
        return "adopted" if t.current.origin == "adopted" else "up"
    return "failing" if t.last_error else "pending"


def describe(spec: TunnelSpec) -> str:
    if spec.scope is TunnelScope.POD:
        return f"{spec.local_name}({spec.local_address}) <-> {spec.peer_name}({spec.peer_address})"
    return f"node {spec.local_name} <-> node {spec.peer_name}"


def adopted_endpoints(a: AdoptedTunnel) -> Endpoints:
    return Endpoints(a.local_node, a.peer_node, a.local_net, a.peer_net)


def adopted_sa_ids(sa: SaManager, ep: Endpoints, g: AdoptedGeneration) -> list[m.SaId]:
    return [sa.outbound_id(ep, g.spi_out), sa.inbound_id(ep, g.spi_in)]


def error_code(err: BaseException) -> str:
    if isinstance(err, HandshakeError):
        return err.code
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, XfrmError):
        return "dataplane"
    if isinstance(err, OSError):
        return "connect"
    return "internal"


def rekey_trigger(reason: str, limit_kind: str, initiator: bool) -> str:
    """The metrics label of a rekey: what started it on this side (a responder's own reasons included)."""
    if reason == "interval":
        return "time"
    if reason in ("soft limit", "hard limit"):
        return limit_kind or "limit"
    if reason == "certificate renewal":
        return "renewal"
    if reason == "requested":
        return "demand"
    return "peer" if not reason or reason == "peer request" or not initiator else "other"


def limit_kind(event: m.Expire) -> str:
    life, cur = event.sa.sa.lifetime, event.sa.current
    limit = life.hard_bytes if event.hard else life.soft_bytes
    return "bytes" if cur.bytes >= limit else "packets"


def matching(peer: str | None = None, local: str | None = None) -> Callable[[Tunnel], bool]:
    """Tunnels whose peer/local name or address equals the given strings (None: any)."""

    def check(t: Tunnel) -> bool:
        spec = t.spec
        if peer and peer not in (spec.peer_name, str(spec.peer_address), spec.peer_node):
            return False
        return not (local and local not in (spec.local_name, str(spec.local_address)))

    return check
