"""PeerAuthentication for a sidecar's inbound side, resolved as istiod resolves it (ComposePeerAuthentication).

Of the policies that apply to a workload, one per level wins (the oldest; the registry has no creation time,
so the first by name): mesh (root namespace, no selector), namespace (no selector), workload (a selector
matching the pod's labels, not in the root namespace). The mode is PERMISSIVE, then replaced by each level
that sets one (UNSET inherits). Port-level modes come only from the workload-level policy and are keyed by
the container (target) port; an UNSET port inherits the workload's resolved mode.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztcore.mesh.registry.objects import FrozenMap, PeerAuthentication


class MtlsMode(enum.Enum):
    STRICT = "STRICT"  # mTLS only
    PERMISSIVE = "PERMISSIVE"  # mTLS or plaintext (the TLS inspector tells them apart)
    DISABLE = "DISABLE"  # plaintext only


_NO_PORTS: FrozenMap[int, MtlsMode] = FrozenMap()


@dataclass(frozen=True, slots=True)
class EffectivePeerAuthentication:
    mode: MtlsMode = MtlsMode.PERMISSIVE
    per_port: FrozenMap[int, MtlsMode] = _NO_PORTS

    def for_port(self, port: int) -> MtlsMode:
        return self.per_port.get(port, self.mode)


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(policies, key=lambda p: (p.namespace, p.name), default=None)


def _set(pa: PeerAuthentication | None) -> MtlsMode | None:
    if pa is None or pa.mtls_mode == "UNSET":
        return None
    return MtlsMode(pa.mtls_mode)


def compose(
    peer_authentications: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str,
) -> EffectivePeerAuthentication:
    """The effective inbound mTLS settings of one workload (`peer_authentications`: all of the mesh's)."""
    mesh: list[PeerAuthentication] = []
    namespace_wide: list[PeerAuthentication] = []
    workload: list[PeerAuthentication] = []
    for pa in peer_authentications:
        if not pa.selector:  # no selector, or an empty one
            if pa.namespace == root_namespace:
                mesh.append(pa)
            elif pa.namespace == namespace:
                namespace_wide.append(pa)
        elif pa.namespace == namespace != root_namespace and all(labels.get(k) == v for k, v in pa.selector.items()):
            workload.append(pa)
    mode = MtlsMode.PERMISSIVE
    for level in (_oldest(mesh), _oldest(namespace_wide), chosen := _oldest(workload)):
        mode = _set(level) or mode
    if chosen is None or not chosen.port_level_mtls:
        return EffectivePeerAuthentication(mode)
    per_port = {port: (mode if m == "UNSET" else MtlsMode(m)) for port, m in chosen.port_level_mtls.items()}
    return EffectivePeerAuthentication(mode, FrozenMap(per_port))
