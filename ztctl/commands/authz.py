"""`ztctl x authz check`: would ztunnel let this caller connect to this pod and port, and which policy decides?

The decision is ztcore.rbac's, i.e. ztunnel's own evaluation, over the policies and workload a data source
provides (`MeshSource`): a folder of YAML translated the way ztd does (`--config-dir`), or a running ztd asked
over xDS the way a ztunnel asks (`--xds-address`, with the connection options of `ztctl proxy-status`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any, Protocol

import yaml

from ztcore.config import option
from ztcore.identity import Identity, IdentityError
from ztcore.mesh.translate import TranslateOptions
from ztcore.model.authz import Authorization, IPAddress
from ztcore.model.workload import TunnelProtocol, Workload
from ztcore.rbac import Connection, Decision, PolicyIndex, evaluate
from ztctl.commands import ztunnel_config
from ztctl.commands.configdir import ConfigDirSource
from ztctl.commands.xdsconn import XdsOptions
from ztctl.errors import CliError


@dataclasses.dataclass(frozen=True)
class AuthzCheckOptions(XdsOptions):
    ENV_PREFIX = "ZTCTL"

    xds_address: str = option("", "ask the ztd at this xDS address (e.g. 127.0.0.1:15012)", metavar="HOST:PORT")
    src: str = option("", "caller identity spiffe://<td>/ns/<ns>/sa/<sa>; omit for a plaintext caller")
    dst: str = option("", "destination pod", metavar="NS/POD")
    port: int = option(0, "destination port")
    src_ip: str = option("", "caller's IP address, for ipBlocks and source.ip conditions")
    config_dir: Path | None = option(None, "evaluate offline against this folder of YAML", env="ZTD_CONFIG_DIR")
    output: str = option("text", "output format", choices=("text", "json", "yaml"), short="-o")
    root_namespace: str = option("istio-system", "mesh root namespace (mesh-wide policies)")
    trust_domain: str = option("cluster.local", "trust domain ztd runs with", env="TRUST_DOMAIN")
    cluster_id: str = option("Kubernetes", "cluster id ztd runs with", env="CLUSTER_ID")
    dry_run_policies: bool = option(
        False,
        "treat istio.io/dry-run policies as ztd does when enabled",
        env="AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY",
    )


class MeshSource(Protocol):
    """Where the policies and workloads come from (a YAML folder now; a running ztd later)."""

    def describe(self) -> str: ...

    def policies(self) -> tuple[Authorization, ...]: ...

    def pod_workload(self, namespace: str, name: str) -> Workload:
        """The pod's workload; CliError naming the problem if there is none."""
        ...


class XdsSource:
    """A running ztd: the workloads and policies it serves a ztunnel (Delta WDS, as `ztunnel-config` reads)."""

    def __init__(self, opts: AuthzCheckOptions) -> None:
        self._address = opts.xds_address
        self._cluster_id = opts.cluster_id
        self._view = ztunnel_config.online(opts)

    def describe(self) -> str:
        return f"ztd at {self._address}"

    def policies(self) -> tuple[Authorization, ...]:
        return self._view.policies

    def pod_workload(self, namespace: str, name: str) -> Workload:
        uid = f"{self._cluster_id}//Pod/{namespace}/{name}"
        for w in self._view.workloads:
            if w.uid == uid:
                return w
        raise CliError(f"ztd at {self._address} serves no workload for pod {namespace}/{name}")


def _source(opts: AuthzCheckOptions) -> MeshSource:
    if opts.config_dir is None and opts.xds_address:
        return XdsSource(opts)
    if opts.config_dir is None:
        raise CliError("--config-dir is required (or --xds-address HOST:PORT to ask a running ztd)")
    translate_options = TranslateOptions(
        cluster_id=opts.cluster_id,
        trust_domain=opts.trust_domain,
        root_namespace=opts.root_namespace,
        dry_run_policies=opts.dry_run_policies,
    )
    return ConfigDirSource(opts.config_dir, translate_options)


def _parse_dst(text: str) -> tuple[str, str]:
    if not text:
        raise CliError("--dst NAMESPACE/POD is required")
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CliError(f"--dst {text!r} is not NAMESPACE/POD")
    return namespace, name


def _parse_src(text: str) -> Identity | None:
    if not text:
        return None
    try:
        return Identity.parse(text)
    except IdentityError as err:
        raise CliError(f"--src: {err}") from None


def _parse_ip(text: str) -> IPAddress | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CliError(f"--src-ip {text!r} is not an IP address") from None


def _dst_ip(workload: Workload, src_ip: IPAddress | None) -> IPAddress:
    # ztunnel sees the address the caller dialled: prefer the caller's IP family.
    if src_ip is not None:
        for ip in workload.addresses:
            if ip.version == src_ip.version:
                return ip
    return workload.addresses[0]


def check(opts: AuthzCheckOptions) -> int:
    namespace, name = _parse_dst(opts.dst)
    if not 1 <= opts.port <= 65535:
        raise CliError("--port must be between 1 and 65535" if opts.port else "--port is required")
    identity = _parse_src(opts.src)
    src_ip = _parse_ip(opts.src_ip)
    source = _source(opts)
    workload = source.pod_workload(namespace, name)
    if not workload.addresses:
        raise CliError(f"pod {namespace}/{name} has no address")
    conn = Connection(identity, src_ip, _dst_ip(workload, src_ip), opts.port, workload)
    decision = evaluate(PolicyIndex(source.policies()), conn)
    _print(decision, conn, opts.output)
    return 0


def _warnings(decision: Decision, conn: Connection) -> list[str]:
    out = [f"the workload references unknown policy {key}" for key in decision.unknown_policies]
    w = conn.dst_workload
    if w.tunnel_protocol is not TunnelProtocol.HBONE:
        # ztunnel only sees inbound traffic of pods the CNI captured; for others this is what it would decide.
        out.append(f"{w.namespace}/{w.name} is not enrolled in ambient, so no ztunnel enforces this decision")
    return out


def _as_dict(decision: Decision, conn: Connection) -> dict[str, Any]:
    return {
        "decision": decision.verdict,
        "policy": decision.policy,
        "reason": decision.reason,
        "source": {
            "identity": conn.src_identity.uri if conn.src_identity is not None else None,
            "ip": str(conn.src_ip) if conn.src_ip is not None else None,
        },
        "destination": {"workload": conn.dst_workload.uid, "ip": str(conn.dst_ip), "port": conn.dst_port},
        "dryRun": list(decision.dry_run),
        "warnings": _warnings(decision, conn),
    }


def _print(decision: Decision, conn: Connection, output: str) -> None:
    if output == "json":
        print(json.dumps(_as_dict(decision, conn), indent=2))
        return
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(_as_dict(decision, conn), sort_keys=False))
        return
    lines = [decision.verdict, decision.policy or "(default)", f"reason: {decision.reason}"]
    lines += [f"note: {note}" for note in decision.dry_run]
    lines += [f"warning: {warning}" for warning in _warnings(decision, conn)]
    print("\n".join(lines))
