"""ztctl against a running ztd over xDS: proxy-status (SYNCED, then ERROR after a NACK), ztunnel-config
(online equals offline), and `x authz check --xds-address` (online equals offline)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.ads_client import ADDRESS, AUTHORIZATION, ZtunnelClient
from tests.helpers import RunningZtd, free_port, running_ztd
from tests.support.ztunnel_ads import EXAMPLES
from ztctl import cli


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    target = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, target)
    return target


@pytest.fixture
async def zt(tmp_path: Path, mesh: Path) -> AsyncIterator[RunningZtd]:
    async with running_ztd(tmp_path, config_dir=mesh) as running:
        yield running


async def ztctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def secure(zt: RunningZtd) -> list[str]:
    return ["--xds-address", f"127.0.0.1:{zt.cfg.secure_port}", "--state-dir", str(zt.cfg.state_dir)]


def plaintext(zt: RunningZtd) -> list[str]:
    return ["--plaintext", "--xds-address", f"127.0.0.1:{zt.cfg.xds_port}"]


async def test_proxy_status_synced_then_error_after_a_nack(
    zt: RunningZtd, mesh: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{zt.cfg.xds_port}") as ch:
        client = ZtunnelClient(ch)
        await client.start()
        try:
            await client.next()
            await client.next()
            await asyncio.sleep(0.1)
            rc, out, err = await ztctl(capsys, "proxy-status", *secure(zt))
            assert (rc, err) == (0, "")
            header, row = out.splitlines()
            assert header.split() == ["NAME", "CLUSTER", "ISTIOD", "VERSION", "SUBSCRIBED", "TYPES"]
            assert row.split()[0:2] == ["ztunnel-node-a.istio-system", "Kubernetes"]
            assert row.endswith("2 (WADS,WDS)")
            # Columns are Go-tabwriter aligned (padding 5), as istioctl prints them.
            assert header.index("CLUSTER") == len("ztunnel-node-a.istio-system") + 5

            rc, out, _ = await ztctl(capsys, "proxy-status", "-v", *plaintext(zt))
            header, row = out.splitlines()
            assert header.split() == ["NAME", "CLUSTER", "CDS", "ECDS", "EDS", "LDS", "RDS", "WADS", "WDS", "ISTIOD",
                                      "VERSION"]  # fmt: skip
            cells = row.split()
            assert cells[2:7] == ["IGNORED"] * 5
            assert cells[7] == "SYNCED" and cells[9] == "SYNCED"

            # The client now rejects addresses; a registry change makes ztd push one.
            client.reject = lambda resp: "workload has an invalid address" if resp.type_url == ADDRESS else ""
            shop = mesh / "20-shop.yaml"
            shop.write_text(shop.read_text().replace("version: v1}", "version: v7}", 1))
            assert (await client.next(ADDRESS)).nacked
            await asyncio.sleep(0.1)
            rc, out, _ = await ztctl(capsys, "proxy-status", "-v", *plaintext(zt))
            cells = out.splitlines()[1].split()
            assert cells[7] == "SYNCED" and cells[9] == "ERROR", out

            rc, out, _ = await ztctl(capsys, "proxy-status", "-o", "json", *plaintext(zt))
            dump = json.loads(out)
            assert dump["typeUrl"] == "istio.io/debug/syncz"
            (config,) = dump["resources"]
            by_type = {g["typeUrl"]: g for g in config["genericXdsConfigs"]}
            assert by_type[ADDRESS]["configStatus"] == "ERROR"
            assert by_type[ADDRESS]["errorState"]["details"] == "workload has an invalid address"
            assert by_type[AUTHORIZATION]["configStatus"] == "SYNCED"
        finally:
            await client.close()
    await asyncio.sleep(0.1)
    rc, out, _ = await ztctl(capsys, "proxy-status", *plaintext(zt))
    assert (rc, out) == (0, "No proxies connected to this ztd.\n")


WORKLOADS = """\
NAMESPACE    POD NAME       ADDRESS     NODE   WAYPOINT PROTOCOL
istio-system ztunnel-node-a 10.244.1.2  node-a None     TCP
istio-system ztunnel-node-b 10.244.2.2  node-b None     TCP
payments     ledger-1       10.244.1.20 node-a None     HBONE
payments     ledger-2       10.244.2.20 node-b None     HBONE
shop         cart-1         10.244.1.11 node-a None     HBONE
shop         debug          10.244.2.30 node-b None     HBONE
shop         frontend-1     10.244.1.10 node-a None     HBONE
shop         frontend-2     10.244.2.10 node-b None     HBONE
"""
SERVICES = """\
NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS
payments  ledger       10.96.20.1  None     2/2
shop      cart         10.96.10.2  None     1/1
shop      frontend     10.96.10.1  None     2/2
"""
POLICIES = """\
NAMESPACE    POLICY NAME                   ACTION SCOPE
istio-system istio_converted_static_strict Deny   WorkloadSelector
payments     deny-debug                    Deny   Namespace
payments     ledger-allow-cart             Allow  WorkloadSelector
shop         cart-allow-frontend           Allow  WorkloadSelector
shop         frontend-allow-all            Allow  WorkloadSelector
"""


@pytest.mark.parametrize(("kind", "table"), [("workloads", WORKLOADS), ("services", SERVICES), ("policies", POLICIES)])
async def test_ztunnel_config_online_equals_offline(
    zt: RunningZtd, capsys: pytest.CaptureFixture[str], kind: str, table: str
) -> None:
    rc, online, err = await ztctl(capsys, "ztunnel-config", kind, *secure(zt))
    assert (rc, err) == (0, "")
    assert online == table
    rc, offline, _ = await ztctl(capsys, "ztunnel-config", kind, "--config-dir", str(EXAMPLES))
    assert (rc, offline) == (0, table)
    rc, shop_only, _ = await ztctl(capsys, "ztunnel-config", kind, "--namespace", "shop", *plaintext(zt))
    assert rc == 0
    assert [line.split() for line in shop_only.splitlines()[1:]] == [
        line.split() for line in table.splitlines()[1:] if line.startswith("shop ")
    ]
    for output in ("json", "yaml"):
        rc, on, _ = await ztctl(capsys, "ztunnel-config", kind, "-o", output, *plaintext(zt))
        rc2, off, _ = await ztctl(capsys, "ztunnel-config", kind, "-o", output, "--config-dir", str(EXAMPLES))
        assert (rc, rc2) == (0, 0) and on == off
    rc, dumped, _ = await ztctl(capsys, "ztunnel-config", kind, "-o", "json", *plaintext(zt))
    assert len(json.loads(dumped)) == len(table.splitlines()) - 1


@pytest.mark.parametrize(
    ("src", "dst", "port"),
    [
        ("spiffe://cluster.local/ns/shop/sa/cart", "payments/ledger-1", "9000"),
        ("spiffe://cluster.local/ns/shop/sa/frontend", "payments/ledger-1", "9000"),
        ("spiffe://cluster.local/ns/shop/sa/default", "payments/ledger-2", "9000"),
        ("", "shop/frontend-1", "8080"),
    ],
)
async def test_authz_check_online_equals_offline(
    zt: RunningZtd, capsys: pytest.CaptureFixture[str], src: str, dst: str, port: str
) -> None:
    args = ["x", "authz", "check", "--dst", dst, "--port", port, "-o", "json", *(["--src", src] if src else [])]
    rc, online, err = await ztctl(capsys, *args, *secure(zt))
    assert (rc, err) == (0, "")
    rc, offline, _ = await ztctl(capsys, *args, "--config-dir", str(EXAMPLES))
    assert rc == 0 and json.loads(online) == json.loads(offline)
    if src.endswith("/sa/cart"):
        assert (json.loads(online)["decision"], json.loads(online)["policy"]) == ("ALLOW", "payments/ledger-allow-cart")
    if src.endswith("/sa/default"):
        assert (json.loads(online)["decision"], json.loads(online)["policy"]) == ("DENY", "payments/deny-debug")


async def test_online_errors_are_one_line(zt: RunningZtd, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty_state = tmp_path / "elsewhere"
    empty_state.mkdir()
    (empty_state / "root-cert.pem").write_bytes(zt.root_pem)
    cases = [
        (["proxy-status", "--plaintext", "--xds-address", f"127.0.0.1:{free_port()}", "--timeout", "2s"],
         "ztctl proxy-status: cannot reach ztd at 127.0.0.1:"),
        (["proxy-status", "--xds-address", "nohost"], "ztctl proxy-status: --xds-address 'nohost' is not HOST:PORT"),
        (["proxy-status", "--xds-address", f"127.0.0.1:{zt.cfg.secure_port}", "--state-dir", str(empty_state)],
         "ztctl proxy-status: no credential for 127.0.0.1:"),
        (["proxy-status", "--xds-address", f"127.0.0.1:{zt.cfg.secure_port}", "--state-dir", str(zt.cfg.state_dir),
          "--token", "not-a-jwt"], "ztctl proxy-status: ztd at 127.0.0.1:"),
        (["ztunnel-config", "workloads", "--xds-address", f"127.0.0.1:{zt.cfg.secure_port}",
          "--state-dir", str(tmp_path / "missing")], "ztctl ztunnel-config workloads: cannot read root bundle"),
        (["x", "authz", "check", "--dst", "shop/ghost", "--port", "80", *plaintext(zt)],
         "ztctl x authz check: ztd at 127.0.0.1:"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, out, err = await ztctl(capsys, *argv)
        assert (rc, out) == (1, ""), argv
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err
    rc, _, err = await ztctl(capsys, *cases[3][0])
    assert "UNAUTHENTICATED: authentication failure" in err
    rc, _, err = await ztctl(capsys, *cases[5][0])
    assert "serves no workload for pod shop/ghost" in err
