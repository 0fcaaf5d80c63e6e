"""zt-bridge on a real Linux 6.1 kernel with ESP (user-mode-linux): identity-bound pod-pair tunnels end to end.

One UML boot runs the whole story; this file is both the pytest module (host side: judge the facts) and,
run as a script, the guest program (inside UML: build the topology, run ztd and two zt-bridge processes,
drive traffic, gather facts, print `RESULT <json>`; key material never leaves the guest).

    node-a (netns nodeA) 192.168.50.1 =eth0= 192.168.50.2 node-b (netns nodeB)
      a1 shop/frontend 10.1.0.10            b1 payments/ledger 10.2.0.10
      a2 shop/debug    10.1.0.11            b2 shop/cart       10.2.0.11

ztd runs in the guest (CA + Delta ADS from tests/support/bridge_mesh.py's YAML); each zt-bridge is its own
process (`python -m ipsec_bridge.main`) in the root netns with `--netns nodeX` for its XFRM state and
handshake sockets, learning workloads and policies over ADS on ztd's TLS port with a node-bound token, and
getting its pods' certificates by impersonation. node-b's bridge asks for crypto offload on its veth (which
has none) to show the visible fallback. Policy: {a2,b1} is refused both ways; the other three pairs are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
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
    HANDSHAKE_PORT,
    NODE_A,
    NODE_B,
    PATTERN,
    Guest,
    ns,
    ping,
    run_guest,
    sh,
    wire,
    xfrm_stat,
)
from tests.kernel.guestlib import Capture  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NODE_CERT_TTL = 20  # seconds: the node-scope story waits for a renewal, then for an expiry


# ================================================================================================================
# host side


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    return run_guest("pod", Path(__file__).resolve())


@pytest.fixture(scope="module")
def node_facts() -> dict[str, Any]:
    return run_guest("node", Path(__file__).resolve())


@pytest.fixture(scope="module")
def offload_facts() -> dict[str, Any]:
    return run_guest("offload", Path(__file__).resolve())


def test_before_any_sa_mesh_traffic_is_blocked_and_nothing_leaves_in_clear(facts: dict[str, Any]) -> None:
    before = facts["before"]
    assert before["ping"] == [3, 0]
    assert before["polblock"] >= 3  # dropped by the bridge's block policy, not lost elsewhere
    assert before["wire"]["mesh_plaintext"] == 0 and before["wire"]["esp"] == 0
    assert before["wire"]["pattern_frames"] == 0


def test_tunnels_come_up_for_exactly_the_admitted_pairs(facts: dict[str, Any]) -> None:
    up = facts["tunnels_up"]
    assert up["a"] == {
        f"{A1}-{B1}": "initiator",
        f"{A1}-{B2}": "responder",
        f"{A2}-{B2}": "responder",
    }
    assert up["b"] == {
        f"{B1}-{A1}": "responder",
        f"{B2}-{A1}": "initiator",
        f"{B2}-{A2}": "initiator",
    }
    refused = facts["refused"]["a"]
    assert [(r["local_ip"], r["peer_ip"]) for r in refused] == [(A2, B1)]
    assert "deny-debug" in refused[0]["outbound"]
    # identities on both ends are the pods' own, as WDS says
    row = facts["rows"]["a"][f"{A1}-{B1}"]
    assert row["local_identity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert row["peer_identity"] == "spiffe://cluster.local/ns/payments/sa/ledger"
    assert facts["setup_seconds"] < 30


def test_pod_traffic_crosses_the_underlay_only_as_esp(facts: dict[str, Any]) -> None:
    traffic = facts["traffic"]
    assert traffic["pings"] == {"a1->b1": [20, 20], "a1->b2": [10, 10], "a2->b2": [10, 10], "b2->a1": [10, 10]}
    assert traffic["tcp"] == "echoed 65548 bytes"
    for node in ("a", "b"):
        wire = traffic["wire"][node]
        assert wire["mesh_plaintext"] == 0, wire  # not one pod packet in clear on the underlay
        assert wire["pattern_frames"] == 0, wire  # neither the ping payload nor the TCP stream
        assert wire["other"] == 0, wire
        assert wire["esp"] >= 50 + 40, wire  # pings (+ replies) and the TCP stream, encrypted
    # the capture method does see the pattern before encryption: its absence above means something
    assert traffic["wire"]["pod_a1"]["pattern_frames"] >= 20
    # each tunnel's SPIs are the ones on the wire: a1->b1 leaves node-a under b1's inbound SPI, and back
    spis = facts["rows"]["a"][f"{A1}-{B1}"]
    by_spi_a, by_spi_b = traffic["wire"]["a"]["esp_by_spi"], traffic["wire"]["b"]["esp_by_spi"]
    assert by_spi_a[spis["spi_out"]] >= 20 + 40 and by_spi_b[spis["spi_in"]] >= 20 + 40
    assert facts["rows"]["b"][f"{B1}-{A1}"]["spi_in"] == spis["spi_out"]  # b1's inbound = a1's outbound


def test_the_refused_pair_gets_no_sa_and_no_packet_through(facts: dict[str, Any]) -> None:
    denied = facts["traffic"]["denied"]
    assert denied["ping"] == [5, 0]
    assert denied["polblock"] >= 5
    assert denied["sas_for_pair"] == 0


def test_a_pod_claiming_another_pods_address_gets_no_tunnel(facts: dict[str, Any]) -> None:
    spoof = facts["spoof"]
    # a handshake from node-a claiming a1's address but presenting a2's (valid) SVID
    assert spoof["error_code"] == "refused"
    assert spoof["error"] == (
        "the responder refused: identity: the initiator presented spiffe://cluster.local/ns/shop/sa/debug, "
        "but WDS says that address is spiffe://cluster.local/ns/shop/sa/frontend"
    )
    # the impostor keyed only its own inbound SA (from a session with the real b1, which it could verify) and took
    # it out at the refusal; node-b keyed nothing (above)
    assert spoof["rogue_installer_calls"] == ["propose", "install", "rollback"]
    assert spoof["sas_on_b_unchanged"]  # nor on the responder's
    assert spoof["b_identity_failures"] == 1
    # and in the data plane: a2 sending with a1's source address gets nothing through a1's tunnel
    assert spoof["dataplane_ping"] == [5, 0]
    assert spoof["a1_tunnel_packets_delta"] == 0


def test_crypto_offload_on_a_device_without_it_falls_back_visibly(facts: dict[str, Any]) -> None:
    assert {r["offload"] for r in facts["rows"]["b"].values()} == {"fallback"}
    assert {r["offload"] for r in facts["rows"]["a"].values()} == {"none"}
    assert facts["metrics"]["b"]["zt_bridge_offload_fallback_total"] >= 3


def test_rekey_under_a_ping_flood_loses_nothing(facts: dict[str, Any]) -> None:
    rekey = facts["rekey"]
    assert rekey["ping"][0] == 450 and rekey["ping"][1] == 450
    assert rekey["generation"] == {"a": 2, "b": 2}
    old, new = rekey["old"], rekey["new"]
    assert old["spi_out"] != new["spi_out"] and old["spi_in"] != new["spi_in"]
    # every new SA (both directions, on both nodes) carried >= 100 packets, and the old ones carried traffic too
    assert min(rekey["new_sa_packets"].values()) >= 100, rekey["new_sa_packets"]
    wire = rekey["wire_a"]
    assert wire[old["spi_out"]] >= 100 and wire[new["spi_out"]] >= 100
    assert rekey["old_sas_left"] == []  # removed after the grace period
    for node in ("a", "b"):
        stat = facts["metrics"][node]
        assert stat["XfrmInNoStates"] == 0 and stat["XfrmInStateProtoError"] == 0, stat
    assert facts["metrics"]["a"]["zt_bridge_rekeys_total"] >= 1
    # the rekey resumed the first handshake's TLS session (psk_dhe_ke): no signature on either node
    assert rekey["handshakes"] == {n: {"full": 0, "resumed": 1, "signatures": 0} for n in ("a", "b")}, rekey
    assert rekey["resumption"]["signatures_per_rekey"]["resumed"] == 0


def test_a_responder_can_ask_for_a_rekey(facts: dict[str, Any]) -> None:
    nudge = facts["nudge"]
    assert nudge["answer"] == "node-b: 1 tunnel(s) rekeying"
    assert nudge["generation_a"] == 3
    assert facts["metrics"]["a"]["rekey_requests_received"] >= 1


def test_ztctl_tunnels_shows_the_tunnels_of_a_node(facts: dict[str, Any]) -> None:
    lines = facts["ztctl"].splitlines()
    assert lines[0].split("  ")[0] == "NODE"
    for column in ("LOCAL IDENTITY", "PEER IDENTITY", "SPI IN", "SPI OUT", "AGE", "OFFLOAD", "NEXT REKEY"):
        assert column in lines[0]
    assert len(lines) == 5 and all(line.startswith("node-a ") for line in lines[1:4])
    # the pair policy refuses both ways is named under the table, with the policies that refuse it
    assert lines[4].startswith(f"node-a: no tunnel shop/a2 ({A2}) <-> payments/b1 ({B1}), policy refuses it out: ")
    assert "deny-debug" in lines[4] and "debug-allow-cart" in lines[4]
    by_pair = {line.split()[1] + line.split()[3]: line for line in lines[1:4]}
    row = by_pair["shop/a1payments/b1"]
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in row and "spiffe://cluster.local/ns/payments/sa/ledger" in row
    assert facts["rows_final"]["a"][f"{A1}-{B1}"]["spi_in"] in row and "none" in row
    assert "(peer)" in by_pair["shop/a2shop/b2"]  # node-b initiates that one: its next rekey is the peer's


def test_a_policy_change_and_a_deleted_workload_remove_their_tunnels_within_a_second(facts: dict[str, Any]) -> None:
    change = facts["change"]
    # from ztd's push reaching the bridges to both nodes' SAs gone (the bridges' own measurement)
    assert change["removal_max_seconds"] < 1.0
    # end to end from the file write, through ztd's folder poll (0.5 s) and ADS push
    assert change["gone_after_seconds"] < 2.0
    assert change["remaining"] == {"a": [f"{A1}-{B2}"], "b": [f"{B2}-{A1}"]}
    assert change["removed_before_the_change"] == {"a": [], "b": []}, change  # nothing went earlier in the story
    assert change["removed"] == {
        "a": [f"pod/{A1}/{B1}", f"pod/{A2}/{B2}"],
        "b": [f"pod/{B1}/{A1}", f"pod/{B2}/{A2}"],
    }, change["removal_reasons"]
    assert change["ping_denied"] == [5, 0]
    assert change["ping_still_allowed"] == [5, 5]
    assert change["leftover_sas"] == {"a": 0, "b": 0}


def test_node_scope_one_keyed_tunnel_carries_only_the_admitted_pod_pairs(node_facts: dict[str, Any]) -> None:
    f = node_facts
    assert f["tunnels"] == {"a": {f"{NODE_A}-{NODE_B}": "initiator"}, "b": {f"{NODE_B}-{NODE_A}": "responder"}}
    row = f["row_a"]
    assert row["local_identity"] == row["peer_identity"] == "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
    assert row["pairs"] == 3  # a1<->b1, a1<->b2, a2<->b2; a2<->b1 has no allow policy
    assert f["handshakes_before_renewal"] == {"a": 1, "b": 1}  # one handshake for the whole node pair
    assert f["pings"] == {"a1->b1": [10, 10], "a1->b2": [10, 10], "b2->a2": [10, 10], "a2->b1": [5, 0]}
    wire = f["wire_a"]
    assert wire["mesh_plaintext"] == 0 and wire["pattern_frames"] == 0 and wire["other"] == 0
    # every pod pair rides the node pair's one outbound SA (or its successor, if a renewal rekeyed meanwhile)
    assert set(wire["esp_by_spi"]) <= {row["spi_out"], f["spi_out_after_traffic"]}
    assert wire["esp"] == 30
    assert f["sas"] == {"a": 2, "b": 2}


def test_a_soft_packet_limit_rekeys_before_the_hard_one_without_loss(node_facts: dict[str, Any]) -> None:
    assert node_facts["soft_limit_ping"] == [120, 120]
    reasons = [h["reason"] for h in node_facts["history"]]
    assert reasons[0] == "new" and "soft limit" in reasons, reasons


def test_a_certificate_renewal_rekeys_and_an_expired_certificate_removes_the_tunnel(node_facts: dict[str, Any]) -> None:
    f = node_facts
    assert f["renewal"]["generation"] >= 2  # the certificates were renewed at half life -> rekey
    reasons = f["renewal"]["reasons"]
    assert "certificate renewal" in reasons["a"] + reasons["b"], reasons
    assert f["renewal"]["spi_out"] != f["row_a"]["spi_out"]
    expiry = f["expiry"]
    # ztd stopped: no renewal; each time a certificate behind the keys expired, the SAs went within ~1 s
    assert expiry["removals_after_expiry_s"] and all(0 <= s < 1.5 for s in expiry["removals_after_expiry_s"])
    assert expiry["final_state"] == "failing" and "expired at" in expiry["final_error"], expiry
    assert expiry["sas_left"] == {"a": 0, "b": 0}
    assert expiry["ping"] == [5, 0]
    assert expiry["polblock"] >= 5  # the block stayed: nothing in clear
    assert expiry["wire"]["mesh_plaintext"] == 0 and expiry["wire"]["esp"] == 0


def test_packet_offload_refused_by_the_kernel_keeps_tunnels_down_and_says_why(offload_facts: dict[str, Any]) -> None:
    f = offload_facts["packet"]
    # one line at start, with the kernel's own reason (Linux 6.1 has no packet mode)
    assert len(f["probe_log"]) == 1, f["probe_log"]
    assert "--offload packet on eth0: the kernel refuses it: NEWSA" in f["probe_log"][0]
    assert "Unrecognized flags in offload request" in f["probe_log"][0]
    assert "no software fallback" in f["probe_log"][0]
    assert f["dump_offload"]["usable"] is False and f["dump_offload"]["probe"] == "refused"
    # every tunnel of node-b is failing with that reason; none is up anywhere
    assert set(f["states_b"].values()) == {"failing"}, f["states_b"]
    for pair in (f"{B1}-{A1}", f"{B2}-{A1}"):
        assert "Unrecognized flags in offload request" in f["errors_b"][pair], f["errors_b"]
    # (a2 has no VF on node-a yet: node-a refuses that pair's handshake before any key)
    assert f["errors_b"][f"{B2}-{A2}"] == "refused: the responder refused: 10.1.0.11 is not a mesh pod of node node-a"
    assert set(f["states_a"].values()) == {"failing"}
    # nothing keyed in node-b's kernel, nothing through: the block stays, no software path
    assert f["keyed_sas_b"] == 0
    assert f["ping"] == [5, 0]
    assert f["wire"]["mesh_plaintext"] == 0 and f["wire"]["esp"] == 0 and f["wire"]["pattern_frames"] == 0
    metrics = f["metrics_b"]
    assert metrics['zt_bridge_offload_usable{device="eth0",mode="packet"}'] == 0
    assert metrics['zt_bridge_tunnels{state="failing"}'] == 3
    assert metrics['zt_bridge_handshakes_total{result="dataplane",role="initiator"}'] >= 1
    # ztctl tunnels shows the failing rows and the refusal
    rows_b = [line for line in f["ztctl_b"].splitlines() if line.startswith("node-b  ")]
    assert len(rows_b) == 3 and all(" failing " in line for line in rows_b)
    assert sum("dataplane: Invalid argument (EINVAL): Unrecognized flags" in line for line in rows_b) == 2, rows_b
    assert "node-b: offload packet on eth0 refused by the kernel: NEWSA" in f["ztctl_b"]


def test_crypto_offload_fallback_shows_in_ztctl_and_metrics(offload_facts: dict[str, Any]) -> None:
    f = offload_facts["crypto"]
    assert f["offloads_b"] == {f"{B1}-{A1}": "fallback", f"{B2}-{A1}": "fallback", f"{B2}-{A2}": "fallback"}
    lines = f["ztctl_b"].splitlines()
    assert "OFFLOAD" in lines[0]
    rows = [line for line in lines[1:] if line.startswith("node-b  ")]
    assert len(rows) == 3 and all(" fallback " in line for line in rows), lines
    assert [line for line in lines[1:] if line not in rows] == [
        line for line in lines if line.startswith(f"node-b: no tunnel payments/b1 ({B1}) <-> shop/a2 ({A2})")
    ]  # the one other line: the pair policy refuses
    metrics = f["metrics_b"]
    assert metrics['zt_bridge_tunnel_offload{offload="fallback"}'] == 3
    assert metrics['zt_bridge_tunnel_offload{offload="crypto"}'] == 0
    assert metrics['zt_bridge_offload_usable{device="eth0",mode="crypto"}'] == 1
    assert metrics["zt_bridge_offload_fallback_total"] >= 3
    assert f["ping"] == [10, 10]


def test_a_vf_map_decides_which_local_pods_get_tunnels(offload_facts: dict[str, Any]) -> None:
    f = offload_facts["vf"]
    # a1 has VF 3; a2 has none: a2's tunnel (to b2) does not exist on node-a, with the reason shown
    assert sorted(f["first"]["tunnels"]) == [f"{A1}-{B1}", f"{A1}-{B2}"]
    assert f["first"]["refused"] == [{"pod": "shop/a2", "ip": A2, "reason": "no VF in the VF map names this pod"}]
    assert f["first"]["vf_of"] == {f"{A1}-{B1}": 3, f"{A1}-{B2}": 3}
    # the file changes: a2 gets VF 5 -> its tunnel appears, within the poll interval plus a reconcile
    assert sorted(f["added"]["tunnels"]) == [f"{A1}-{B1}", f"{A1}-{B2}", f"{A2}-{B2}"]
    assert f["added"]["seconds"] < 3
    # a broken file: the last good map stays, the error is shown and counted
    assert f["broken"]["tunnels"] == f["added"]["tunnels"]
    assert f["broken"]["last_error"] == "entry 1: vf must be a VF index (an integer >= 0), got -1"
    assert f["broken"]["errors_metric"] == 1
    # two pods claim VF 3: neither gets a tunnel
    assert f["conflict"]["tunnels"] == []
    reasons = {r["pod"]: r["reason"] for r in f["conflict"]["refused"]}
    assert reasons == {
        "shop/a1": "VF 3 is claimed by 2 entries (shop/a1, shop/a2)",
        "shop/a2": "VF 3 is claimed by 2 entries (shop/a1, shop/a2)",
    }
    assert f["conflict"]["leftover_sas_a"] == 0
    assert "no tunnels for shop/a1 (10.1.0.10): VF 3 is claimed by 2 entries" in f["conflict"]["ztctl_a"]


def test_the_vf_column_metrics_and_rekey_triggers_of_a_running_bridge(offload_facts: dict[str, Any]) -> None:
    f = offload_facts["crypto"]
    lines = f["ztctl_a"].splitlines()
    header = lines[0]
    assert "VF" in header.split("  ") and header.index("OFFLOAD") < header.index("VF") < header.index("NEXT REKEY")
    vf_at = header.index("VF")
    by_local = {line.split()[1]: line[vf_at:].split()[0] for line in lines[1:] if line.startswith("node-a  ")}
    assert by_local == {"shop/a1": "3", "shop/a2": "5"}, lines
    a = f["metrics_a"]
    assert a['zt_bridge_vf_pods{pod="shop/a1",vf="3"}'] == 1 and a['zt_bridge_vf_pods{pod="shop/a2",vf="5"}'] == 1
    assert a['zt_bridge_vf_sa_packets{direction="out",vf="3"}'] >= 10
    assert a['zt_bridge_vf_sa_packets{direction="in",vf="3"}'] >= 10
    assert a["zt_bridge_vf_refused_pods"] == 0 and a["zt_bridge_vf_map_entries"] == 2
    assert a['zt_bridge_rekeys_total{role="initiator",trigger="demand"}'] >= 1
    assert f["rekey_answer"] == "node-a: 1 tunnel(s) rekeying"
    for name in ('zt_bridge_sa_bytes{direction="in"}', 'zt_bridge_sa_packets{direction="out"}',
                 'zt_bridge_xfrm_stat{counter="XfrmInNoStates"}', 'zt_bridge_tunnels{state="up"}'):  # fmt: skip
        assert name in a, name
    assert a['zt_bridge_handshakes_total{result="ok",role="initiator"}'] >= 1
    assert a['zt_bridge_xfrm_stat{counter="XfrmInNoStates"}'] == 0


# ================================================================================================================
# guest side (runs inside UML as root)


class Stories(Guest):
    """The three scenarios of this file: pod scope, node scope, offload."""

    def stories(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {"pod": self.story, "node": self.story_node, "offload": self.story_offload}

    async def story(self) -> None:
        f = self.facts
        # 1. node-a's bridge alone: its block is in place, node-b's bridge does not exist yet
        await self.start_bridge("a", "node-a", "nodeA")
        block0 = (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0)
        cap = Capture("nodeA", "eth0", "/run/before.pcap")
        await cap.start()
        before_ping = await ping("a1", B1, 3, "0.2")
        f["before"] = {
            "ping": before_ping,
            "wire": await wire(cap),
            "polblock": (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0) - block0,
        }

        # 2. node-b's bridge (asking for crypto offload on a veth): every admitted pair comes up
        started = time.monotonic()
        await self.start_bridge("b", "node-b", "nodeB", "--offload-dev", "eth0", "--offload", "crypto")
        for name in ("a", "b"):
            await self.wait_rows(name, lambda rows: len(rows) == 3 and all(r["state"] == "up" for r in rows.values()))
        f["setup_seconds"] = round(time.monotonic() - started, 2)
        rows = {n: await self.rows(n) for n in ("a", "b")}
        f["tunnels_up"] = {n: {k: r["role"] for k, r in rows[n].items()} for n in rows}
        f["refused"] = {n: (await self.dump(n))["refused_pairs"] for n in ("a", "b")}
        f["rows"] = {n: {k: {x: r.get(x) for x in ("role", "local_identity", "peer_identity", "spi_in", "spi_out",
                                                     "offload", "generation")} for k, r in rows[n].items()}
                     for n in rows}  # fmt: skip

        # 3. traffic through the tunnels, captured on the underlay (and in pod a1, as the control)
        caps = {
            "a": Capture("nodeA", "eth0", "/run/a.pcap"),
            "b": Capture("nodeB", "eth0", "/run/b.pcap"),
            "pod_a1": Capture("a1", "eth0", "/run/pod.pcap"),
        }
        for c in caps.values():
            await c.start()
        pings = {
            "a1->b1": await ping("a1", B1, 20, "0.05"),
            "a1->b2": await ping("a1", B2, 10, "0.05"),
            "a2->b2": await ping("a2", B2, 10, "0.05"),
            "b2->a1": await ping("b2", A1, 10, "0.05"),
        }
        tcp = await self.tcp_echo()
        block0 = (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0)
        denied_ping = await ping("a2", B1, 5, "0.2")
        denied_block = (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0) - block0
        wires = {n: await wire(c) for n, c in caps.items()}
        pair_sas = [
            i for n in ("nodeA", "nodeB") for i in await self.our_sas(n)
            if {str(i.sa.selector.src.network_address), str(i.sa.selector.dst.network_address)} == {A2, B1}
        ]  # fmt: skip
        f["traffic"] = {
            "pings": pings,
            "tcp": tcp,
            "wire": wires,
            "denied": {"ping": denied_ping, "polblock": denied_block, "sas_for_pair": len(pair_sas)},
        }

        # 4. spoofing: a handshake claiming a1's address with a2's SVID; a2 sending with a1's address
        f["spoof"] = await self.spoof()

        # 5. rekey under a ping flood (node-a initiates a1<->b1)
        f["rekey"] = await self.rekey_under_flood()

        # 6. the responder (node-b) is asked for a rekey of a1<->b1 (`ztctl tunnels --rekey`): it asks node-a
        ztctl = [sys.executable, "-m", "ztctl", "tunnels", "--bridge", f"127.0.0.1:{ADMIN['a']}",
                 "--bridge", f"127.0.0.1:{ADMIN['b']}"]  # fmt: skip
        answer = (await sh(*ztctl, "--node", "node-b", "--rekey", "--local", B1)).strip()
        rows_a = await self.wait_rows("a", lambda r: r[f"{A1}-{B1}"].get("generation") == 3, 20)
        f["nudge"] = {"answer": answer, "generation_a": rows_a[f"{A1}-{B1}"]["generation"]}
        f["ztctl"] = await sh(*ztctl, "--node", "node-a")
        f["rows_final"] = {n: await self.rows(n) for n in ("a", "b")}

        # 7. policy change (a1<->b1 refused both ways) and a deleted workload (a2): their tunnels go
        f["change"] = await self.policy_change()
        f["metrics"] = {n: await self.metrics(n) for n in ("a", "b")}
        for n in ("a", "b"):
            f["metrics"][n]["identity_failures"] = f["metrics"][n].get("identity_failures", 0)
        f["spoof"]["b_identity_failures"] = f["metrics"]["b"]["identity_failures"]

    async def story_node(self) -> None:
        """--tunnel-scope node with 16 s certificates: one tunnel per node pair, renewal -> rekey, expiry -> gone."""
        f = self.facts
        extra = ("--tunnel-scope", "node", "--cert-ttl", f"{NODE_CERT_TTL}s", "--sa-soft-packets", "60")
        t0 = time.monotonic()
        await asyncio.gather(
            self.start_bridge("a", "node-a", "nodeA", *extra), self.start_bridge("b", "node-b", "nodeB", *extra)
        )
        f["seconds"] = {"bridges_ready": round(time.monotonic() - t0, 1)}
        key_a, key_b = f"{NODE_A}-{NODE_B}", f"{NODE_B}-{NODE_A}"
        rows_a = await self.wait_rows("a", lambda r: r.get(key_a, {}).get("state") == "up")
        rows_b = await self.wait_rows("b", lambda r: r.get(key_b, {}).get("state") == "up")
        f["tunnels"] = {"a": {k: r["role"] for k, r in rows_a.items()}, "b": {k: r["role"] for k, r in rows_b.items()}}
        f["row_a"] = {
            k: rows_a[key_a].get(k) for k in ("local_identity", "peer_identity", "pairs", "spi_in", "spi_out")
        }
        f["seconds"]["tunnel_up"] = round(time.monotonic() - t0, 1)
        f["handshakes_before_renewal"] = {n: int((await self.metrics(n)).get("handshakes_ok", 0)) for n in ("a", "b")}
        cap = Capture("nodeA", "eth0", "/run/na.pcap")
        await cap.start()
        f["pings"] = {
            "a1->b1": await ping("a1", B1, 10, "0.05"),
            "a1->b2": await ping("a1", B2, 10, "0.05"),
            "b2->a2": await ping("b2", A2, 10, "0.05"),
            "a2->b1": await ping("a2", B1, 5, "0.1"),
        }
        f["wire_a"] = await wire(cap)
        f["spi_out_after_traffic"] = (await self.rows("a"))[key_a]["spi_out"]  # a renewal may have rekeyed

        # the SAs' soft packet limit (60; hard 90) starts a rekey before the kernel would delete them
        f["soft_limit_ping"] = await ping("a1", B1, 120, "0.05")
        await asyncio.sleep(1.0)
        f["history"] = (await self.rows("a"))[key_a]["history"]
        f["sas"] = {"a": len(await self.our_sas("nodeA")), "b": len(await self.our_sas("nodeB"))}

        # certificates renew at half of their lifetime: each renewal rekeys the tunnel. Wait for that rekey
        # itself on either side (the soft limit above may already have made generation 2; on the side whose
        # certificate renewed first it reads "certificate renewal", the other side keys it as a peer request)
        async with asyncio.timeout(40):
            while True:
                rows_a, rows_b = await self.rows("a"), await self.rows("b")
                reasons = {n: [h["reason"] for h in rows[k].get("history", ())]
                           for n, rows, k in (("a", rows_a, key_a), ("b", rows_b, key_b))}  # fmt: skip
                if any("certificate renewal" in r for r in reasons.values()):
                    break
                await asyncio.sleep(0.1)
        renewed = rows_a[key_a]
        f["renewal"] = {"generation": renewed["generation"], "spi_out": renewed["spi_out"], "reasons": reasons}
        f["seconds"]["renewed"] = round(time.monotonic() - t0, 1)

        # no CA any more: the certificates expire, and with them the tunnel. A generation keyed while one
        # side still held its older certificate goes first, and a new handshake with the renewed ones may
        # bring it back until those expire too (at most one TTL after the CA stopped): every removal is
        # measured against the expiry of the generation it removed.
        self.ztd_stop.set()
        await asyncio.wait_for(self.ztd_task, 30)
        stopped = time.monotonic()
        removals: list[float] = []
        was_up, expires = True, dt.datetime.fromisoformat(rows_a[key_a]["expires"])
        while time.monotonic() - stopped < NODE_CERT_TTL + 2.5:  # the TTL, the scheduler's second, a margin
            row = (await self.rows("a"))[key_a]
            up = row["state"] == "up"
            if was_up and not up:
                removals.append(round((dt.datetime.now(dt.UTC) - expires).total_seconds(), 2))
            if up:
                expires = dt.datetime.fromisoformat(row["expires"])
            was_up = up
            await asyncio.sleep(0.1)
        final = (await self.rows("a"))[key_a]
        block0 = (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0)
        cap = Capture("nodeA", "eth0", "/run/nx.pcap")
        await cap.start()
        expiry_ping = await ping("a1", B1, 5, "0.2")
        f["expiry"] = {
            "removals_after_expiry_s": removals,
            "final_state": final["state"],
            "final_error": final.get("last_error", ""),
            "sas_left": {"a": len(await self.our_sas("nodeA")), "b": len(await self.our_sas("nodeB"))},
            "ping": expiry_ping,
            "polblock": (await xfrm_stat("nodeA")).get("XfrmOutPolBlock", 0) - block0,
            "wire": await wire(cap),
        }
        f["seconds"]["expired"] = round(time.monotonic() - t0, 1)

    async def story_offload(self) -> None:
        """node-a with a VF map, node-b with packet offload on its veth (refused), then crypto (falls back)."""
        f = self.facts
        ztctl = [sys.executable, "-m", "ztctl", "tunnels", "--bridge", f"127.0.0.1:{ADMIN['a']}",
                 "--bridge", f"127.0.0.1:{ADMIN['b']}"]  # fmt: skip
        vf_map = Path("/run/vf-map.yaml")

        def write_vf_map(text: str) -> None:
            tmp = vf_map.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, vf_map)  # as a node agent would: never a half-written file

        write_vf_map(f"- {{vf: 3, pod: shop/a1, ip: {A1}, netdev: pf0vf3}}\n")
        t0 = time.monotonic()
        await asyncio.gather(
            self.start_bridge("a", "node-a", "nodeA", "--vf-map", str(vf_map), "--config-poll", "0.2s"),
            self.start_bridge("b", "node-b", "nodeB", "--offload-dev", "eth0", "--offload", "packet"),
        )
        seconds = {"bridges_ready": round(time.monotonic() - t0, 1)}

        # 1. packet offload refused: every tunnel of node-b fails with the kernel's reason, nothing goes through
        # node-b may try before node-a has its workload state ("no workload state yet"): that refusal is
        # transient, so wait for the retry that meets node-a's settled answer
        def b_settled(r: dict[str, dict[str, Any]]) -> bool:
            return (len(r) == 3 and all(x["state"] == "failing" for x in r.values())
                    and not any("no workload state yet" in x.get("last_error", "") for x in r.values()))  # fmt: skip

        rows_b = await self.wait_rows("b", b_settled)
        # node-a's side fails once its own attempt (or node-b's) has been refused: wait for that, not one read
        rows_a = await self.wait_rows("a", lambda r: bool(r) and all(x["state"] == "failing" for x in r.values()))
        keyed_b = [i for i in await self.our_sas("nodeB") if i.sa.aead is not None]
        cap = Capture("nodeA", "eth0", "/run/off.pcap")
        await cap.start()
        ping_blocked = await ping("a1", B1, 5, "0.1")
        log_b = await asyncio.to_thread(Path("/run/bridge-b.log").read_text)
        f["packet"] = {
            "probe_log": [line for line in log_b.splitlines() if "--offload packet on eth0" in line],
            "dump_offload": (await self.dump("b"))["offload"],
            "states_b": {k: r["state"] for k, r in rows_b.items()},
            "errors_b": {k: r["last_error"] for k, r in rows_b.items()},
            "states_a": {k: r["state"] for k, r in rows_a.items()},
            "keyed_sas_b": len(keyed_b),
            "ping": ping_blocked,
            "wire": await wire(cap),
            "metrics_b": await self.raw_metrics("b"),
            "ztctl_b": await sh(*ztctl, "--node", "node-b"),
        }

        # 2. the VF map on node-a: a2 has no VF; then it gets one; then a broken file; then a conflict
        async def vf_state() -> dict[str, Any]:
            dump = await self.dump("a")
            return {
                "tunnels": sorted(f"{r['local_address']}-{r['peer_address']}" for r in dump["tunnels"]),
                "vf_of": {f"{r['local_address']}-{r['peer_address']}": r.get("vf") for r in dump["tunnels"]},
                "refused": dump["state"]["vf"]["refused"],
                "last_error": dump["vf_map"]["last_error"],
            }

        seconds["packet_checked"] = round(time.monotonic() - t0, 1)
        vf: dict[str, Any] = {"first": await vf_state()}
        changed = time.monotonic()
        write_vf_map(f"- {{vf: 3, pod: shop/a1, ip: {A1}, netdev: pf0vf3}}\n- {{vf: 5, pod: shop/a2, ip: {A2}}}\n")
        await self.wait_rows("a", lambda r: f"{A2}-{B2}" in r, 10)
        vf["added"] = {**await vf_state(), "seconds": round(time.monotonic() - changed, 2)}
        write_vf_map("- {vf: -1, pod: shop/a1}\n")
        async with asyncio.timeout(10):
            while True:
                if (await self.dump("a"))["vf_map"]["last_error"]:
                    break
                await asyncio.sleep(0.1)
        vf["broken"] = {
            **await vf_state(),
            "errors_metric": (await self.raw_metrics("a"))["zt_bridge_vf_map_errors_total"],
        }
        write_vf_map("- {vf: 3, pod: shop/a1}\n- {vf: 3, pod: shop/a2}\n")
        await self.wait_rows("a", lambda r: not r, 10)
        vf["conflict"] = {
            **await vf_state(),
            "leftover_sas_a": len([i for i in await self.our_sas("nodeA") if i.sa.aead is not None]),
            "ztctl_a": await sh(*ztctl, "--node", "node-a"),
        }
        f["vf"] = vf
        write_vf_map(f"- {{vf: 3, pod: shop/a1, ip: {A1}, netdev: pf0vf3}}\n- {{vf: 5, pod: shop/a2, ip: {A2}}}\n")

        seconds["vf_checked"] = round(time.monotonic() - t0, 1)

        # 3. node-b again, with crypto offload on the veth: the tunnels come up, visibly in software
        self.procs["b"].send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.procs["b"].wait(), 20)
        await self.start_bridge("b", "node-b", "nodeB", "--offload-dev", "eth0", "--offload", "crypto")
        seconds["b_restarted"] = round(time.monotonic() - t0, 1)
        await sh(*ztctl, "rekey", "--node", "node-a")  # skip node-a's retry backoff from the failing phase
        for name in ("a", "b"):
            await self.wait_rows(name, lambda r: len(r) == 3 and all(x["state"] == "up" for x in r.values()), 60)
        seconds["crypto_up"] = round(time.monotonic() - t0, 1)
        generation = (await self.rows("a"))[f"{A1}-{B1}"]["generation"]
        crypto: dict[str, Any] = {}
        crypto["rekey_answer"] = (await sh(*ztctl, "rekey", "--node", "node-a", "--peer", B1)).strip()
        await self.wait_rows("a", lambda r: (r[f"{A1}-{B1}"].get("generation") or 0) > generation, 20)
        crypto["ping"] = await ping("a1", B1, 10, "0.05")  # on the new generation: its SAs' counters
        crypto["offloads_b"] = {k: r.get("offload") for k, r in (await self.rows("b")).items()}
        crypto["ztctl_b"] = await sh(*ztctl, "--node", "node-b")
        crypto["ztctl_a"] = await sh(*ztctl, "--node", "node-a")
        crypto["metrics_a"] = await self.raw_metrics("a")
        crypto["metrics_b"] = await self.raw_metrics("b")
        f["crypto"] = crypto
        seconds["done"] = round(time.monotonic() - t0, 1)
        f["seconds"] = seconds

    async def tcp_echo(self) -> str:
        server = (
            "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "s.bind(('0.0.0.0',7000));s.listen(1);c,_=s.accept()\n"
            "while True:\n d=c.recv(65536)\n if not d: break\n c.sendall(d)\nc.close()"
        )
        client = (
            f"import socket\np=bytes.fromhex('{PATTERN.hex()}')*5462+b'0123'\n"
            f"c=socket.create_connection(('{B1}',7000),5)\n"
            "c.sendall(p);c.shutdown(socket.SHUT_WR);got=b''\n"
            "while True:\n d=c.recv(65536)\n if not d: break\n got+=d\n"
            "print('echoed %d bytes' % len(got) if got==p else 'mismatch %d' % len(got))"
        )
        srv = await asyncio.create_subprocess_exec(*ns("b1", sys.executable, "-S", "-c", server))
        await asyncio.sleep(1.0)
        out = (await sh(*ns("a1", sys.executable, "-S", "-c", client), check=False)).strip()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(srv.wait(), 10)
        return out

    async def spoof(self) -> dict[str, Any]:
        from ipsec_bridge import handshake as hs
        from ipsec_bridge.keys import KeyScope
        from ipsec_bridge.netns import Netns
        from ztcore.identity import Identity
        from ztcore.identity.caclient import CAClient, CAClientOptions, build_csr, generate_key, private_key_pem

        debug = Identity("cluster.local", "shop", "debug")
        ca = CAClient(CAClientOptions(address="127.0.0.1:15012", root_cert=self.ztd_cfg.published_root,
                                      token_file=Path("/run/token-node-a")))  # fmt: skip
        key = generate_key("ecdsa-p256")
        chain = await ca.create_certificate(build_csr(key, debug), 3600, impersonate=debug)
        await ca.close()
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        cred = hs.Credential(debug, "".join(chain[:-1]).encode(), private_key_pem(key), chain[-1].encode(),
                             leaf.not_valid_after_utc)  # fmt: skip

        class Recorder:
            calls: list[str] = []

            async def allocate_spi(self) -> int:
                self.calls.append("alloc")
                return 0x4242

            def propose_spi(self) -> int:
                self.calls.append("propose")
                return 0x4242

            async def install(self, inbound: Any, outbound: Any, *, esn: bool = True) -> None:
                self.calls.append("install")

            async def rollback(self) -> None:
                self.calls.append("rollback")

        from ipaddress import ip_address

        recorder = Recorder()
        plan = hs.Plan(cred, hs.tls_context(cred), Identity("cluster.local", "payments", "ledger"),
                       ip_address(A1), ip_address(B1), recorder, lambda: None)  # fmt: skip
        before = sorted(i.sa.spi for i in await self.our_sas("nodeB"))
        node_a = Netns("nodeA")  # from node-a's underlay address, as a compromised node would
        reader, writer = await node_a.connect(NODE_B, HANDSHAKE_PORT, 10)
        out: dict[str, Any] = {}
        try:
            await hs.initiate(reader, writer, hs.Preamble(hs.Kind.HANDSHAKE, KeyScope.POD, A1, B1), plan)
            out["error_code"], out["error"] = "none", "the handshake succeeded"
        except hs.HandshakeError as err:
            out["error_code"], out["error"] = err.code, str(err)
        finally:
            writer.close()
            node_a.close()
        await asyncio.sleep(0.5)
        out["rogue_installer_calls"] = recorder.calls
        out["sas_on_b_unchanged"] = sorted(i.sa.spi for i in await self.our_sas("nodeB")) == before

        # data plane: a2 puts a1's address on its interface and pings b1 with it as source
        rows = await self.rows("a")
        spi = int(rows[f"{A1}-{B1}"]["spi_out"], 16)
        packets = {i.sa.spi: i.current.packets for i in await self.our_sas("nodeA")}
        await sh("ip", "-n", "a2", "addr", "add", f"{A1}/32", "dev", "eth0")
        out["dataplane_ping"] = await ping("a2", B1, 5, "0.2", "-I", A1)
        await sh("ip", "-n", "a2", "addr", "del", f"{A1}/32", "dev", "eth0")
        after = {i.sa.spi: i.current.packets for i in await self.our_sas("nodeA")}
        out["a1_tunnel_packets_delta"] = after.get(spi, 0) - packets.get(spi, 0)
        return out

    async def rekey_under_flood(self) -> dict[str, Any]:
        key_a, key_b = f"{A1}-{B1}", f"{B1}-{A1}"
        old = (await self.rows("a"))[key_a]
        caps = {"a": Capture("nodeA", "eth0", "/run/ra.pcap"), "b": Capture("nodeB", "eth0", "/run/rb.pcap")}
        for c in caps.values():
            await c.start()
        argv = ns("a1", "ping", "-n", "-q", "-c", "450", "-i", "0.01", "-W", "1", "-p", PATTERN.hex(), B1)
        flood = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        start = old.get("packets_out") or 0  # earlier tests' traffic is on this SA too
        await self.wait_rows("a", lambda r: (r[key_a].get("packets_out") or 0) >= start + 120, 30)
        counted = {n: await self.resumption_counters(n) for n in ("a", "b")}
        async with self.http.post(f"http://127.0.0.1:{ADMIN['a']}/rekey", params={"peer": B1}) as resp:
            answer = await resp.json()
        rows_a = await self.wait_rows("a", lambda r: r[key_a].get("generation") == 2, 20)
        rows_b = await self.wait_rows("b", lambda r: r[key_b].get("generation") == 2, 20)
        after = {n: await self.resumption_counters(n) for n in ("a", "b")}
        handshakes = {n: {k: after[n][k] - counted[n][k] for k in after[n]} for n in ("a", "b")}
        out_text, _ = await flood.communicate()
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out_text.decode())
        assert found, out_text
        new = rows_a[key_a]
        wires = {n: await wire(c) for n, c in caps.items()}
        await asyncio.sleep(1.5)  # past the 1 s grace
        sas = {"A": await self.our_sas("nodeA"), "B": await self.our_sas("nodeB")}
        new_spis = {int(new["spi_in"], 16), int(new["spi_out"], 16)}
        old_spis = {int(old["spi_in"], 16), int(old["spi_out"], 16)}
        return {
            "answer": answer,
            "ping": [int(found.group(1)), int(found.group(2))],
            "generation": {"a": new["generation"], "b": rows_b[key_b]["generation"]},
            "old": {"spi_in": old["spi_in"], "spi_out": old["spi_out"]},
            "new": {"spi_in": new["spi_in"], "spi_out": new["spi_out"]},
            "new_sa_packets": {
                f"{n}:0x{i.sa.spi:08x}": i.current.packets
                for n, lst in sas.items()
                for i in lst
                if i.sa.spi in new_spis
            },
            "old_sas_left": [f"0x{i.sa.spi:08x}" for lst in sas.values() for i in lst if i.sa.spi in old_spis],
            "wire_a": wires["a"]["esp_by_spi"],
            "wire_b": wires["b"]["esp_by_spi"],
            "mesh_plaintext": wires["a"]["mesh_plaintext"] + wires["b"]["mesh_plaintext"],
            "handshakes": handshakes,
            "resumption": (await self.dump("a"))["resumption"],
        }

    async def resumption_counters(self, name: str) -> dict[str, int]:
        """Successful rekey handshakes by mode and the signatures they made, on one node (all its tunnels)."""
        raw = await self.raw_metrics(name)
        out = {"full": 0, "resumed": 0, "signatures": 0}
        for key, value in raw.items():
            if key.startswith("zt_bridge_handshake_modes_total{") and 'kind="rekey"' in key:
                out["resumed" if 'mode="resumed"' in key else "full"] += int(value)
            elif key.startswith("zt_bridge_handshake_signatures_total{") and 'kind="rekey"' in key:
                out["signatures"] += int(value)
        return out

    async def policy_change(self) -> dict[str, Any]:
        from tests.support.bridge_mesh import DENY_FRONTEND_LEDGER, POLICIES, write_mesh
        from tests.support.bridge_mesh import PODS as MESH_PODS

        deny_both_ways = POLICIES + DENY_FRONTEND_LEDGER
        rows = {n: await self.rows(n) for n in ("a", "b")}
        earlier = {n: len((await self.dump(n))["recent_removals"]) for n in ("a", "b")}
        doomed = {
            "nodeA": {int(rows["a"][k][s], 16) for k in (f"{A1}-{B1}", f"{A2}-{B2}") for s in ("spi_in", "spi_out")},
            "nodeB": {int(rows["b"][k][s], 16) for k in (f"{B1}-{A1}", f"{B2}-{A2}") for s in ("spi_in", "spi_out")},
        }
        t0 = time.monotonic()
        write_mesh(self.mesh, deny_both_ways, {k: v for k, v in MESH_PODS.items() if k != "a2"})
        gone_after = None
        async with asyncio.timeout(20):
            while gone_after is None:
                left = [i for n, spis in doomed.items() for i in await self.our_sas(n) if i.sa.spi in spis]
                if not left:
                    gone_after = time.monotonic() - t0
                await asyncio.sleep(0.02)
        remaining = {n: sorted(await self.rows(n)) for n in ("a", "b")}
        metrics = {n: await self.metrics(n) for n in ("a", "b")}
        removals = {n: (await self.dump(n))["recent_removals"] for n in ("a", "b")}
        leftover = {}
        for n, netns in (("a", "nodeA"), ("b", "nodeB")):
            keep = {int((await self.rows(n))[k][s], 16) for k in (await self.rows(n)) for s in ("spi_in", "spi_out")}
            leftover[n] = len([i for i in await self.our_sas(netns) if i.sa.spi not in keep])
        return {
            "gone_after_seconds": round(gone_after, 3),
            "removal_max_seconds": max(r["seconds"] for rs in removals.values() for r in rs),
            "removed": {n: sorted(r["tunnel"] for r in rs[earlier[n] :]) for n, rs in removals.items()},
            "removed_before_the_change": {n: rs[: earlier[n]] for n, rs in removals.items()},
            "removal_reasons": {
                n: [(r["tunnel"], r["reason"]) for r in rs[earlier[n] :]] for n, rs in removals.items()
            },
            "removals": {n: metrics[n].get("zt_bridge_tunnel_removals_total", 0) for n in metrics},
            "remaining": remaining,
            "ping_denied": await ping("a1", B1, 5, "0.2"),
            "ping_still_allowed": await ping("a1", B2, 5, "0.2"),
            "leftover_sas": leftover,
        }


def guest_main() -> None:
    os.environ.setdefault("TMPDIR", "/run")
    facts = asyncio.run(Stories().run(sys.argv[1]))
    for name in ("a", "b"):
        log = Path(f"/run/bridge-{name}.log")
        if log.exists():
            print(f"--- bridge {name} log (tail)", file=sys.stderr)
            print(log.read_text()[-4000:], file=sys.stderr)
    print("RESULT " + json.dumps(facts, default=str))


if __name__ == "__main__":
    guest_main()
