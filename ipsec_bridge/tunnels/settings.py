"""What every tunnel room is configured with: the bridge's settings, its metrics and its two clocks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ipsec_bridge.pairs import TunnelScope
from ztcore.identity import Identity
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
    # TLS 1.3 resumption (psk_dhe_ke) for rekeys and re-established pairs (issue 15): a full handshake after
    # max_resumptions resumptions, ticket_max_age seconds after the chain's full handshake, and at renewal
    resumption: bool = True
    max_resumptions: int = 8
    ticket_max_age: float = 3600.0
    # --setup on-demand: no tunnel until a pod pair's first packet (XFRM ACQUIRE from the trap policies); eager
    # (the default) sets up every admitted pair as soon as WDS and policy admit it.
    on_demand: bool = False
    # on-demand: a tunnel whose SAs carried no byte for this long is removed, the trap takes over (0: never)
    idle_timeout: float = 600.0
    # on-demand: at most this many ACQUIREs handled at once; more wait for the kernel to ask again
    max_acquires: int = 256
    # on-demand: a denied pair's BLOCK policy lives this long (then the kernel asks again, and policy decides anew)
    deny_seconds: int = 30
    # on-demand: pairs with a pod of one of these "namespace/serviceaccount" ("namespace/*": the whole namespace)
    # are latency-critical: set up as soon as WDS and policy admit them, as in eager mode, and never reclaimed
    eager_for: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for entry in self.eager_for:
            ns, _, sa = entry.partition("/")
            if not ns or not sa or "/" in sa or "*" in ns or ("*" in sa and sa != "*"):
                raise ValueError(f"--eager-for {entry!r}: give NAMESPACE/SERVICEACCOUNT or NAMESPACE/*")
        if self.eager_for and not self.on_demand:
            raise ValueError("--eager-for needs --setup on-demand (eager set-up already sets up every pair)")
        if self.on_demand and self.scope is not TunnelScope.POD:
            raise ValueError("--setup on-demand needs --tunnel-scope pod (node tunnels carry many pairs at once)")
        if self.idle_timeout < 0:
            raise ValueError(f"idle timeout must be >= 0 (0: never), got {self.idle_timeout}")
        if self.max_acquires < 1 or self.deny_seconds < 1:
            raise ValueError("max_acquires and deny_seconds must be at least 1")


def latency_critical(settings: BridgeSettings, identity: Identity) -> bool:
    """Whether `--eager-for` names this pod's service account (or its whole namespace)."""
    return any(
        entry in (f"{identity.namespace}/{identity.service_account}", f"{identity.namespace}/*")
        for entry in settings.eager_for
    )


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
        # resumption (issue 15): signatures per rekey = signatures{kind="rekey"} / modes{kind="rekey"}
        self.handshake_modes = registry.counter(
            "zt_bridge_handshake_modes_total", "Successful handshakes by role, kind (new, rekey), mode (full, resumed)"
        )
        self.handshake_signatures = registry.counter(
            "zt_bridge_handshake_signatures_total",
            "Private-key signatures (CertificateVerify) this bridge made in successful handshakes, by role, kind, mode",
        )
        self.acquires = registry.counter(
            "zt_bridge_acquires_total",
            "On-demand set-up: kernel ACQUIREs by result (received, admitted, denied, duplicate, over_cap, foreign, "
            "failed)",
        )
        self.held_queues = registry.counter(
            "zt_bridge_held_queues_total",
            "On-demand set-up: pods' held first packets let go, by outcome (all_up: every pair of the queue was up; "
            "hold_max: pairs still being set up lost their first packets, TCP sends them again; head_failed)",
        )
        self.held_pairs_given_up = registry.counter(
            "zt_bridge_held_pairs_given_up_total",
            "On-demand set-up: pairs whose first packets the kernel freed because their pod's queue went first",
        )
        self.reclaims = registry.counter(
            "zt_bridge_reclaims_total", "On-demand set-up: idle tunnels removed (the trap policy took over again)"
        )
        self.removal_seconds = registry.histogram(
            "zt_bridge_removal_duration_seconds",
            "From the state change that refused a tunnel until its policies and SAs are gone",
            (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1),
        )
