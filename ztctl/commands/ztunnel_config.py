"""`ztctl ztunnel-config workloads|services|policies`: what a ztunnel receives, in istioctl's tables.

istioctl reads a ztunnel's admin /config_dump; ztctl asks ztd directly, the way a ztunnel does: one Delta
ADS stream with wildcard subscriptions to `istio.workload.Address` and `istio.security.Authorization`
(node `ztunnel~…`), each first response ACKed. `--config-dir DIR` translates a folder offline instead,
exactly as ztd would serve it.

Tables (istioctl/pkg/writer/ztunnel/configdump, Go tabwriter with padding 1):
- workloads: NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL (first address; HBONE or TCP);
- services:  NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS (first VIP; healthy/total workloads);
- policies:  NAMESPACE POLICY NAME ACTION SCOPE (Allow/Deny; Global/Namespace/WorkloadSelector).
`-o json|yaml` prints the resources themselves in proto JSON (4-space indent, as istioctl).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from protos.istio.security import authorization_pb2
from protos.istio.workload import workload_pb2
from ztcore.config import option
from ztcore.mesh.translate import TranslateOptions, Translation
from ztcore.model.authz import Action, Authorization, Scope
from ztcore.model.workload import Service, TunnelProtocol, Workload, WorkloadStatus
from ztcore.xds import typeurls
from ztctl.commands.configdir import ConfigDirSource
from ztctl.commands.proxy_config import tabulate
from ztctl.commands.xdsconn import XdsOptions, XdsTarget, delta_initial, node
from ztctl.errors import CliError


@dataclasses.dataclass(frozen=True)
class ZtunnelConfigOptions(XdsOptions):
    config_dir: Path | None = option(None, "read this folder of YAML offline instead of a running ztd")
    namespace: str = option("", "only this namespace")
    output: str = option("short", "output format", choices=("short", "json", "yaml"), short="-o")
    cluster_id: str = option("Kubernetes", "cluster id ztd runs with (with --config-dir)", env="CLUSTER_ID")
    root_namespace: str = option("istio-system", "mesh root namespace (with --config-dir)")


@dataclasses.dataclass(frozen=True, slots=True)
class WdsView:
    """Workloads, services and policies, however they were obtained."""

    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[Authorization, ...]

    @classmethod
    def of_translation(cls, t: Translation) -> WdsView:
        return cls(t.workloads, t.services, t.authorizations)

    @classmethod
    def of_responses(cls, responses: dict[str, discovery_pb2.DeltaDiscoveryResponse]) -> WdsView:
        """Decode what ztd sent; ValueError naming the resource that is not what its type says."""
        workloads: list[Workload] = []
        services: list[Service] = []
        policies: list[Authorization] = []
        for res in responses[typeurls.ADDRESS].resources:
            address = workload_pb2.Address()
            if not res.resource.Unpack(address):
                raise ValueError(f"resource {res.name!r} is not an istio.workload.Address")
            if address.HasField("workload"):
                workloads.append(Workload.from_pb(address.workload))
            elif address.HasField("service"):
                services.append(Service.from_pb(address.service))
        for res in responses[typeurls.AUTHORIZATION].resources:
            policy = authorization_pb2.Authorization()
            if not res.resource.Unpack(policy):
                raise ValueError(f"resource {res.name!r} is not an istio.security.Authorization")
            policies.append(Authorization.from_pb(policy))
        return cls(tuple(workloads), tuple(services), tuple(policies))

    def in_namespace(self, namespace: str) -> WdsView:
        if not namespace:
            return self
        return WdsView(
            tuple(w for w in self.workloads if w.namespace == namespace),
            tuple(s for s in self.services if s.namespace == namespace),
            tuple(p for p in self.policies if p.namespace == namespace),
        )


# -- pure rendering ------------------------------------------------------------------------------------------


def workload_rows(view: WdsView) -> list[tuple[str, ...]]:
    ordered = sorted(view.workloads, key=lambda w: (w.namespace, w.name, w.node))
    return [
        (
            w.namespace,
            w.name,
            str(w.addresses[0]) if w.addresses else "",
            w.node,
            "None",  # ztd has no waypoints
            "HBONE" if w.tunnel_protocol is TunnelProtocol.HBONE else "TCP",
        )
        for w in ordered
    ]


def service_rows(view: WdsView) -> list[tuple[str, ...]]:
    total: dict[str, int] = {}
    healthy: dict[str, int] = {}
    for w in view.workloads:
        for key, _ in w.services:
            total[key] = total.get(key, 0) + 1
            if w.status is WorkloadStatus.HEALTHY:
                healthy[key] = healthy.get(key, 0) + 1
    ordered = sorted(view.services, key=lambda s: (s.namespace, s.name, s.hostname))
    return [
        (
            s.namespace,
            s.name,
            str(s.addresses[0].address) if s.addresses else "",
            "None",
            f"{healthy.get(s.key, 0)}/{total.get(s.key, 0)}",
        )
        for s in ordered
    ]


_ACTION = {Action.ALLOW: "Allow", Action.DENY: "Deny"}
_SCOPE = {Scope.GLOBAL: "Global", Scope.NAMESPACE: "Namespace", Scope.WORKLOAD_SELECTOR: "WorkloadSelector"}


def policy_rows(view: WdsView) -> list[tuple[str, ...]]:
    ordered = sorted(view.policies, key=lambda p: (p.namespace, p.name))
    return [(p.namespace, p.name, _ACTION[p.action], _SCOPE[p.scope]) for p in ordered]


HEADERS = {
    "workloads": ("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"),
    "services": ("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"),
    "policies": ("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"),
}
ROWS = {"workloads": workload_rows, "services": service_rows, "policies": policy_rows}


def render_table(kind: str, view: WdsView) -> str:
    return tabulate(HEADERS[kind], ROWS[kind](view), padding=1)


def _messages(kind: str, view: WdsView) -> Iterable[Any]:
    if kind == "workloads":
        return (w.to_pb() for w in sorted(view.workloads, key=lambda w: (w.namespace, w.name)))
    if kind == "services":
        return (s.to_pb() for s in sorted(view.services, key=lambda s: (s.namespace, s.name, s.hostname)))
    return (p.to_pb() for p in sorted(view.policies, key=lambda p: (p.namespace, p.name)))


def render_dump(kind: str, view: WdsView, output: str) -> str:
    data = [json.loads(json_format.MessageToJson(m)) for m in _messages(kind, view)]
    if output == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False))
    return json.dumps(data, indent=4) + "\n"


# -- sources -------------------------------------------------------------------------------------------------


def offline(opts: ZtunnelConfigOptions) -> WdsView:
    assert opts.config_dir is not None
    options = TranslateOptions(
        cluster_id=opts.cluster_id, trust_domain=opts.trust_domain, root_namespace=opts.root_namespace
    )
    return WdsView.of_translation(ConfigDirSource(opts.config_dir, options).translation)


def fetch(target: XdsTarget) -> dict[str, discovery_pb2.DeltaDiscoveryResponse]:
    return delta_initial(target, node("ztunnel"), (typeurls.AUTHORIZATION, typeurls.ADDRESS))


def online(opts: XdsOptions) -> WdsView:
    responses = fetch(XdsTarget.of(opts))
    try:
        return WdsView.of_responses(responses)
    except ValueError as err:
        raise CliError(f"ztd at {opts.xds_address} sent something ztunnel would reject: {err}") from None


def _show(kind: str, opts: ZtunnelConfigOptions) -> int:
    view = (offline(opts) if opts.config_dir is not None else online(opts)).in_namespace(opts.namespace)
    out = render_table(kind, view) if opts.output == "short" else render_dump(kind, view, opts.output)
    sys.stdout.write(out)
    return 0


def workloads(opts: ZtunnelConfigOptions) -> int:
    return _show("workloads", opts)


def services(opts: ZtunnelConfigOptions) -> int:
    return _show("services", opts)


def policies(opts: ZtunnelConfigOptions) -> int:
    return _show("policies", opts)


__all__: Sequence[str] = ["ZtunnelConfigOptions", "policies", "services", "workloads"]
