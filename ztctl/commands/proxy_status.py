"""`ztctl proxy-status`: the sync state of every proxy connected to a ztd, as `istioctl proxy-status` prints it.

Data: one `istio.io/debug/syncz` request over ADS (what istioctl sends to istiod), answered with one
`envoy.service.status.v3.ClientConfig` per proxy. Cell values follow istiod's status logic: ERROR when the
proxy rejected the last response, NOT SENT when nothing was sent, SYNCED when the last nonce sent was
acknowledged, else STALE; IGNORED for a type the proxy does not use (a ztunnel's Envoy types).

Format: Istio 1.27+'s. The default table is `NAME CLUSTER ISTIOD VERSION SUBSCRIBED TYPES`; `-v` adds one
column per type (sorted short names) with the status and how long ago it last changed. Why not the older
fixed `CDS LDS EDS RDS ECDS` columns: ztunnel-style clients subscribe to WDS/WADS, which those columns cannot
show (every cell would read IGNORED); the 1.27 layout shows whatever a proxy watches. `-o json|yaml` prints
the syncz response itself (proto JSON), as istioctl 1.30+ does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import json_format

from ztcore.config import option
from ztcore.xds import typeurls
from ztctl.commands.proxy_config import tabulate
from ztctl.commands.xdsconn import XdsOptions, XdsTarget, node, sotw_once
from ztctl.errors import CliError

CLIENT_CONFIG_TYPE = "type.googleapis.com/envoy.service.status.v3.ClientConfig"
# The order istiod reports Envoy's types in; other types follow by short name.
ENVOY_ORDER = ("CDS", "LDS", "EDS", "RDS", "ECDS")
_CELL = {
    csds_pb2.ConfigStatus.SYNCED: "SYNCED",
    csds_pb2.ConfigStatus.NOT_SENT: "NOT SENT",
    csds_pb2.ConfigStatus.STALE: "STALE",
    csds_pb2.ConfigStatus.ERROR: "ERROR",
    csds_pb2.ConfigStatus.UNKNOWN: "IGNORED",
}


@dataclasses.dataclass(frozen=True)
class ProxyStatusOptions(XdsOptions):
    verbose: bool = option(False, "one column per xDS type, with its status", short="-v")
    output: str = option("short", "output format", choices=("short", "json", "yaml"), short="-o")


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRow:
    name: str
    cluster: str
    istiod: str
    version: str
    types: tuple[tuple[str, str, dt.datetime | None], ...]  # (short type, cell, last updated)

    @property
    def subscribed(self) -> tuple[str, ...]:
        return tuple(kind for kind, cell, _ in self.types if cell != "IGNORED")


def _rank(kind: str) -> tuple[int, str]:
    return (ENVOY_ORDER.index(kind), "") if kind in ENVOY_ORDER else (len(ENVOY_ORDER), kind)


def control_plane(resp: discovery_pb2.DiscoveryResponse) -> tuple[str, str]:
    """(ID, version) from the JSON ControlPlane identifier, with istioctl's placeholders."""
    if not resp.HasField("control_plane"):
        return "MISSING", "MISSING CP ID"
    try:
        info = json.loads(resp.control_plane.identifier)
        return str(info["ID"]), str(info["Info"]["version"])
    except (ValueError, KeyError, TypeError):
        return "INVALID", "INVALID CP ID"


def rows(resp: discovery_pb2.DiscoveryResponse) -> list[ProxyRow]:
    """One row per ClientConfig, sorted by proxy name (pure)."""
    istiod, version = control_plane(resp)
    out: list[ProxyRow] = []
    for res in resp.resources:
        if res.type_url != CLIENT_CONFIG_TYPE:
            raise CliError(f"unexpected resource type {res.type_url} in the syncz answer")
        cc = csds_pb2.ClientConfig()
        res.Unpack(cc)
        meta = cc.node.metadata.fields
        cluster = meta["CLUSTER_ID"].string_value if "CLUSTER_ID" in meta else ""
        types = []
        for cfg in cc.generic_xds_configs:
            updated = cfg.last_updated.ToDatetime(dt.UTC) if cfg.HasField("last_updated") else None
            types.append((typeurls.short_name(cfg.type_url), _CELL.get(cfg.config_status, "UNKNOWN"), updated))
        types.sort(key=lambda t: _rank(t[0]))
        out.append(ProxyRow(cc.node.id, cluster, istiod, version, tuple(types)))
    return sorted(out, key=lambda r: r.name)


def age(since: dt.datetime, now: dt.datetime) -> str:
    """kubectl's short age: 45s, 5m, 3h, 2d."""
    seconds = max(int((now - since).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def render(table: Sequence[ProxyRow], *, verbose: bool, now: dt.datetime) -> str:
    if not table:
        return "No proxies connected to this ztd.\n"
    if not verbose:
        cells = [
            (r.name, r.cluster, r.istiod, r.version, f"{len(r.subscribed)} ({','.join(r.subscribed)})") for r in table
        ]
        return tabulate(("NAME", "CLUSTER", "ISTIOD", "VERSION", "SUBSCRIBED TYPES"), cells)
    kinds = sorted({kind for r in table for kind, _, _ in r.types})
    body = []
    for r in table:
        by_kind = {kind: (cell, updated) for kind, cell, updated in r.types}
        status = []
        for kind in kinds:
            cell, updated = by_kind.get(kind, ("IGNORED", None))
            status.append(f"{cell} ({age(updated, now)})" if updated is not None and cell != "IGNORED" else cell)
        body.append((r.name, r.cluster, *status, r.istiod, r.version))
    return tabulate(("NAME", "CLUSTER", *kinds, "ISTIOD", "VERSION"), body)


def render_raw(resp: discovery_pb2.DiscoveryResponse, output: str) -> str:
    data: dict[str, Any] = json.loads(json_format.MessageToJson(resp))
    if output == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False))
    return json.dumps(data, indent=2) + "\n"


def fetch(target: XdsTarget) -> discovery_pb2.DiscoveryResponse:
    req = discovery_pb2.DiscoveryRequest(
        type_url=typeurls.DEBUG_SYNCZ, node=node("sidecar", {"Generator": "event", "SERVICE_ACCOUNT": "default"})
    )
    return sotw_once(target, req)


def run(opts: ProxyStatusOptions) -> int:
    resp = fetch(XdsTarget.of(opts))
    if opts.output == "short":
        sys.stdout.write(render(rows(resp), verbose=opts.verbose, now=dt.datetime.now(dt.UTC)))
    else:
        sys.stdout.write(render_raw(resp, opts.output))
    return 0
