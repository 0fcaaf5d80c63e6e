"""What every tunnel room is configured with: the bridge's settings, its metrics and its two clocks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ipsec_bridge.pairs import TunnelScope
from ztcore.metrics import Registry

IPAddress = IPv4Address | IPv6Address
Monotonic = Callable[[], float]  # seconds: deadlines, backoff, ages (never goes back)
Wall = Callable[[], dt.datetime]  # what certificates and the admin view speak in


def wall_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    node: str
    scope: TunnelScope = TunnelScope.POD
    port: int = 15009
    node_address: IPAddress | None = None  # else: this node's bridge pod address from WDS
    rekey_interval: float = 3600.0
    rekey_jitter: float = 0.1
    grace: float = 2.0
    handshake_timeout: float = 10.0  # the exchange with the peer (TLS, SPIs, the SAs); not the pair policies
    # The pair policies go in after the exchange, under their own deadline: handshake_timeout plus this much per
    # policy (a node tunnel with 10,000 pod pairs switches 10,000-30,000 of them; UML needed up to 31 s).
    policy_seconds_each: float = 0.005
    cert_wait: float = 10.0
    key_bytes: int = 16
    max_parallel_handshakes: int = 32
    retry_initial: float = 0.5
    retry_max: float = 30.0
    responder_nudge_after: float = 3.0  # a responder without a tunnel asks the initiator after this long
    min_rekey_gap: float = 2.0  # rekey requests right after a handshake are answered by that handshake
    # An adopted generation's certificates are unknown: one no handshake replaced within this long is removed.
    adopt_max_age: float = 600.0
    # A handshake must come from the peer node's underlay address. In node scope the certificate names only the
    # bridges' shared service account, so without this one node's bridge could claim another node's tunnel.
    # Off only where bridges share one host address (tests over loopback).
    check_source_address: bool = True


class BridgeMetrics:
    def __init__(self, registry: Registry) -> None:
        self.handshakes = registry.counter(
            "zt_bridge_handshakes_total", "Tunnel handshakes by role and result (ok, or the failure code)"
        )
        self.rekeys = registry.counter(
            "zt_bridge_rekeys_total",
            "Completed rekeys (a new generation replaced one), by role and trigger (time, bytes, packets, renewal, "
            "demand, peer)",
        )
        self.removals = registry.counter("zt_bridge_tunnel_removals_total", "Tunnels whose SAs were removed, by reason")
        self.rekey_requests = registry.counter(
            "zt_bridge_rekey_requests_total", "Rekey requests sent to or received from peers, by direction"
        )
        self.offload_fallbacks = registry.counter(
            "zt_bridge_offload_fallback_total", "Generations whose SAs asked for offload but run in software"
        )
        self.handshake_seconds = registry.histogram(
            "zt_bridge_handshake_duration_seconds",
            "Handshake + key export + SA/SP install, per successful handshake",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.adoption = registry.counter(
            "zt_bridge_adoption_total",
            "Restart decisions: tunnels adopted at start, then kept (rekeyed) or removed; unprovable objects removed",
        )
        self.removal_seconds = registry.histogram(
            "zt_bridge_removal_duration_seconds",
            "From the state change that refused a tunnel until its policies and SAs are gone",
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1),
        )
