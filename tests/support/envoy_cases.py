"""The Envoy sidecar cases: which sidecars of which mesh have goldens, and small helpers to read what
`build_for_proxy` gives them.

Shared by the golden test (tests/unit/test_build_envoy.py), the capture rules (tests/unit/test_build_capture.py)
and real Envoy's validation (tests/e2e/test_envoy_validate.py), so that all three look at the same sidecars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import message

from ztcore.envoy import resource_name
from ztcore.envoy.proxy import Proxy
from ztcore.mesh.registry.files import read_dir
from ztcore.mesh.registry.parse import parse_text
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, Translation, translate

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "envoy"
EXAMPLES = ROOT / "examples" / "mesh"


@dataclass(frozen=True)
class Sidecar:
    pod: str
    namespace: str
    ip: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    # NONE: listeners bind the pod's sockets (the original cases); REDIRECT/TPROXY: istiod's capture shape.
    interception: str = "NONE"

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.pod}.{self.namespace}~{self.namespace}.svc.cluster.local"

    @property
    def proxy(self) -> Proxy:
        return Proxy.parse(
            self.node_id, {"NAMESPACE": self.namespace, "INTERCEPTION_MODE": self.interception, **self.metadata}
        )

    @property
    def golden(self) -> str:
        return f"{self.namespace}.{self.pod}"


CASES: dict[str, list[Sidecar]] = {
    "examples-mesh": [
        Sidecar("frontend-1", "shop", "10.244.1.10"),
        Sidecar("cart-1", "shop", "10.244.1.11"),
        Sidecar("debug", "shop", "10.244.2.30"),
        Sidecar("ledger-1", "payments", "10.244.1.20"),
    ],
    "ports": [
        Sidecar("web-1", "apps", "10.1.0.1"),
        # Addresses from INSTANCE_IPS win over the id's; outbound listeners on a chosen loopback address.
        Sidecar("web-2", "apps", "10.1.0.200", {"INSTANCE_IPS": "10.1.0.2", "ZTDPU_OUTBOUND_BIND": "127.0.1.2"}),
        Sidecar("db-1", "apps", "10.1.0.3"),
        Sidecar("v6-1", "apps", "fd00::5"),
        Sidecar("api-1", "other", "10.2.0.1"),
        Sidecar("ghost-1", "apps", "10.1.0.77"),  # not in the registry: outbound only
    ],
    # istiod's capture shape (virtualInbound/virtualOutbound), PeerAuthentication per port, RBAC filters.
    "capture": [
        Sidecar("httpbin-1", "foo", "10.244.2.21", interception="REDIRECT"),
        Sidecar("sleep-1", "foo", "10.244.1.31", {"INTERCEPTION_MODE": "TPROXY"}),
        Sidecar("mysql-1", "db", "10.244.3.5", interception="REDIRECT"),
    ],
    "capture-registry-only": [Sidecar("sleep-1", "foo", "10.244.1.31", interception="REDIRECT")],
}
# Cases that share another case's mesh, with other mesh options.
MESHES: dict[str, tuple[str, TranslateOptions]] = {
    "capture-registry-only": ("capture", TranslateOptions(outbound_traffic_policy="REGISTRY_ONLY")),
}


def mesh_of(case: str, options: TranslateOptions | None = None) -> Translation:
    if case in MESHES:
        case, options = MESHES[case]
    if case == "examples-mesh":
        result = read_dir(EXAMPLES)
    else:
        source = GOLDEN / f"{case}.mesh.yaml"
        result = parse_text(source.read_text(), str(source))
    assert [str(e) for e in result.errors] == []
    return translate(RegistrySnapshot(result.objects), options)


def by_name(built: Mapping[str, Sequence[message.Message]], type_url: str) -> dict[str, Any]:
    return {resource_name(m): m for m in built[type_url]}


def unpack(any_msg: Any, cls: type[message.Message]) -> Any:
    msg = cls()
    assert any_msg.Unpack(msg), f"{any_msg.type_url} is not a {cls.DESCRIPTOR.full_name}"
    return msg
