"""`ztctl x authz check`: would this caller get through to this pod and port, and which policy decides?

The enforcing proxy answers: for an ambient pod, ztunnel (ztcore.rbac, ztunnel's own evaluation) over the
policies and workload a data source provides (`MeshSource`): a folder of YAML translated the way ztd does
(`--config-dir`), or a running ztd asked over xDS the way a ztunnel asks (`--xds-address`, with the connection
options of `ztctl proxy-status`). For a pod with an Envoy sidecar (`--proxy sidecar`, or `auto` when the pod
carries the injector's marks), its Envoy: the chain and RBAC filters ztd generates for it (authz_sidecar.py),
where `--method/--path/--host/--header` matter on HTTP ports.
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
from ztcore.mesh.translate.policies import has_effective_groups
from ztcore.model.authz import Action, Authorization, IPAddress, Scope
from ztcore.model.workload import TunnelProtocol, Workload
from ztcore.rbac import Connection, Decision, PolicyIndex, evaluate
from ztctl.commands import ztunnel_config
from ztctl.commands.authz_sidecar import HttpRequest, SidecarDecision, check_sidecar, has_sidecar
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
    proxy: str = option(
        "auto",
        "the enforcing proxy: ztunnel (ambient), sidecar (Envoy), or auto (sidecar when the pod has the "
        "injector's sidecar.istio.io/status annotation or security.istio.io/tlsMode=istio label)",
        choices=("auto", "ztunnel", "sidecar"),
    )
    method: str = option("", "sidecar, HTTP port: the request's method [GET]")
    path: str = option("/", "sidecar, HTTP port: the request's path")
    host: str = option("", "sidecar, HTTP port: the request's Host")
    header: tuple[str, ...] = option([], "sidecar, HTTP port: a request header NAME:VALUE (repeatable)")


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


def _parse_headers(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip():
            raise CliError(f"--header {value!r} is not NAME:VALUE")
        out.append((name.strip().lower(), text.strip()))
    return tuple(out)


def check(opts: AuthzCheckOptions) -> int:
    namespace, name = _parse_dst(opts.dst)
    if not 1 <= opts.port <= 65535:
        raise CliError("--port must be between 1 and 65535" if opts.port else "--port is required")
    identity = _parse_src(opts.src)
    src_ip = _parse_ip(opts.src_ip)
    headers = _parse_headers(opts.header)
    if opts.proxy == "sidecar" and opts.config_dir is None:
        # WDS carries no HTTP rules and no PeerAuthentication per port: only the folder has what Envoy gets.
        raise CliError("--proxy sidecar needs --config-dir (ztd's xDS for ztunnel lacks what a sidecar enforces)")
    source = _source(opts)
    workload = source.pod_workload(namespace, name)
    if not workload.addresses:
        raise CliError(f"pod {namespace}/{name} has no address")
    if _enforcer(opts, source, namespace, name) == "sidecar":
        assert isinstance(source, ConfigDirSource)
        pod = source.translation.source.pod(namespace, name) if source.translation.source else None
        if pod is None:
            raise CliError(f"pod {namespace}/{name} is not in {source.describe()}")
        http = HttpRequest(opts.method or "GET", opts.path, opts.host, headers) if opts.method or headers else None
        result = check_sidecar(
            source.translation, pod, opts.port, identity.uri if identity else None, opts.src_ip, http
        )
        _print_sidecar(result, opts)
        return 0
    conn = Connection(identity, src_ip, _dst_ip(workload, src_ip), opts.port, workload)
    decision = evaluate(PolicyIndex(source.policies()), conn)
    _print(decision, conn, opts.output, _disagreements(source, workload))
    return 0


def _enforcer(opts: AuthzCheckOptions, source: MeshSource, namespace: str, name: str) -> str:
    if opts.proxy == "ztunnel":
        return "ztunnel"
    if not isinstance(source, ConfigDirSource):
        return "ztunnel"
    if opts.proxy == "sidecar":
        return "sidecar"
    pod = source.translation.source.pod(namespace, name) if source.translation.source else None
    return "sidecar" if pod is not None and has_sidecar(pod) else "ztunnel"


def _disagreements(source: MeshSource, workload: Workload) -> list[str]:
    """Where istiod's status message and ztunnel's behaviour part: a DENY policy converted "without the HTTP
    rules" and called "more restrictive than requested", whose HTTP-only rules became empty matches that
    ztunnel skips, so at L4 those rules deny nothing."""
    if not isinstance(source, ConfigDirSource):
        return []
    messages = dict(source.translation.messages)
    applying = set(workload.authorization_policies)
    out = []
    for policy in source.policies():
        status = messages.get(policy.key)
        if policy.action is not Action.DENY or status is None or "more restrictive" not in status.message:
            continue
        if policy.scope is Scope.WORKLOAD_SELECTOR and policy.key not in applying:
            continue
        if policy.scope is Scope.NAMESPACE and policy.namespace != workload.namespace:
            continue
        skipped = [i for i, g in enumerate(policy.groups) if not has_effective_groups((g,))]
        if skipped:
            rules = ", ".join(str(i) for i in skipped)
            out.append(
                f"{policy.key}: istiod's status says it is enforced more restrictively than requested, but its "
                f"rule(s) {rules} had only HTTP fields and ztunnel skips them: at L4 they deny nothing"
            )
    return out


def _warnings(decision: Decision, conn: Connection, extra: list[str]) -> list[str]:
    out = [f"the workload references unknown policy {key}" for key in decision.unknown_policies] + extra
    w = conn.dst_workload
    if w.tunnel_protocol is not TunnelProtocol.HBONE:
        # ztunnel only sees inbound traffic of pods the CNI captured; for others this is what it would decide.
        out.append(f"{w.namespace}/{w.name} is not enrolled in ambient, so no ztunnel enforces this decision")
    return out


def _as_dict(decision: Decision, conn: Connection, extra: list[str]) -> dict[str, Any]:
    return {
        "proxy": "ztunnel",
        "decision": decision.verdict,
        "policy": decision.policy,
        "reason": decision.reason,
        "source": {
            "identity": conn.src_identity.uri if conn.src_identity is not None else None,
            "ip": str(conn.src_ip) if conn.src_ip is not None else None,
        },
        "destination": {"workload": conn.dst_workload.uid, "ip": str(conn.dst_ip), "port": conn.dst_port},
        "dryRun": list(decision.dry_run),
        "warnings": _warnings(decision, conn, extra),
    }


def _emit(data: dict[str, Any], lines: list[str], output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2))
    elif output == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    else:
        print("\n".join(lines))


def _print(decision: Decision, conn: Connection, output: str, extra: list[str]) -> None:
    lines = [decision.verdict, decision.policy or "(default)", f"reason: {decision.reason}"]
    lines += [f"note: {note}" for note in decision.dry_run]
    lines += [f"warning: {warning}" for warning in _warnings(decision, conn, extra)]
    _emit(_as_dict(decision, conn, extra), lines, output)


def _print_sidecar(result: SidecarDecision, opts: AuthzCheckOptions) -> None:
    verdict = "ALLOW" if result.allowed else "DENY"
    notes = [f"audit: {name}" for name in result.logged] + [f"dry-run: {d}" for d in result.dry_run]
    notes += [f"policy {note}" for note in result.policy_notes]
    if result.http and not (opts.method or opts.header):
        notes.append(f"port {opts.port} is HTTP: evaluated as GET {opts.path} (use --method/--path/--header)")
    data = {
        "proxy": "sidecar",
        "decision": verdict,
        "policy": result.policy,
        "reason": result.reason,
        "filterChain": result.chain or None,
        "source": {"identity": opts.src or None, "ip": opts.src_ip or None},
        "destination": {"pod": opts.dst, "port": opts.port},
        "notes": notes,
    }
    lines = [verdict, result.policy or "(default)", f"reason: {result.reason} (sidecar, chain {result.chain or '-'})"]
    lines += [f"note: {note}" for note in notes]
    _emit(data, lines, opts.output)
