"""zt-bridge's command line refuses bad input with one readable line (exit 2 for usage, 1 for the rest), before
touching the kernel; ztctl tunnels renders a bridge's /config_dump; the key derivation is pinned."""

from __future__ import annotations

import dataclasses
import resource
from ipaddress import ip_address
from pathlib import Path

import pytest

from ipsec_bridge import keys
from ipsec_bridge import main as bridge_main
from ipsec_bridge.admin import parse_xfrm_stat
from ipsec_bridge.main import Bridge, BridgeConfig, main, raise_open_files_limit
from ipsec_bridge.netns import Netns
from ztcore import config
from ztctl.commands.proxy_config import tabulate
from ztctl.commands.tunnels import COLUMNS, notes, rows


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    (tmp_path / "mesh").mkdir()
    token = tmp_path / "token"
    token.write_text("x.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6aXN0aW8tc3lzdGVtOnp0dW5uZWwifQ.y")
    return ["--node", "node-a", "--config-dir", str(tmp_path / "mesh"), "--token-file", str(token),
            "--mesh-cidr", "10.0.0.0/8", "--admin-port", "0"]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--node", ""], "--node is required (or NODE_NAME)"),
        (["--xds-address", "127.0.0.1:15012"], "give exactly one source: --config-dir or --xds-address"),
        (["--mesh-cidr", "10.0.0.1/8"], "--mesh-cidr '10.0.0.1/8': 10.0.0.1/8 has host bits set"),
        (["--key-bits", "192"], "--key-bits 192: AES-GCM keys are 128 or 256 bits"),
        (["--offload", "packet"], "--offload crypto|packet needs --offload-dev"),
        (
            ["--tunnel-scope", "cluster"],
            "argument --tunnel-scope: invalid choice: 'cluster' (choose from 'pod', 'node')",
        ),
        (["--bridge-account", "ztunnel"], "--bridge-account 'ztunnel' is not NAMESPACE/SERVICEACCOUNT"),
        (["--port", "70000"], "--port 70000 is not a port number"),
    ],
)
def test_bad_options_are_one_line_usage_errors(
    base: list[str], change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*base, *change])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"zt-bridge: error: {message} (see zt-bridge --help)"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--netns", "nope"], "zt-bridge: network namespace 'nope' does not exist (/run/netns/nope)"),
        (["--config-dir", "/nonexistent/mesh"], "zt-bridge: --config-dir /nonexistent/mesh is not a folder"),
        (["--token-file", "/no/token"], "zt-bridge: cannot read token file /no/token: No such file or directory"),
    ],
)  # fmt: skip
def test_runtime_refusals_are_one_line_and_exit_1(
    base: list[str], change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*base, *change]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_the_bridge_raises_its_open_files_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        lower = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        before, after = raise_open_files_limit()
        assert before == lower and after > lower
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (after, hard)
        assert raise_open_files_limit() == (after, after)  # already there: nothing changes
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_xfrm_stat_parsing() -> None:
    text = "XfrmInError                     \t0\nXfrmInNoStates                  \t7\nbogus line here\n"
    assert parse_xfrm_stat(text) == {"XfrmInError": 0, "XfrmInNoStates": 7}


DUMP = {
    "node": "node-a",
    "tunnels": [
        {
            "local": "shop/a1", "local_address": "10.1.0.10", "peer": "payments/b1", "peer_address": "10.2.0.10",
            "local_identity": "spiffe://cluster.local/ns/shop/sa/frontend",
            "peer_identity": "spiffe://cluster.local/ns/payments/sa/ledger",
            "state": "up", "role": "initiator", "spi_in": "0x0000a001", "spi_out": "0x0000b001", "age_seconds": 75.2,
            "bytes_in": 2048, "bytes_out": 3 << 20, "packets_in": 20, "packets_out": 2200, "offload": "fallback",
            "next_rekey_seconds": 3500.0,
        },
        {
            "local": "shop/a2", "local_address": "10.1.0.11", "peer": "shop/b2", "peer_address": "10.2.0.11",
            "local_identity": "spiffe://cluster.local/ns/shop/sa/debug",
            "peer_identity": "spiffe://cluster.local/ns/shop/sa/cart",
            "state": "failing", "role": "responder", "last_error": "connect: [Errno 111] Connection refused",
        },
    ],
}  # fmt: skip


def test_ztctl_tunnels_table() -> None:
    table = tabulate(COLUMNS, rows([DUMP]), padding=2).splitlines()
    assert table[0].split()[:3] == ["NODE", "LOCAL", "PEER"]
    up = table[1]
    for cell in ("shop/a1 (10.1.0.10)", "0x0000a001", "0x0000b001", "1m15s", "2.0KiB/3.0MiB", "20/2200", "fallback",
                 "58m20s"):  # fmt: skip
        assert cell in up, cell
    assert "failing" in table[2] and "Connection refused" in table[2]


def test_ztctl_tunnels_notes_say_which_pairs_policy_refuses_and_why() -> None:
    dump = {
        **DUMP,
        "refused_pairs": [
            {"local_pod": "shop/a2", "local_ip": "10.1.0.11", "peer_pod": "payments/b1", "peer_ip": "10.2.0.10",
             "outbound": "DENY by payments/deny-debug", "inbound": "no ALLOW policy matched (shop/debug-allow-cart)"},
            {"local_pod": "payments/l1", "local_ip": "10.1.0.20", "peer_pod": "payments/l2", "peer_ip": "10.2.0.20",
             "outbound": "no ALLOW policy matched (payments/ledger-allow-cart)",
             "inbound": "no ALLOW policy matched (payments/ledger-allow-cart)"},
        ],
    }  # fmt: skip
    assert notes([dump]) == [
        "node-a: no tunnel shop/a2 (10.1.0.11) <-> payments/b1 (10.2.0.10), policy refuses it out: DENY by "
        "payments/deny-debug; in: no ALLOW policy matched (shop/debug-allow-cart)",
        "node-a: no tunnel payments/l1 (10.1.0.20) <-> payments/l2 (10.2.0.20), policy refuses it both ways: no "
        "ALLOW policy matched (payments/ledger-allow-cart)",
    ]


def test_exporter_context_is_canonical_and_binds_every_input() -> None:
    b = keys.Binding(keys.KeyScope.POD, ip_address("10.1.0.10"), ip_address("10.2.0.10"), 0x1000, 0x2000, 16)
    ctx = keys.exporter_context(b)
    assert ctx == (
        b"ztdpu-esp" + bytes([1, 1]) + bytes([4, 10, 1, 0, 10]) + bytes([4, 10, 2, 0, 10])
        + bytes.fromhex("00001000" "00002000" "0080")
    )  # fmt: skip
    variants = [
        dataclasses.replace(b, initiator_spi=0x2000, responder_spi=0x1000),
        dataclasses.replace(b, initiator_address=b.responder_address, responder_address=b.initiator_address),
        dataclasses.replace(b, scope=keys.KeyScope.NODE),
        dataclasses.replace(b, key_bytes=32),
        dataclasses.replace(b, responder_spi=0x2001),
    ]
    assert len({ctx, *(keys.exporter_context(v) for v in variants)}) == 1 + len(variants)


def test_split_keys_directions_and_refusals() -> None:
    material = bytes(range(1, 41))
    k = keys.split_keys(material, 16)
    assert (k.initiator_to_responder.key, k.initiator_to_responder.salt) == (material[:16], material[16:20])
    assert (k.responder_to_initiator.key, k.responder_to_initiator.salt) == (material[20:36], material[36:40])
    assert k.for_role(True) == (k.responder_to_initiator, k.initiator_to_responder)
    assert k.for_role(False) == (k.initiator_to_responder, k.responder_to_initiator)
    assert "key=" not in repr(k) and material[:16].hex() not in repr(k)
    assert keys.exporter_length(32) == 72
    for bad, why in [
        (material[:39], "exporter output is 39 bytes, expected 40"),
        (bytes(40), "degenerate"),
        (material[:20] * 2, "degenerate"),
    ]:
        with pytest.raises(keys.KeyDerivationError, match=why):
            keys.split_keys(bad, 16)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"initiator_spi": 0xFF}, "initiator spi 0xff is reserved"),
        ({"responder_spi": 1 << 32}, "responder spi 0x100000000 is reserved or not 32-bit"),
        ({"responder_address": ip_address("fd00::1")}, "tunnel addresses mix families"),
        ({"responder_address": ip_address("10.1.0.10")}, "both ends of a tunnel have the address 10.1.0.10"),
        ({"key_bytes": 24}, "AES-GCM key size must be 16 or 32 bytes, got 24"),
    ],
)
def test_bindings_that_must_never_produce_keys(kwargs: dict[str, object], why: str) -> None:
    args: dict[str, object] = {
        "scope": keys.KeyScope.POD, "initiator_address": ip_address("10.1.0.10"),
        "responder_address": ip_address("10.2.0.10"), "initiator_spi": 0x1000, "responder_spi": 0x2000,
        "key_bytes": 16,
    }  # fmt: skip
    args.update(kwargs)
    with pytest.raises(keys.KeyDerivationError, match=why):
        keys.Binding(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("before", "after", "said"),
    [("1", "3", "net.ipv4.tcp_fastopen=1 -> 3"), ("0", "3", "=0 -> 3"), ("1027", "1027", "=1027, already on")],
)
async def test_fast_open_turns_on_the_client_and_server_bits_and_says_so(
    base: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    before: str, after: str, said: str,
) -> None:  # fmt: skip
    sysctl = tmp_path / "tcp_fastopen"
    sysctl.write_text(before + "\n")
    monkeypatch.setattr(bridge_main, "_FAST_OPEN_SYSCTL", str(sysctl))
    netns = Netns(None)
    with caplog.at_level("INFO", logger="zt-bridge"):
        await Bridge(config.load(BridgeConfig, base, prog="zt-bridge", description=""))._fast_open(netns)
    assert sysctl.read_text().strip() == after
    assert netns.fast_open
    assert said in caplog.text and "handshakes use TCP Fast Open" in caplog.text


async def test_without_the_sysctl_handshakes_go_without_fast_open(
    base: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bridge_main, "_FAST_OPEN_SYSCTL", str(tmp_path / "none" / "tcp_fastopen"))
    netns = Netns(None)
    await Bridge(config.load(BridgeConfig, base, prog="zt-bridge", description=""))._fast_open(netns)
    assert not netns.fast_open
    assert caplog.messages == [
        "TCP Fast Open off for handshakes: cannot set net.ipv4.tcp_fastopen in this netns: No such file or directory"
    ]
