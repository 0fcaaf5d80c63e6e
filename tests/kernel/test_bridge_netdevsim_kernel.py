"""zt-bridge's offload path against a real offload driver: netdevsim, built into the project's UML kernel.

One UML boot, the topology, mesh and guest helpers test_bridge_kernel.py uses too (tests/kernel/bridge_guest.py), plus
one netdevsim port `nsim0` in node-a's netns (192.168.60.1/24, beside the veth underlay eth0):

1. node-a's bridge asks for packet offload on nsim0: refused by the kernel with its reason, one log line, every
   tunnel failing, nothing keyed, nothing in netdevsim's SA table.
2. node-a's bridge restarts with crypto offload on nsim0 and a VF map (a1 VF 0, a2 VF 1): netdevsim takes
   every SA of node-a's tunnels (its debugfs table lists exactly their SPIs and directions; `ip -s xfrm state`
   shows "crypto offload parameters: dev nsim0"); `ztctl tunnels` says `crypto`, not `fallback`. netdevsim
   offloads no ESN SAs ("Device doesn't support offload with ESN"), so the bridge keys them with 32-bit
   sequence numbers, which the SAs' hard packet limit (below 2^32) ends before they could wrap.
3. Pod traffic over the veth: the kernel hands a packet to the offload device only when the route's device is
   that device (xfrm_dev_offload_ok), so these packets are encrypted in software and cross as ESP; the
   SA and per-VF counters move, netdevsim's tx counter does not.
4. node-b's address routed through nsim0 for five pings: now the offloaded SA's packets go to netdevsim.

What netdevsim (Linux 6.1) does with the packets of an offloaded SA, as this test observes it: the stack builds
the ESP packet but leaves the payload in clear and the ICV zero (the "hardware" would encrypt);
netdevsim's transmit checks that the packet's SA is one of its table's (nsim_ipsec_tx), counts it (`tx=` in
debugfs) and frees the packet. Nothing is encrypted and nothing leaves: the pings get no answer, and a capture
on nsim0 sees the ESP header followed by the ping payload in clear. netdevsim proves the offload *control* path
(what the bridge asks, what a driver accepts, what the kernel reports back), not an encrypted data path; that
needs a DPU.

Run as a script, this file is the guest program (prints `RESULT <json>`; key material never leaves the guest:
netdevsim's debugfs lists SA keys, and only SPIs, directions and counters are reported).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

from tests.kernel.bridge_guest import (  # noqa: E402
    A1,
    A2,
    ADMIN,
    B1,
    B2,
    NODE_B,
    Guest,
    ping,
    run_guest,
    sh,
    wire,
    xfrm_stat,
)
from tests.kernel.guestlib import Capture, counters_moved  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NSIM_ADDRESS = "192.168.60.1/24"
NODE_A_PAIRS = {f"{A1}-{B1}", f"{A1}-{B2}", f"{A2}-{B2}"}  # the admitted pairs with a node-a end


# ================================================================================================================
# host side


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    return run_guest("pod", Path(__file__).resolve())


def test_packet_offload_is_refused_by_netdevsim_loudly_and_nothing_is_keyed(facts: dict[str, Any]) -> None:
    f = facts["packet"]
    assert len(f["probe_log"]) == 1, f["probe_log"]
    line = f["probe_log"][0]
    assert "--offload packet on nsim0: the kernel refuses it: NEWSA" in line
    assert "Unrecognized flags in offload request" in line and "no software fallback" in line
    assert set(f["states_a"].values()) == {"failing"} and set(f["states_a"]) == NODE_A_PAIRS, f["states_a"]
    assert f["keyed_sas_a"] == 0
    assert f["nsim"] == {"count": 0, "tx": 0, "sas": {}}  # the driver never saw an SA
    assert f["metrics_a"]['zt_bridge_offload_usable{device="nsim0",mode="packet"}'] == 0
    assert "node-a: offload packet on nsim0 refused by the kernel" in f["ztctl_a"]


def test_netdevsim_takes_every_sa_of_the_bridges_tunnels_as_crypto_offload(facts: dict[str, Any]) -> None:
    f = facts["crypto"]
    # one line at start: accepted, without ESN (netdevsim has no ESN offload)
    assert len(f["probe_log"]) == 1, f["probe_log"]
    assert "--offload crypto on nsim0: the device takes the SAs (crypto offload) without ESN" in f["probe_log"][0]
    assert f["dump_offload"] == {"mode": "crypto", "device": "nsim0", "usable": True, "probe": "crypto", "error": ""}
    # every tunnel of node-a is up with its SAs offloaded, as the kernel reports them back
    assert f["offloads_a"] == dict.fromkeys(NODE_A_PAIRS, "crypto"), f["offloads_a"]
    sas = f["kernel_sas_a"]  # SPI -> what `ip -s xfrm state` says about that SA of ours
    assert set(sas) == {spi for pair in f["spis"].values() for spi in pair.values()}, sas
    for spi, sa in sas.items():
        assert sa["offload"] == {"dev": "nsim0", "dir": sa["direction"]}, (spi, sa)
        assert sa["esn"] is False and sa["hard_packets"] < 1 << 32, (spi, sa)
    # ESN is negotiated per tunnel: node-b (no offload, ESN-capable) keys its side of these tunnels without it too
    assert set(f["esn"]["a"].values()) == set(f["esn"]["b"].values()) == {False}, f["esn"]
    peer = f["kernel_sas_b"]
    assert len(peer) == len(sas) and all(sa["esn"] is False and sa["offload"] is None for sa in peer.values()), peer
    # ... and netdevsim's own table lists exactly those SAs, outbound ones as tx, inbound ones as rx
    nsim = f["nsim"]
    assert nsim["count"] == len(sas)
    assert nsim["sas"] == {spi: ("tx" if sa["direction"] == "out" else "rx") for spi, sa in sas.items()}
    # ztctl: crypto, not fallback; the metrics agree
    rows = [line for line in f["ztctl_a"].splitlines()[1:] if line.startswith("node-a ")]
    assert len(rows) == 3 and all(" crypto " in line and " fallback " not in line for line in rows), rows
    metrics = f["metrics_a"]
    assert metrics['zt_bridge_tunnel_offload{offload="crypto"}'] == 3
    assert metrics['zt_bridge_tunnel_offload{offload="fallback"}'] == 0
    assert metrics['zt_bridge_offload_usable{device="nsim0",mode="crypto"}'] == 1
    assert metrics.get("zt_bridge_offload_fallback_total", 0) == 0


def test_traffic_on_another_device_is_encrypted_in_software_and_counted_per_vf(facts: dict[str, Any]) -> None:
    f = facts["veth"]
    assert f["ping"] == [10, 10]
    w = f["wire"]
    assert w["esp"] >= 10 and w["mesh_plaintext"] == 0 and w["pattern_frames"] == 0, w
    assert f["nsim_tx_delta"] == 0  # the device was never asked to transmit: the route goes out eth0
    # both ends agree on the SAs' sequence number format: every packet authenticated, none refused
    assert f["xfrm_errors"] == {"nodeA": {}, "nodeB": {}}, f["xfrm_errors"]
    # per-VF counters (a1 is VF 0) moved by the pings, both ways
    assert f["vf0_packets"]["out"] >= 10 and f["vf0_packets"]["in"] >= 10, f["vf0_packets"]


def test_routed_through_netdevsim_the_offloaded_sa_hands_its_packets_to_the_driver(facts: dict[str, Any]) -> None:
    f = facts["steered"]
    spi_out = facts["crypto"]["spis"][f"{A1}-{B1}"]["spi_out"]
    assert f["ping"] == [5, 0]  # netdevsim drops what it transmits
    assert f["nsim_tx_delta"] == 5  # ... after checking each packet's SA against its table
    assert f["sa_out_packets_delta"] == 5  # the SA (and the pod's VF) counted them
    assert f["vf0_out_delta"] == 5
    w = f["wire_nsim"]
    assert w["esp_by_spi"] == {spi_out: 5}, w
    # what netdevsim got is ESP framing around the payload in clear: the device, not the kernel, would encrypt
    assert w["pattern_frames"] == 5
    assert f["nothing_on_the_underlay"] == {"esp": 0, "pattern_frames": 0}
    assert f["ping_after"] == [5, 5]  # route removed: the software path carries the traffic again


# ================================================================================================================
# guest side (runs inside UML as root)


def parse_nsim_ipsec(text: str) -> dict[str, Any]:
    """netdevsim's debugfs `ipsec` file, without the key lines: SA count, tx counter, SPI -> tx|rx."""
    head = re.match(r"SA count=(\d+) tx=(\d+)", text)
    assert head, text[:200]
    sas, direction = {}, {}
    for line in text.splitlines():
        if found := re.match(r"sa\[(\d+)\] ([tr])x ipaddr=", line):
            direction[found.group(1)] = f"{found.group(2)}x"
        elif found := re.match(r"sa\[(\d+)\]\s+spi=(0x[0-9a-f]+) ", line):
            sas[found.group(2)] = direction[found.group(1)]
    return {"count": int(head.group(1)), "tx": int(head.group(2)), "sas": sas}


def parse_offloaded_sas(text: str, spis: set[str]) -> dict[str, dict[str, Any]]:
    """`ip -s xfrm state` for the SAs with the given SPIs: direction (by source), offload, ESN, hard packets."""
    out: dict[str, dict[str, Any]] = {}
    for block in re.split(r"\n(?=src )", text):
        found = re.search(r"proto esp spi (0x[0-9a-f]+)", block)
        if not found or found.group(1) not in spis:
            continue
        offload = re.search(r"crypto offload parameters: dev (\S+) dir (\S+)", block)
        hard = re.search(r"limit: soft \S+\(packets\), hard (\d+)\(packets\)", block)
        flags = re.search(r"flag (.*)\(0x", block)
        out[found.group(1)] = {
            "offload": {"dev": offload.group(1), "dir": offload.group(2)} if offload else None,
            "esn": bool(flags and "esn" in flags.group(1).split()),
            "hard_packets": int(hard.group(1)) if hard else None,
        }
    return out


class NetdevsimGuest(Guest):
    async def nsim(self) -> dict[str, Any]:
        text = await asyncio.to_thread(Path(self.debugfs).read_text)
        return parse_nsim_ipsec(text)

    async def add_netdevsim(self) -> None:
        """One netdevsim device with one port, moved into node-a as nsim0."""
        # the write probes the device and creates its port before it returns
        await asyncio.to_thread(Path("/sys/bus/netdevsim/new_device").write_text, "1 1")
        names = await asyncio.to_thread(os.listdir, "/sys/bus/netdevsim/devices/netdevsim1/net")
        if len(names) != 1:
            raise RuntimeError(f"netdevsim1 has ports {names}, not one")
        await sh("ip", "link", "set", names[0], "name", "nsim0")
        await sh("ip", "link", "set", "nsim0", "netns", "nodeA")
        await sh("ip", "-n", "nodeA", "addr", "add", NSIM_ADDRESS, "dev", "nsim0")
        await sh("ip", "-n", "nodeA", "link", "set", "nsim0", "up")
        self.debugfs = "/sys/kernel/debug/netdevsim/netdevsim1/ports/0/ipsec"

    def ztctl(self) -> list[str]:
        return [sys.executable, "-m", "ztctl", "tunnels", "--bridge", f"127.0.0.1:{ADMIN['a']}",
                "--bridge", f"127.0.0.1:{ADMIN['b']}"]  # fmt: skip

    async def story(self) -> None:
        f = self.facts
        await self.add_netdevsim()
        vf_map = Path("/run/vf-map.yaml")
        vf_text = f"- {{vf: 0, pod: shop/a1, ip: {A1}}}\n- {{vf: 1, pod: shop/a2, ip: {A2}}}\n"
        await asyncio.to_thread(vf_map.write_text, vf_text)
        node_a = ("--vf-map", str(vf_map), "--offload-dev", "nsim0")

        # 1. packet offload: refused before the driver sees anything
        await asyncio.gather(
            self.start_bridge("a", "node-a", "nodeA", *node_a, "--offload", "packet"),
            self.start_bridge("b", "node-b", "nodeB"),
        )
        rows_a = await self.wait_rows("a", lambda r: len(r) == 3 and all(x["state"] == "failing" for x in r.values()))
        log_a = await asyncio.to_thread(Path("/run/bridge-a.log").read_text)
        f["packet"] = {
            "probe_log": [line for line in log_a.splitlines() if "--offload packet on nsim0" in line],
            "states_a": {k: r["state"] for k, r in rows_a.items()},
            "keyed_sas_a": len(await self.keyed_sas("nodeA")),
            "nsim": await self.nsim(),
            "metrics_a": await self.raw_metrics("a"),
            "ztctl_a": await sh(*self.ztctl(), "--node", "node-a"),
        }

        # 2. crypto offload: netdevsim takes the SAs
        self.procs["a"].send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.procs["a"].wait(), 20)
        await self.start_bridge("a", "node-a", "nodeA", *node_a, "--offload", "crypto")
        await sh(*self.ztctl(), "rekey", "--node", "node-b")  # skip node-b's retry backoff from the failing phase
        for name in ("a", "b"):
            await self.wait_rows(name, lambda r: len(r) == 3 and all(x["state"] == "up" for x in r.values()), 60)
        async with asyncio.timeout(20):  # the rekey's old generations go after the 1 s grace
            while True:
                if sum([len(await self.keyed_sas(n)) for n in ("nodeA", "nodeB")]) == 12:
                    break
                await asyncio.sleep(0.1)
        rows_a = await self.rows("a")
        rows_b = await self.rows("b")
        spis = {k: {"spi_in": r["spi_in"], "spi_out": r["spi_out"]} for k, r in rows_a.items()}
        ours = {f"0x{i.sa.spi:08x}": i for i in await self.keyed_sas("nodeA")}
        ip_text = await sh("ip", "-n", "nodeA", "-s", "xfrm", "state")
        kernel_sas = parse_offloaded_sas(ip_text, set(ours))
        for spi, sa in kernel_sas.items():
            sa["direction"] = "in" if str(ours[spi].sa.dst) == "192.168.50.1" else "out"
        peer_spis = {r[k] for r in rows_b.values() for k in ("spi_in", "spi_out")}
        peer_sas = parse_offloaded_sas(await sh("ip", "-n", "nodeB", "-s", "xfrm", "state"), peer_spis)
        log_a = await asyncio.to_thread(Path("/run/bridge-a.log").read_text)
        f["crypto"] = {
            "probe_log": [line for line in log_a.splitlines() if "--offload crypto on nsim0" in line],
            "dump_offload": (await self.dump("a"))["offload"],
            "offloads_a": {k: r["offload"] for k, r in rows_a.items()},
            "spis": spis,
            "esn": {"a": {k: r["esn"] for k, r in rows_a.items()}, "b": {k: r["esn"] for k, r in rows_b.items()}},
            "kernel_sas_a": kernel_sas,
            "kernel_sas_b": peer_sas,
            "nsim": await self.nsim(),
            "ztctl_a": await sh(*self.ztctl(), "--node", "node-a"),
            "metrics_a": await self.raw_metrics("a"),
        }

        # 3. traffic over the veth underlay: software ESP, counted per VF, the device not involved
        before_vf = await self.vf_packets("0")
        tx0 = (await self.nsim())["tx"]
        cap = Capture("nodeA", "eth0", "/run/veth.pcap")
        await cap.start()
        stat0 = {n: await xfrm_stat(n) for n in ("nodeA", "nodeB")}
        veth_ping = await ping("a1", B1, 10, "0.05")
        stat1 = {n: await xfrm_stat(n) for n in ("nodeA", "nodeB")}
        after_vf = await self.vf_packets("0")
        f["veth"] = {
            "ping": veth_ping,
            "wire": await wire(cap),
            "nsim_tx_delta": (await self.nsim())["tx"] - tx0,
            "vf0_packets": {d: after_vf[d] - before_vf[d] for d in ("in", "out")},
            "xfrm_errors": {n: counters_moved(stat0[n], stat1[n]) for n in stat1},
        }

        # 4. node-b's address routed through nsim0: the offloaded SA's packets go to the driver
        spi_out = int(spis[f"{A1}-{B1}"]["spi_out"], 16)
        packets0 = await self.sa_packets("nodeA", spi_out)
        vf0 = await self.vf_packets("0")
        tx0 = (await self.nsim())["tx"]
        caps = {"nsim": Capture("nodeA", "nsim0", "/run/nsim.pcap"), "veth": Capture("nodeA", "eth0", "/run/v2.pcap")}
        for c in caps.values():
            await c.start()
        await sh("ip", "-n", "nodeA", "route", "add", f"{NODE_B}/32", "dev", "nsim0")
        steered = await ping("a1", B1, 5, "0.2")
        await sh("ip", "-n", "nodeA", "route", "del", f"{NODE_B}/32", "dev", "nsim0")
        wires = {n: await wire(c) for n, c in caps.items()}
        f["steered"] = {
            "ping": steered,
            "nsim_tx_delta": (await self.nsim())["tx"] - tx0,
            "sa_out_packets_delta": await self.sa_packets("nodeA", spi_out) - packets0,
            "vf0_out_delta": (await self.vf_packets("0"))["out"] - vf0["out"],
            "wire_nsim": wires["nsim"],
            "nothing_on_the_underlay": {k: wires["veth"][k] for k in ("esp", "pattern_frames")},
            "ping_after": await ping("a1", B1, 5, "0.2"),
        }

    async def keyed_sas(self, netns: str) -> list[Any]:
        return [i for i in await self.our_sas(netns) if i.sa.aead is not None]

    async def vf_packets(self, vf: str) -> dict[str, float]:
        metrics = await self.raw_metrics("a")
        return {d: metrics.get(f'zt_bridge_vf_sa_packets{{direction="{d}",vf="{vf}"}}', 0.0) for d in ("in", "out")}

    async def sa_packets(self, netns: str, spi: int) -> int:
        return sum(i.current.packets for i in await self.our_sas(netns) if i.sa.spi == spi)


def guest_main() -> None:
    os.environ.setdefault("TMPDIR", "/run")
    started = time.monotonic()
    facts = asyncio.run(NetdevsimGuest().run("pod"))
    facts["seconds"] = round(time.monotonic() - started, 1)
    for log in sorted(Path("/run").glob("bridge-*.log")):
        print(f"--- {log.name} (tail)", file=sys.stderr)
        print(log.read_text()[-3000:], file=sys.stderr)
    print("RESULT " + json.dumps(facts, default=str))


if __name__ == "__main__":
    guest_main()
