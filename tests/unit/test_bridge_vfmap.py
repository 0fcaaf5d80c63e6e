"""The VF map (`zt-bridge --vf-map`): parsing, the one-VF-per-pod rule, the view it shapes, and reloads."""

from __future__ import annotations

import asyncio
import os
from ipaddress import ip_address
from pathlib import Path

import pytest

from ipsec_bridge.main import main
from ipsec_bridge.pairs import TunnelScope
from ipsec_bridge.state import StateStore, describe
from ipsec_bridge.tunnels.desired import desired_specs
from ipsec_bridge.vfmap import VfEntry, VfMap, VfMapError, VfMapFile, assign, parse
from tests.support.bridge_mesh import NODE_A_IP, load_view, write_mesh

A1, A2 = ip_address("10.1.0.10"), ip_address("10.1.0.11")


# --- parsing ---------------------------------------------------------------------------------------------------


def test_a_valid_map() -> None:
    text = """
- vf: 3
  pod: shop/frontend
  ip: 10.1.0.10
  netdev: pf0vf3
- {vf: 0, ip: "fd00::5"}
"""
    assert parse(text) == VfMap((VfEntry(3, "shop/frontend", A1, "pf0vf3"), VfEntry(0, "", ip_address("fd00::5"), "")))
    assert parse("[]") == VfMap(())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty (write [] for a node with no VFs assigned)"),
        ("vf: 3", "expected a list of entries (- vf: N ...), got a dict"),
        ("- [3, shop/a]", "entry 1: expected a mapping with vf and pod/ip, got list"),
        ("- {vf: 3, pod: shop/a}\n- {vfid: 4, pod: shop/b}",
         "entry 2: unknown key 'vfid' (known: vf, pod, ip, netdev)"),
        ("- {pod: shop/a}", "entry 1: vf must be a VF index (an integer >= 0), got None"),
        ("- {vf: -1, pod: shop/a}", "entry 1: vf must be a VF index (an integer >= 0), got -1"),
        ("- {vf: '3', pod: shop/a}", "entry 1: vf must be a VF index (an integer >= 0), got '3'"),
        ("- {vf: true, pod: shop/a}", "entry 1: vf must be a VF index (an integer >= 0), got True"),
        ("- {vf: 3, pod: frontend}", "entry 1: pod 'frontend' is not NAMESPACE/NAME"),
        ("- {vf: 3, pod: a/b/c}", "entry 1: pod 'a/b/c' is not NAMESPACE/NAME"),
        ("- {vf: 3, ip: 10.1.0.300}", "entry 1: ip '10.1.0.300' is not an IP address"),
        ("- {vf: 3}", "entry 1 (VF 3): give the pod as pod: NAMESPACE/NAME, ip: ADDRESS, or both"),
        ("- {vf: 3, ip: 10.1.0.1, netdev: ''}", "entry 1: netdev '' is not an interface name"),
        ("- {vf: 3, ip: 10.1.0.1, netdev: averyveryverylongname}",
         "entry 1: netdev 'averyveryverylongname' is not an interface name"),
        ("- {vf: 3\n  pod: x", "not YAML at line 2: expected ',' or '}', but got ':'"),
    ],
)  # fmt: skip
def test_bad_maps_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(VfMapError) as err:
        parse(text)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


# --- the one-VF rule -------------------------------------------------------------------------------------------

LOCAL = [("shop/frontend", A1), ("shop/debug", A2)]


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        # the normal case: each pod named once, by name, address or both
        (
            [VfEntry(3, "shop/frontend", A1, "pf0vf3"), VfEntry(5, ip=A2)],
            {A1: 3, A2: 5},
        ),
        # no entry: no tunnel
        ([VfEntry(3, "shop/frontend")], {A1: 3, A2: "no VF in the VF map names this pod"}),
        # the entry must agree with WDS on everything it states
        (
            [VfEntry(3, "shop/frontend", ip_address("10.1.0.99"))],
            {A1: "VF 3 says 10.1.0.99, but WDS has shop/frontend at 10.1.0.10",
             A2: "no VF in the VF map names this pod"},
        ),
        (
            [VfEntry(3, "shop/other", A1, "pf0vf3")],
            {A1: "VF 3 (pf0vf3) is for pod shop/other, but WDS has shop/frontend at 10.1.0.10",
             A2: "no VF in the VF map names this pod"},
        ),
        # one entry naming a1 by name and a2 by address: neither is the pod it describes
        (
            [VfEntry(3, "shop/frontend", A2)],
            {A1: "VF 3 says 10.1.0.11, but WDS has shop/frontend at 10.1.0.10",
             A2: "VF 3 is for pod shop/frontend, but WDS has shop/debug at 10.1.0.11"},
        ),
        # two pods claim one VF: neither gets it
        (
            [VfEntry(3, "shop/frontend"), VfEntry(3, ip=A2)],
            {A1: "VF 3 is claimed by 2 entries (shop/frontend, 10.1.0.11)",
             A2: "VF 3 is claimed by 2 entries (shop/frontend, 10.1.0.11)"},
        ),
        # one pod with two VFs: a pod has exactly one
        (
            [VfEntry(3, "shop/frontend"), VfEntry(4, ip=A1), VfEntry(5, "shop/debug")],
            {A1: "named by VFs 3, 4: a pod has exactly one VF", A2: 5},
        ),
        # the same entry twice is a claim by two entries too
        (
            [VfEntry(3, "shop/frontend"), VfEntry(3, "shop/frontend"), VfEntry(5, "shop/debug")],
            {A1: "VF 3 is claimed by 2 entries (shop/frontend, shop/frontend)", A2: 5},
        ),
    ],
)  # fmt: skip
def test_a_pod_gets_tunnels_only_with_exactly_one_matching_vf(
    entries: list[VfEntry], expected: dict[object, object]
) -> None:
    result = assign(VfMap(tuple(entries)), LOCAL)
    got = {ip: (v.entry.vf if v.entry is not None else v.reason) for ip, v in result.verdicts.items()}
    assert got == expected


def test_entries_for_no_local_pod_are_reported_unused() -> None:
    result = assign(VfMap((VfEntry(3, "shop/frontend"), VfEntry(7, "shop/gone", netdev="pf0vf7"))), LOCAL)
    assert result.unused == (VfEntry(7, "shop/gone", netdev="pf0vf7"),)
    assert result.describe()["unused"] == [{"vf": 7, "pod": "shop/gone", "ip": None, "netdev": "pf0vf7"}]


# --- the view and the tunnels it gives -------------------------------------------------------------------------


async def test_the_vf_map_shapes_the_nodes_tunnels_and_nothing_else(tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path / "mesh")
    store: StateStore = await load_view(mesh)
    without, _ = desired_specs(store.view, "node-a", TunnelScope.POD, None)
    assert sorted(k[1:] for k in without) == [("10.1.0.10", "10.2.0.10"), ("10.1.0.10", "10.2.0.11"),
                                              ("10.1.0.11", "10.2.0.11")]  # fmt: skip
    version = store.view.version
    # a1 (shop/frontend) has VF 3; a2 (shop/debug) none; an entry for a pod of node-b changes nothing there
    view = store.set_vf_map("node-a", VfMap((VfEntry(3, "shop/a1", A1, "pf0vf3"), VfEntry(9, "payments/b1"))))
    assert view.version == version + 1
    specs, _ = desired_specs(view, "node-a", TunnelScope.POD, None)
    assert sorted(k[1:] for k in specs) == [("10.1.0.10", "10.2.0.10"), ("10.1.0.10", "10.2.0.11")]
    assert view.pod(A1) is not None and view.pod(A1).vf == 3  # type: ignore[union-attr]
    assert view.pod(A2) is None  # so a peer's handshake for a2 is refused too
    assert [p.name for p in view.pods_on("node-a")] == ["shop/a1"]  # no bypass policy, no certificate for a2
    assert view.pod(ip_address("10.2.0.10")) is not None  # node-b's pods are node-b's business
    assert describe(view)["vf"] == {
        "pods": {"10.1.0.10": {"pod": "shop/a1", "vf": 3, "netdev": "pf0vf3"}},
        "refused": [{"pod": "shop/a2", "ip": "10.1.0.11", "reason": "no VF in the VF map names this pod"}],
        "unused": [{"vf": 9, "pod": "payments/b1", "ip": None, "netdev": None}],
    }
    # node scope: the node tunnel carries only a1's pairs
    node_specs, _ = desired_specs(view, "node-a", TunnelScope.NODE, ip_address(NODE_A_IP))
    (tunnel,) = node_specs.values()
    assert len(tunnel.selectors) == 2
    # the map is the node's: node-b's view of the same store content is unaffected
    view_b = store.set_vf_map("node-b", VfMap(()))
    assert view_b.pods_on("node-b") == [] and view_b.pod(A2) is not None
    # and without a map, everything is back
    assert "vf" not in describe(store.set_vf_map("node-a", None))


# --- the file --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))  # coarse mtimes still change


async def test_the_file_is_reloaded_and_a_bad_version_keeps_the_last_good_map(tmp_path: Path) -> None:
    path = tmp_path / "vf-map.yaml"
    _write(path, "- {vf: 3, pod: shop/a1}\n", 0)
    source = VfMapFile(path, poll_interval=0.01)
    seen: list[VfMap] = []
    errors: list[str] = []
    await source.load_initial()
    source.subscribe(seen.append)
    source.on_error(errors.append)
    assert seen == [VfMap((VfEntry(3, "shop/a1"),))]  # the map in force, at once
    assert not await source.check()  # unchanged
    _write(path, "- {vf: 3, pod: shop/a1}\n- {vf: 5, pod: shop/a2}\n", 1)
    assert await source.check()
    assert seen[-1].entries[1] == VfEntry(5, "shop/a2") and source.status.reloads == 1
    _write(path, "- {vf: 5, pod: shop}\n", 2)
    assert not await source.check() and not await source.check()  # reported once, not once per poll
    assert errors == ["entry 1: pod 'shop' is not NAMESPACE/NAME"]
    assert source.status.last_error == errors[0] and source.status.entries == 2 and len(seen) == 2
    path.unlink()
    assert not await source.check()
    assert errors[-1] == "cannot read: No such file or directory" and source.current == seen[-1]
    _write(path, "[]\n", 3)
    assert await source.check() and seen[-1] == VfMap(()) and source.status.last_error == ""
    # the poll loop does the same on its own
    task = asyncio.create_task(source.run())
    _write(path, "- {vf: 1, ip: 10.1.0.10}\n", 4)
    async with asyncio.timeout(5):
        while True:
            if seen[-1] != VfMap(()):
                break
            await asyncio.sleep(0.01)
    task.cancel()
    assert seen[-1] == VfMap((VfEntry(1, ip=A1),))


async def test_a_missing_or_bad_file_refuses_the_start(tmp_path: Path) -> None:
    with pytest.raises(VfMapError, match=r"^--vf-map /nonexistent/vf.yaml: No such file or directory$"):
        await VfMapFile(Path("/nonexistent/vf.yaml")).load_initial()
    bad = tmp_path / "vf.yaml"
    bad.write_text("- {vf: x, pod: shop/a1}\n")
    with pytest.raises(VfMapError) as err:
        await VfMapFile(bad).load_initial()
    assert str(err.value) == f"--vf-map {bad}: entry 1: vf must be a VF index (an integer >= 0), got 'x'"


def test_zt_bridge_refuses_a_bad_vf_map_with_one_line_before_touching_the_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh").mkdir()
    token = tmp_path / "token"
    token.write_text("x.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6aXN0aW8tc3lzdGVtOnp0dW5uZWwifQ.y")
    vf = tmp_path / "vf.yaml"
    vf.write_text("- {vf: 3, pod: shop/a1, color: red}\n")
    argv = ["--node", "node-a", "--config-dir", str(tmp_path / "mesh"), "--token-file", str(token),
            "--mesh-cidr", "10.0.0.0/8", "--admin-port", "0", "--netns", "nope", "--vf-map", str(vf)]  # fmt: skip
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"zt-bridge: --vf-map {vf}: entry 1: unknown key 'color' (known: vf, pod, ip, netdev)"
    )
