"""The two-node mesh of tests/support/bridge_mesh.py as the bridge sees it: the view its YAML gives, and the
tunnels each node wants from it."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

from ipsec_bridge.pairs import IPAddress, PodPair, pod_pairs
from tests.support.bridge_mesh import NODE_A_IP, NODE_B_IP, PODS, identity, load_view, write_mesh


async def test_the_view_of_the_mesh_from_yaml(tmp_path: Path) -> None:
    store = await load_view(write_mesh(tmp_path))
    view = store.view
    assert view.synced
    assert {str(ip): p.identity.uri for ip, p in view.pods_by_ip.items()} == {
        PODS[name][4]: identity(name) for name in PODS
    }
    # the bridges' host-network pods give the nodes' underlay addresses and are not mesh pods
    assert {k: str(v) for k, v in view.node_addresses.items()} == {"node-a": NODE_A_IP, "node-b": NODE_B_IP}
    assert [p.name for p in view.pods_on("node-a")] == ["shop/a1", "shop/a2"]


async def test_the_tunnels_each_node_wants(tmp_path: Path) -> None:
    view = (await load_view(write_mesh(tmp_path))).view
    admitted_a, refused_a = pod_pairs(view, "node-a")
    admitted_b, refused_b = pod_pairs(view, "node-b")

    def table(pairs: dict[tuple[IPAddress, IPAddress], PodPair]) -> dict[tuple[str, str], bool]:
        return {(str(k[0]), str(k[1])): p.initiator for k, p in pairs.items()}

    assert table(admitted_a) == {
        ("10.1.0.10", "10.2.0.10"): True,
        ("10.1.0.10", "10.2.0.11"): False,
        ("10.1.0.11", "10.2.0.11"): False,
    }
    # the same tunnels from the other side, with the opposite roles: the two bridges never both initiate
    assert table(admitted_b) == {
        ("10.2.0.10", "10.1.0.10"): False,
        ("10.2.0.11", "10.1.0.10"): True,
        ("10.2.0.11", "10.1.0.11"): True,
    }
    assert [(str(p.local.ip), str(p.remote.ip)) for p in refused_a] == [("10.1.0.11", "10.2.0.10")]
    assert [(str(p.local.ip), str(p.remote.ip)) for p in refused_b] == [("10.2.0.10", "10.1.0.11")]
    (denied,) = refused_a
    assert "deny-debug" in denied.outbound.reason and "debug-allow-cart" in denied.inbound.reason
    assert ip_address("10.1.0.11") in {p.local.ip for p in refused_a}
