"""Stand-ins for what a TunnelManager talks to, shared by the bridge host tests (adoption, the injected clock,
scale): a kernel that records every XFRM write, a certificate source that never issues, and the block policies a
previous run leaves in the kernel."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_network
from typing import Any, cast

from ipsec_bridge.sa_manager import SaManager, SaSettings
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import XfrmMsg

MESH = (ip_network("10.0.0.0/8"),)


def block_policy_dump() -> list[m.PolicyInfo]:
    """The bridge's block policies for MESH, as a policy dump lists them."""
    # only SaManager's pure builder is used, so no socket
    builders = SaManager(cast(Any, None), SaSettings(mesh_cidrs=MESH))
    return [m.PolicyInfo(p) for p in builders.block_policies()]


class RecordingXfrm:
    """Stands in for the netlink socket: every write succeeds and is kept, for the assertions."""

    def __init__(self, sas: list[m.SaInfo], policies: list[m.PolicyInfo]) -> None:
        self.sas, self.policies = sas, policies
        self.requests: list[m.Request] = []

    def runs_inline(self, requests: Sequence[m.Request]) -> bool:
        return True  # call_each never suspends

    async def call_each(self, requests: Sequence[m.Request]) -> list[list[m.NetlinkMessage]]:
        self.requests.extend(requests)
        return [[] for _ in requests]

    async def add_policies(self, policies: Sequence[m.Policy], *, update: bool = False) -> None:
        self.requests.extend(m.new_policy(p, update=update) for p in policies)

    async def list_sas(self) -> list[m.SaInfo]:
        return self.sas

    async def sa_counters(self) -> list[m.SaCounters]:
        return [m.SaCounters.of(info) for info in self.sas]

    async def list_policies(self) -> list[m.PolicyInfo]:
        return self.policies

    def deleted_spis(self) -> set[int]:
        return {m.decode_sa_id(r.payload).spi for r in self.requests if r.type == XfrmMsg.DELSA}


class NoCertificates:
    """Certificates that never arrive: enough for a TunnelManager whose tunnels never handshake."""

    def on_renewed(self, callback: Any) -> None:
        pass

    def want(self, identities: Any) -> None:
        pass
