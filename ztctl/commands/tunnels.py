"""`ztctl tunnels [--node N]`: a zt-bridge's tunnels, from its admin port; `ztctl tunnels rekey`: rekey them.

`--bridge ADDR` (repeatable) names the bridges' admin addresses; `--node N` keeps the bridges of node N.
Columns: NODE LOCAL PEER STATE LOCAL IDENTITY PEER IDENTITY SPI IN SPI OUT AGE BYTES PACKETS OFFLOAD [VF]
NEXT REKEY (state: active or idle for an up tunnel, else pending, failing, adopted; bytes and packets as
in/out; offload none, crypto, packet, or fallback when the kernel ignored the request; VF only when a bridge
runs with --vf-map). Tunnels that are not up show their last error instead of SPIs; pod pairs that policy
refuses both ways, local pods the VF map refuses, a refused --offload, and (--setup on-demand) pairs reclaimed
when idle, are listed under the table.
`-o json` prints the bridges' /config_dump documents.

`ztctl tunnels rekey [--peer P] [--local L]` asks each bridge to rekey its tunnels now (all, or the chosen
ones): the initiator of each tunnel runs a new handshake, a responder asks its initiator to. The older
`ztctl tunnels --rekey` still works (deprecated).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from ztcore.config import Duration, option
from ztctl.commands.proxy_config import tabulate
from ztctl.errors import CliError

COLUMNS = (
    "NODE", "LOCAL", "PEER", "STATE", "LOCAL IDENTITY", "PEER IDENTITY", "SPI IN", "SPI OUT", "AGE", "BYTES IN/OUT",
    "PACKETS IN/OUT", "OFFLOAD", "NEXT REKEY",
)  # fmt: skip
VF_COLUMNS = (*COLUMNS[:-1], "VF", COLUMNS[-1])  # with --vf-map: the local pod's VF


@dataclasses.dataclass(frozen=True)
class TunnelsOptions:
    ENV_PREFIX = "ZTCTL"

    bridge: tuple[str, ...] = option(["127.0.0.1:15030"], "admin address of a zt-bridge (repeat for several)")
    node: str = option("", "only the bridge(s) of this node")
    output: str = option("short", "output format", choices=("short", "json"), short="-o")
    rekey: bool = option(False, "deprecated: use `ztctl tunnels rekey`")
    peer: str = option("", "with --rekey: only tunnels to this peer (pod address or name, or node)")
    local: str = option("", "with --rekey: only tunnels of this local pod (address or name)")
    timeout: Duration = option(Duration(10), "how long to wait for each bridge")


@dataclasses.dataclass(frozen=True)
class TunnelsRekeyOptions:
    ENV_PREFIX = "ZTCTL"

    bridge: tuple[str, ...] = option(["127.0.0.1:15030"], "admin address of a zt-bridge (repeat for several)")
    node: str = option("", "only the bridge(s) of this node")
    peer: str = option("", "only tunnels to this peer (pod address or NAMESPACE/NAME, or node)")
    local: str = option("", "only tunnels of this local pod (address or NAMESPACE/NAME)")
    timeout: Duration = option(Duration(10), "how long to wait for each bridge")


def _url(address: str, path: str) -> str:
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + path


async def _request(method: str, url: str, deadline: float, params: Mapping[str, str] | None = None) -> Any:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=deadline)) as http,
            http.request(method, url, params=params) as resp,
        ):
            if resp.status != 200:
                raise CliError(f"{url}: HTTP {resp.status}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as err:
        raise CliError(f"cannot read {url}: {err or type(err).__name__}") from None


async def fetch_dumps(bridges: Sequence[str], deadline: float) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(_request("GET", _url(b, "/config_dump"), deadline) for b in bridges)))


def _bytes(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60}s"
    return f"{s // 3600}h{(s % 3600) // 60}m"


def _short_error(error: str) -> str:
    """`dataplane: UPDSA esp spi ... failed: EINVAL: reason` -> `dataplane: EINVAL: reason`: the table shows why."""
    code, sep, rest = error.partition(": ")
    if sep and " failed: " in rest:
        return f"{code}: {rest.split(' failed: ', 1)[1]}"
    return error


def has_vf_map(dumps: Sequence[Mapping[str, Any]]) -> bool:
    return any("vf_map" in d for d in dumps)


def rows(dumps: Sequence[Mapping[str, Any]], vf: bool = False) -> list[tuple[str, ...]]:
    """Table rows (COLUMNS, or VF_COLUMNS with `vf`)."""
    out: list[tuple[str, ...]] = []
    for dump in dumps:
        node = str(dump.get("node", "?"))
        for t in dump.get("tunnels", []):
            local = f"{t.get('local')} ({t.get('local_address')})"
            peer = f"{t.get('peer')} ({t.get('peer_address')})"
            vf_cell = (str(t["vf"]) if t.get("vf") is not None else "-",) if vf else ()
            state = str(t.get("state", "?"))
            if state not in ("up", "adopted"):  # adopted: left by a previous run, being rekeyed
                error = _short_error(t.get("last_error") or "")
                out.append((node, local, peer, state, t.get("local_identity", ""), t.get("peer_identity", ""),
                            "-", error[:90], "-", "-", "-", "-", *vf_cell, "-"))  # fmt: skip
                continue
            if state == "up":
                state = str(t.get("activity") or "active")  # an eager tunnel that is up is active
            out.append(
                (
                    node, local, peer, state, t["local_identity"], t["peer_identity"], t["spi_in"], t["spi_out"],
                    _age(t.get("age_seconds")),
                    f"{_bytes(t.get('bytes_in'))}/{_bytes(t.get('bytes_out'))}",
                    f"{t.get('packets_in', '-')}/{t.get('packets_out', '-')}",
                    str(t.get("offload", "-")),
                    *vf_cell,
                    "(adopted)" if t.get("state") == "adopted"
                    else _age(t.get("next_rekey_seconds")) if t.get("role") == "initiator" else "(peer)",
                )
            )  # fmt: skip
    return out


def notes(dumps: Sequence[Mapping[str, Any]]) -> list[str]:
    """What has no row but keeps tunnels down: a refused --offload, local pods the VF map refuses, pod pairs
    that policy refuses both ways."""
    out: list[str] = []
    for dump in dumps:
        node = str(dump.get("node", "?"))
        for pair in dump.get("refused_pairs", []):
            ends = (
                f"{pair.get('local_pod')} ({pair.get('local_ip')}) <-> {pair.get('peer_pod')} ({pair.get('peer_ip')})"
            )
            outbound, inbound = pair.get("outbound", ""), pair.get("inbound", "")
            why = f"both ways: {outbound}" if outbound == inbound else f"out: {outbound}; in: {inbound}"
            out.append(f"{node}: no tunnel {ends}, policy refuses it {why}")
        offload = dump.get("offload") or {}
        if offload and not offload.get("usable", True):
            out.append(f"{node}: offload {offload.get('mode')} on {offload.get('device')} refused by the kernel: "
                       f"{offload.get('error')} (no software fallback: tunnels stay down)")  # fmt: skip
        vf_map = dump.get("vf_map") or {}
        if vf_map.get("last_error"):
            out.append(f"{node}: VF map {vf_map.get('path')}: {vf_map['last_error']} (the previous map stays)")
        for pod in ((dump.get("state") or {}).get("vf") or {}).get("refused", []):
            out.append(f"{node}: no tunnels for {pod.get('pod')} ({pod.get('ip')}): {pod.get('reason')}")
        on_demand = dump.get("on_demand") or {}
        for pair in on_demand.get("reclaimed_pairs", []):
            out.append(f"{node}: reclaimed {pair} (idle; the next packet sets it up again)")
        if on_demand:
            counts = on_demand.get("acquires") or {}
            out.append(f"{node}: on-demand: acquires received {counts.get('received', 0)}, admitted "
                       f"{counts.get('admitted', 0)}, denied {counts.get('denied', 0)}")  # fmt: skip
    return out


def _select(dumps: list[dict[str, Any]], node: str) -> list[dict[str, Any]]:
    if not node:
        return dumps
    chosen = [d for d in dumps if d.get("node") == node]
    if not chosen:
        known = ", ".join(sorted(str(d.get("node")) for d in dumps)) or "none"
        raise CliError(f"no bridge of node {node!r} among the given ones (they are: {known})")
    return chosen


def run(opts: TunnelsOptions) -> int:
    if not opts.bridge:
        raise CliError("give at least one --bridge address")
    if (opts.peer or opts.local) and not opts.rekey:
        raise CliError("--peer and --local select tunnels to rekey: use `ztctl tunnels rekey --peer/--local`")
    if opts.rekey:
        print("ztctl tunnels: --rekey is deprecated, use `ztctl tunnels rekey`", file=sys.stderr)
        return _rekey(TunnelsRekeyOptions(opts.bridge, opts.node, opts.peer, opts.local, opts.timeout))
    dumps = _select(asyncio.run(fetch_dumps(opts.bridge, float(opts.timeout))), opts.node)
    if opts.output == "json":
        print(json.dumps(dumps if len(dumps) > 1 else dumps[0], indent=2))
        return 0
    vf = has_vf_map(dumps)
    table = rows(dumps, vf)
    if table:
        print(tabulate(VF_COLUMNS if vf else COLUMNS, table, padding=2), end="")
    else:
        print("No tunnels.")
    for line in notes(dumps):
        print(line)
    return 0


def rekey(opts: TunnelsRekeyOptions) -> int:
    if not opts.bridge:
        raise CliError("give at least one --bridge address")
    return _rekey(opts)


def _rekey(opts: TunnelsRekeyOptions) -> int:
    deadline = float(opts.timeout)

    async def go() -> list[tuple[str, int]]:
        dumps = await fetch_dumps(opts.bridge, deadline)
        _select(dumps, opts.node)  # the same error as the listing when no bridge is of that node
        chosen = [
            (b, d) for b, d in zip(opts.bridge, dumps, strict=True) if not opts.node or d.get("node") == opts.node
        ]
        params = {k: v for k, v in (("peer", opts.peer), ("local", opts.local)) if v}
        answers = await asyncio.gather(*(_request("POST", _url(b, "/rekey"), deadline, params) for b, _ in chosen))
        return [(str(d.get("node")), int(a.get("rekeyed", 0))) for (_, d), a in zip(chosen, answers, strict=True)]

    for node, count in asyncio.run(go()):
        print(f"{node}: {count} tunnel(s) rekeying")
    return 0
