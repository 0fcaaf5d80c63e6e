"""The bridge's admin port over real HTTP: /metrics names and labels (tunnel states, offload, per-VF traffic,
rekeys by trigger, xfrm_stat), /config_dump's VF and offload sections, POST /rekey, and `ztctl tunnels` /
`ztctl tunnels rekey` against it.

The workload state is the two-node mesh YAML through the real StateStore, and the tunnels are the real
TunnelManager's records for it; the kernel is replaced by a dump of SAs with known counters (the host has no
ESP: tests/kernel/test_bridge_kernel.py scrapes the same endpoint of bridges driving a real kernel).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from ipsec_bridge.admin import Admin, json_chunks
from ipsec_bridge.certs import Certificates
from ipsec_bridge.netns import Netns
from ipsec_bridge.sa_manager import BRIDGE_MARK, SaManager, SaSettings
from ipsec_bridge.state import StateStore
from ipsec_bridge.tunnels.desired import desired_specs
from ipsec_bridge.tunnels.manager import TunnelManager
from ipsec_bridge.tunnels.records import Generation, Tunnel, rekey_trigger
from ipsec_bridge.tunnels.settings import BridgeMetrics, BridgeSettings
from ipsec_bridge.vfmap import VfMapFile
from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.netlink import XfrmError
from ipsec_bridge.xfrm.offload import OffloadProbe, OffloadStatus
from tests.support.bridge_mesh import load_view, write_mesh
from ztcore.fsutil import write_atomic
from ztcore.identity.caclient import CAClient, CAClientOptions
from ztcore.identity.manager import RotationPolicy, SecretManager
from ztcore.metrics import Registry
from ztctl import cli

NODE_A, NODE_B = ip_address("192.168.50.1"), ip_address("192.168.50.2")
A1B1, A1B2, A2B2 = (
    ("pod", "10.1.0.10", "10.2.0.10"),
    ("pod", "10.1.0.10", "10.2.0.11"),
    ("pod", "10.1.0.11", "10.2.0.11"),
)


class KernelDump:
    """The SAs the kernel would list: (src, dst, spi) -> (bytes, packets)."""

    def __init__(self) -> None:
        self.sas: dict[tuple[Any, Any, int], tuple[int, int]] = {}
        self.fail = False

    async def list_sas(self) -> list[m.SaInfo]:
        if self.fail:
            raise XfrmError("GETSA dump", 1, "Operation not permitted")
        sel = m.Selector.of("10.0.0.0/8", "10.0.0.0/8")
        return [
            m.SaInfo(m.SecurityAssociation(src, dst, spi, None, sel, mark=BRIDGE_MARK), m.LifetimeCurrent(b, p))
            for (src, dst, spi), (b, p) in self.sas.items()
        ]

    async def sa_counters(self) -> list[m.SaCounters]:
        return [m.SaCounters.of(info) for info in await self.list_sas()]


@dataclass
class Bridge:
    url: str
    address: str
    manager: TunnelManager
    store: StateStore
    kernel: KernelDump
    vf_path: Path


def _generation(number: int, spi_in: int, spi_out: int, offload: OffloadStatus) -> Generation:
    now = dt.datetime.now(dt.UTC)
    return Generation(number, 0x7A000001, spi_in, spi_out, 16, offload, now, time.monotonic() - 75, now, 0.01)


@pytest.fixture
async def bridge(tmp_path: Path) -> AsyncIterator[Bridge]:
    store = await load_view(write_mesh(tmp_path / "mesh"))
    vf_path = tmp_path / "vf-map.yaml"
    vf_path.write_text("- {vf: 3, pod: shop/a1, ip: 10.1.0.10, netdev: pf0vf3}\n- {vf: 7, pod: shop/gone}\n")
    vf_map = VfMapFile(vf_path, poll_interval=0.01)
    await vf_map.load_initial()
    vf_map.subscribe(lambda vfs: store.set_vf_map("node-a", vfs))
    kernel = KernelDump()
    registry = Registry()
    sa = SaManager(kernel, SaSettings(mesh_cidrs=store.settings.mesh_cidrs))  # type: ignore[arg-type]
    token = tmp_path / "token"
    token.write_text("unused")
    ca = CAClient(CAClientOptions(address="127.0.0.1:9", plaintext=True, token_file=token))  # never called
    certs = Certificates(SecretManager(ca, RotationPolicy(), credential_identity=store.settings.bridge_identity))
    settings = BridgeSettings(node="node-a")
    manager = TunnelManager(settings, store, sa, certs, Netns(None), BridgeMetrics(registry))
    specs, _ = desired_specs(store.view, "node-a", settings.scope, None)
    for key, spec in specs.items():
        manager.tunnels[key] = Tunnel(spec, time.monotonic())
    # a1<->b1 up (the kernel ran its crypto offload in software), a1<->b2 failing; a2 has no VF: no tunnel
    up = manager.tunnels[A1B1]
    up.current = _generation(2, 0xA001, 0xB001, OffloadStatus.FALLBACK)
    up.next_rekey = time.monotonic() + 3500
    manager.tunnels[A1B2].last_error = "dataplane: NEWSA esp ... failed: Invalid argument (EINVAL)"
    kernel.sas[(NODE_B, NODE_A, 0xA001)] = (2048, 20)  # inbound
    kernel.sas[(NODE_A, NODE_B, 0xB001)] = (3 << 20, 2200)  # outbound
    manager.metrics.rekeys.inc(role="initiator", trigger=rekey_trigger("requested", "", True))
    manager.metrics.rekeys.inc(role="initiator", trigger=rekey_trigger("soft limit", "packets", True))
    manager.metrics.handshakes.inc(role="initiator", result="ok")
    manager.metrics.handshakes.inc(role="responder", result="dataplane")
    probe = OffloadProbe("crypto", "eth0", OffloadStatus.FALLBACK)
    admin = Admin(manager, store, Netns(None), registry, vf_map=vf_map, offload=probe)
    server = TestServer(admin.app(), host="127.0.0.1")
    await server.start_server()
    task = asyncio.create_task(vf_map.run())
    try:
        address = f"127.0.0.1:{server.port}"
        yield Bridge(f"http://{address}", address, manager, store, kernel, vf_path)
    finally:
        task.cancel()
        await server.close()
        await ca.close()


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def test_metrics_names_and_labels(bridge: Bridge) -> None:
    text = await _get(bridge.url + "/metrics")
    got = samples(text)
    expected = {
        'zt_bridge_tunnels{state="up"}': 1,
        'zt_bridge_tunnels{state="failing"}': 1,
        'zt_bridge_tunnels{state="pending"}': 0,
        'zt_bridge_tunnel_offload{offload="fallback"}': 1,
        'zt_bridge_tunnel_offload{offload="crypto"}': 0,
        'zt_bridge_tunnel_offload{offload="packet"}': 0,
        'zt_bridge_tunnel_offload{offload="none"}': 0,
        'zt_bridge_offload_usable{device="eth0",mode="crypto"}': 1,
        'zt_bridge_rekeys_total{role="initiator",trigger="demand"}': 1,
        'zt_bridge_rekeys_total{role="initiator",trigger="packets"}': 1,
        'zt_bridge_handshakes_total{result="ok",role="initiator"}': 1,
        'zt_bridge_handshakes_total{result="dataplane",role="responder"}': 1,
        "zt_bridge_sas": 2,
        'zt_bridge_sa_bytes{direction="in"}': 2048,
        'zt_bridge_sa_bytes{direction="out"}': 3 << 20,
        'zt_bridge_sa_packets{direction="in"}': 20,
        'zt_bridge_sa_packets{direction="out"}': 2200,
        'zt_bridge_vf_pods{pod="shop/a1",vf="3"}': 1,
        'zt_bridge_vf_sa_bytes{direction="in",vf="3"}': 2048,
        'zt_bridge_vf_sa_packets{direction="out",vf="3"}': 2200,
        "zt_bridge_vf_refused_pods": 1,
        "zt_bridge_vf_map_entries": 2,
        "zt_bridge_vf_map_errors_total": 0,
        "zt_bridge_offload_fallback_total": 0,
    }
    assert {k: got.get(k) for k in expected} == expected
    for name in ("zt_bridge_tunnel_removals_total", "zt_bridge_rekey_requests_total", "zt_bridge_xfrm_stat",
                 "zt_bridge_handshake_duration_seconds", "zt_bridge_removal_duration_seconds"):  # fmt: skip
        assert f"# TYPE {name} " in text, name
    assert "# TYPE zt_bridge_rekeys_total counter" in text


async def test_vf_series_follow_the_map_and_a_bad_file_is_counted(bridge: Bridge) -> None:
    # a2 gets VF 5, a1 moves to VF 4: the VF 3 series go away rather than linger
    # (whole files: the map is polled every 10 ms, and a read between an in-place write's truncate and its write is
    # counted as an error, "the file is empty", which the count below would see)
    write_atomic(bridge.vf_path, b"- {vf: 4, pod: shop/a1}\n- {vf: 5, ip: 10.1.0.11}\n")
    async with asyncio.timeout(5):
        while True:
            if bridge.store.view.pod(ip_address("10.1.0.11")) is not None:
                break
            await asyncio.sleep(0.01)
    got = samples(await _get(bridge.url + "/metrics"))
    vf_series = sorted(k for k in got if k.startswith("zt_bridge_vf_pods"))
    assert vf_series == ['zt_bridge_vf_pods{pod="shop/a1",vf="4"}', 'zt_bridge_vf_pods{pod="shop/a2",vf="5"}']
    assert got['zt_bridge_vf_sa_packets{direction="out",vf="4"}'] == 2200 and 'vf="3"' not in str(got)
    assert got["zt_bridge_vf_refused_pods"] == 0
    write_atomic(bridge.vf_path, b"- {vf: 4, pod: shop/a1\n")
    async with asyncio.timeout(5):
        while True:
            dump = await _get(bridge.url + "/config_dump")
            if '"last_error": "not YAML' in dump:
                break
            await asyncio.sleep(0.01)
    assert samples(await _get(bridge.url + "/metrics"))["zt_bridge_vf_map_errors_total"] == 1
    assert bridge.store.view.pod(ip_address("10.1.0.11")) is not None  # the last good map stays


async def test_config_dump_shows_vf_offload_and_refused_pods(bridge: Bridge) -> None:
    async with aiohttp.ClientSession() as http, http.get(bridge.url + "/config_dump") as resp:
        dump = await resp.json()
    rows = {r["key"]: r for r in dump["tunnels"]}
    assert rows["pod/10.1.0.10/10.2.0.10"]["vf"] == 3 and rows["pod/10.1.0.10/10.2.0.10"]["offload"] == "fallback"
    assert "pod/10.1.0.11/10.2.0.11" not in rows
    assert dump["state"]["vf"]["refused"] == [
        {"pod": "shop/a2", "ip": "10.1.0.11", "reason": "no VF in the VF map names this pod"}
    ]
    assert dump["state"]["vf"]["unused"] == [{"vf": 7, "pod": "shop/gone", "ip": None, "netdev": None}]
    assert dump["offload"] == {"mode": "crypto", "device": "eth0", "usable": True, "probe": "fallback", "error": ""}
    assert dump["vf_map"]["entries"] == 2 and dump["vf_map"]["last_error"] == ""


async def test_a_kernel_that_cannot_be_read_still_gives_metrics(bridge: Bridge) -> None:
    bridge.kernel.fail = True
    got = samples(await _get(bridge.url + "/metrics"))
    assert got["zt_bridge_sas"] == 0 and got['zt_bridge_tunnels{state="up"}'] == 1


async def test_ztctl_tunnels_shows_the_vf_column_and_the_refused_pod(
    bridge: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await asyncio.to_thread(cli.main, ["tunnels", "--bridge", bridge.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    assert header.index("OFFLOAD") < header.index("VF") < header.index("NEXT REKEY")
    vf_at = header.index("VF")
    up = next(line for line in lines if "0x0000a001" in line)
    assert up[vf_at:].split()[0] == "3" and " fallback " in up and "2.0KiB/3.0MiB" in up and "58m" in up
    failing = next(line for line in lines if "failing" in line)
    assert "EINVAL" in failing
    assert lines[-1] == "node-a: no tunnels for shop/a2 (10.1.0.11): no VF in the VF map names this pod"


async def test_ztctl_tunnels_rekey_and_the_deprecated_flag(bridge: Bridge, capsys: pytest.CaptureFixture[str]) -> None:
    run = lambda *argv: asyncio.to_thread(cli.main, list(argv))  # noqa: E731
    assert await run("tunnels", "rekey", "--bridge", bridge.address, "--peer", "10.2.0.10") == 0
    assert capsys.readouterr().out == "node-a: 1 tunnel(s) rekeying\n"
    assert bridge.manager.tunnels[A1B1].rekey_reason == "requested"
    assert bridge.manager.tunnels[A1B2].rekey_reason == ""
    # options before the subcommand count too; --local picks by pod name
    assert await run("tunnels", "--bridge", bridge.address, "rekey", "--local", "shop/a1") == 0
    assert capsys.readouterr().out == "node-a: 2 tunnel(s) rekeying\n"
    assert await run("tunnels", "--bridge", bridge.address, "--rekey", "--peer", "payments/b1") == 0
    done = capsys.readouterr()
    assert done.out == "node-a: 1 tunnel(s) rekeying\n"
    assert done.err == "ztctl tunnels: --rekey is deprecated, use `ztctl tunnels rekey`\n"
    assert await run("tunnels", "rekey", "--bridge", bridge.address, "--node", "node-z") == 1
    assert capsys.readouterr().err == (
        "ztctl tunnels rekey: no bridge of node 'node-z' among the given ones (they are: node-a)\n"
    )
    assert await run("tunnels", "--bridge", bridge.address, "--peer", "x") == 1
    assert "use `ztctl tunnels rekey --peer/--local`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("reason", "limit", "initiator", "trigger"),
    [
        ("interval", "", True, "time"),
        ("soft limit", "bytes", True, "bytes"),
        ("soft limit", "packets", True, "packets"),
        ("hard limit", "packets", True, "packets"),
        ("certificate renewal", "", True, "renewal"),
        ("certificate renewal", "", False, "renewal"),  # the responder's own renewal, keyed by its initiator
        ("requested", "", True, "demand"),
        ("requested", "", False, "demand"),
        ("peer request", "", True, "peer"),
        ("", "", False, "peer"),  # the responder rekeyed because its initiator did
    ],
)
def test_rekey_triggers(reason: str, limit: str, initiator: bool, trigger: str) -> None:
    assert rekey_trigger(reason, limit, initiator) == trigger


def test_offloaded_sas_never_carry_an_if_id() -> None:
    # offload and XFRM interfaces are incompatible (the kernel rejects if_id with offload since 6.15)
    for mode in ("crypto", "packet"):
        sa = SaManager(None, SaSettings(mesh_cidrs=(), offload_mode=mode, offload_ifindex=4))  # type: ignore[arg-type]
        from ipsec_bridge.sa_manager import Endpoints, host_net

        ends = Endpoints(NODE_A, NODE_B, host_net(ip_address("10.1.0.10")), host_net(ip_address("10.2.0.10")))
        for built in (sa.outbound_sa(ends, 1, m.Aead(bytes(16), bytes(4)), 1),
                      sa.inbound_sa(ends, 2, m.Aead(bytes(16), bytes(4)), 1)):  # fmt: skip
            assert built.offload is not None and built.if_id == 0


def test_offload_probe_lines() -> None:
    refused = OffloadProbe("packet", "eth0", None, "NEWSA ... failed: Invalid argument (EINVAL): Unrecognized flags")
    assert not refused.usable
    assert refused.describe() == (
        "--offload packet on eth0: the kernel refuses it: NEWSA ... failed: Invalid argument (EINVAL): Unrecognized "
        "flags; tunnels stay down (no software fallback) and mesh traffic stays blocked"
    )
    assert OffloadProbe("crypto", "eth0", OffloadStatus.FALLBACK).describe() == (
        "--offload crypto on eth0: the kernel accepts it but runs the SAs in software"
    )
    assert OffloadProbe("packet", "p0", OffloadStatus.PACKET).usable


async def test_config_dump_shows_a_tunnels_last_eight_generations(bridge: Bridge) -> None:
    t = bridge.manager.tunnels[("pod", "10.1.0.10", "10.2.0.10")]
    at = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    for n in range(1, 11):
        t.record(n, f"reason {n}", at + dt.timedelta(seconds=n))
    async with aiohttp.ClientSession() as http, http.get(bridge.url + "/config_dump") as resp:
        rows = {r["key"]: r for r in (await resp.json())["tunnels"]}
    history = rows["pod/10.1.0.10/10.2.0.10"]["history"]
    assert [h["generation"] for h in history] == list(range(3, 11))
    assert history[-1] == {"generation": 10, "reason": "reason 10", "at": "2030-01-01T00:00:10+00:00"}


@pytest.mark.parametrize("size", [1, 64, 64 * 1024])
def test_the_streamed_config_dump_is_byte_for_byte_what_json_dumps_writes(size: int) -> None:
    rows = [{"key": f"pod/10.1.0.{i}/10.2.0.1", "history": [{"n": 1, "at": None}], "retiring_spis": [], "x": "a\nb"}
            for i in range(50)]  # fmt: skip
    doc: dict[str, Any] = {"node": "node-a", "tunnels": iter(rows), "refused_pairs": iter([]), "errors": {}}
    expected = json.dumps({**doc, "tunnels": rows, "refused_pairs": []}, indent=2).encode()
    chunks = list(json_chunks(doc, size=size))
    assert b"".join(chunks) == expected
    assert len(chunks) > 1 if size < 1024 else len(chunks) == 1
    assert b"".join(json_chunks({})) == b"{}"
