"""Our XFRM encoder against a real Linux 6.1 kernel with ESP (user-mode-linux), checked against `ip xfrm`.

Two guest runs (one boot each): `esp` (block before SAs, ESP-only wire, dumps vs ip, ALLOCSPI/DELSA, offload,
EXPIRE notifications) and `rekey` (make-before-break under a 0.01 s ping flood, plus the break-before-make
control that must lose packets). tests/kernel/guest_xfrm.py gathers the facts inside the guest; this file judges.
The kernel is the project's own (scripts/uml-kernel.sh, built on first use by tests/kernel/uml.py); nothing is skipped.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.uml import REPO, run_in_uml

GUEST = Path(__file__).resolve().parent / "guest_xfrm.py"
pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def run_scenario(name: str, timeout: float = 150) -> dict[str, Any]:
    done = run_in_uml([sys.executable, str(GUEST), name], timeout, env={"PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        pytest.fail(f"guest scenario {name!r} exited {done.returncode}:\n{done.stderr[-4000:]}")
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, f"guest scenario {name!r} printed no RESULT line:\n{done.stdout[-2000:]}"
    facts: dict[str, Any] = json.loads(results[-1][len("RESULT ") :])
    return facts


@pytest.fixture(scope="module")
def esp() -> dict[str, Any]:
    return run_scenario("esp")


@pytest.fixture(scope="module")
def rekey() -> dict[str, Any]:
    return run_scenario("rekey")


def test_harness_runs_a_command_in_linux_6_1_and_returns_its_exit_code_and_output() -> None:
    script = (
        "uname -r; test -e /proc/modules && echo modules || echo no-modules;"
        " zcat /proc/config.gz | sort"
        " | grep -E '^CONFIG_(INET_ESP|INET_ESP_OFFLOAD|XFRM_USER|VETH|NETDEVSIM|CRYPTO_GCM)=';"
        " stat -fc %T /run; readlink /dev/fd; echo to-stderr >&2; exit 7"
    )
    done = run_in_uml(["bash", "-c", script], 60)
    lines = done.stdout.split()
    assert done.returncode == 7
    assert lines[0].startswith("6.1.")
    # the project's kernel: everything built in, nothing to load
    assert lines[1] == "no-modules"
    assert lines[2:8] == [
        "CONFIG_CRYPTO_GCM=y", "CONFIG_INET_ESP=y", "CONFIG_INET_ESP_OFFLOAD=y", "CONFIG_NETDEVSIM=y",
        "CONFIG_VETH=y", "CONFIG_XFRM_USER=y",
    ]  # fmt: skip
    assert lines[8:10] == ["tmpfs", "/proc/self/fd"]  # /run is the guest's own tmpfs; bash can use /dev/fd
    assert done.stderr.strip() == "to-stderr"


def test_mesh_traffic_is_blocked_before_any_sa(esp: dict[str, Any]) -> None:
    sent, received = esp["before_sa_ping"]
    assert (sent, received) == (3, 0)
    assert esp["before_sa_polblock"] >= 3  # dropped by our block policy (XfrmOutPolBlock), not lost elsewhere
    wire = esp["before_sa_wire"]
    assert wire["esp"] == wire["icmp"] == wire["other_ip"] == wire["pattern_frames"] == 0


def test_pod_to_pod_ping_crosses_the_underlay_only_as_esp(esp: dict[str, Any]) -> None:
    assert esp["ping"] == [20, 20]
    for side, spi in (("wire_a", "0xa0000001"), ("wire_b", "0xb0000001")):
        wire = esp[side]
        assert wire["esp_by_spi"] == {spi: 20}, side  # AES-GCM-128 A->B, AES-GCM-256 B->A
        assert wire["icmp"] == wire["other_ip"] == 0, side  # no plaintext IP at all on the egress capture
        assert wire["pattern_frames"] == 0, side  # the ping payload never appears in clear
    # control: the same capture method sees the pattern before encryption, so its absence above means something
    assert esp["wire_pod"]["pattern_frames"] >= 20 and esp["wire_pod"]["icmp"] >= 20
    assert esp["sa_packets"] == {"A:0xa0000001": 20, "A:0xb0000001": 20, "B:0xa0000001": 20, "B:0xb0000001": 20}


@pytest.mark.parametrize("netns", ["nodeA", "lab"])
def test_our_dump_matches_ip_xfrm_field_by_field(esp: dict[str, Any], netns: str) -> None:
    compare = esp["compare"][netns]
    for kind in ("sa", "policy"):
        result = compare[kind]
        assert result["diffs"] == {}, (kind, result["diffs"])
        assert result["missing_in_ip"] == [] and result["extra_in_ip"] == [], (kind, result)
        assert result["compared"] == compare[f"{kind}_total"] and result["compared"] > 0
        assert result["fields"] >= 12 * result["compared"]
    expected = {"nodeA": (2, 4), "lab": (3, 3)}[netns]
    assert (compare["sa_count"], compare["policy_count"]) == expected


def test_ip_xfrm_shows_the_values_we_encoded(esp: dict[str, Any]) -> None:
    """Spot checks on ip's own view, so that the field-by-field comparison cannot pass on two empty parses."""
    lab = {v["spi"]: v for v in esp["compare"]["lab"]["ip_sa_views"]}
    v4 = lab[0x1001]
    assert (v4["src"], v4["dst"], v4["reqid"], v4["mode"], v4["sel"]) == (
        "192.0.2.1", "192.0.2.2", 7, "tunnel", "10.9.1.0/24 -> 10.9.2.0/24",
    )  # fmt: skip
    assert (v4["mark"], v4["output_mark"], v4["if_id"]) == ("0x10/0xff", "0xd00/0xf00", 5)
    assert (v4["bytes"], v4["packets"], v4["add_seconds"]) == ([1000000, 2000000], [1000, 2000], [100, 200])
    assert v4["aead"] == {"name": "rfc4106(gcm(aes))", "icv": 128}
    assert (v4["esn_window"], v4["bmp_len"], v4["flags"]) == (64, 2, [])  # window > 32 without ESN: bitmap attr
    legacy = lab[0x1002]
    assert (legacy["replay_window_field"], legacy["esn_window"], legacy["mark"]) == (16, None, "0x20/0xffffffff")
    v6 = lab[0xC0DE0002]
    assert (v6["src"], v6["sel"], v6["flags"], v6["esn_window"], v6["bmp_len"]) == (
        "2001:db8::1", "fd00:0:1::/64 -> fd00:0:2::/64", ["esn"], 4096, 128,
    )  # fmt: skip
    node = {v["spi"]: v for v in esp["compare"]["nodeA"]["ip_sa_views"]}
    out_sa = node[0xA0000001]
    assert (out_sa["flags"], out_sa["esn_window"], out_sa["mark"], out_sa["output_mark"]) == (
        ["esn"], 128, "0x0/0xf00", "0xe00/0xf00",
    )  # fmt: skip
    assert out_sa["current"][1] == 20  # ip sees the packets the ping sent through our SA
    policies = {(p["sel"], p["dir"]): p for p in esp["compare"]["lab"]["ip_policy_views"]}
    fwd = policies[("fd00:0:2::/64 -> fd00:0:1::/64", "fwd")]
    assert fwd["tmpls"] == [
        {"src": "2001:db8::2", "dst": "2001:db8::1", "proto": "esp", "spi": 0, "reqid": 0x102, "mode": "tunnel",
         "level": "use", "share": "any"},
    ]  # fmt: skip
    assert policies[("fd00:0:9::/64 -> fd00:0:8::/64", "in")]["action"] == "block"
    out = policies[("10.9.1.0/24 -> 10.9.2.0/24", "out")]
    assert (out["priority"], out["mark"], out["if_id"]) == (50, "0x10/0xff", 5)


def test_sas_and_policies_round_trip_through_the_kernel(esp: dict[str, Any]) -> None:
    assert esp["lab_sa_round_trip"] == [True, True, True]
    assert esp["lab_policy_round_trip"] == [True, True, True]
    assert esp["getsa_equals_sent"] is True
    assert esp["getpolicy_priority"] == 100
    # Linux 6.1 predates XFRMA_SA_DIR (6.10) and ignores it; the round trip above compares without it then
    assert esp["sa_dir_reported"] is False


def test_allocspi_then_updsa_then_delsa(esp: dict[str, Any]) -> None:
    alloc = esp["allocspi"]
    assert 0x10000 <= alloc["spi"] <= 0x1FFFF
    assert alloc["larval_in_ip"] and not alloc["larval_has_key"]
    assert alloc["installed_equals"]  # UPDSA replaced the larval state with the full SA
    assert alloc["gone_from_dump"] and alloc["gone_from_ip"]
    assert (
        alloc["get_after_delete"]
        == f"GETSA esp spi 0x{alloc['spi']:08x} dst 203.0.113.1 failed: No such process (ESRCH)"
    )
    assert esp["duplicate_newsa"] == (
        "NEWSA esp spi 0x00001001 192.0.2.1 -> 192.0.2.2 reqid 7 failed: File exists (EEXIST)"
    )


def test_a_batch_asks_one_ack_and_still_answers_each_request(esp: dict[str, Any]) -> None:
    # NEWSA ok, NEWSA duplicate, ALLOCSPI (a reply), DELSA of nothing, DELSA ok (the only ack asked for)
    assert esp["batch_outcomes"] == [[], "XfrmError", ["NEWSA"], "XfrmError", []]
    assert esp["batch_errnos"] == [0, errno.EEXIST, 0, errno.ESRCH, 0]
    # one datagram per answer (two refusals, the reply, the last ack), none for the two silent successes: with an
    # ack asked for on every request this was 6
    assert esp["batch_reads"] == 4
    assert esp["batch_left_behind"] == []


def test_offload_on_a_device_without_support(esp: dict[str, Any]) -> None:
    # crypto: the kernel accepts and silently runs it in software; only the read-back reveals it
    assert esp["crypto_offload_status"] == "fallback"
    assert esp["crypto_offload_dumped"] is False and esp["crypto_offload_ip_shows"] is False
    # packet: refused loudly, with the kernel's reason, and nothing is left behind
    assert esp["packet_offload"].startswith("NEWSA esp spi 0x00003002 192.0.2.2 -> 192.0.2.1 reqid 8 failed: ")
    assert "Invalid argument (EINVAL)" in esp["packet_offload"]
    assert "Unrecognized flags in offload request" in esp["packet_offload"]  # 6.1 has no packet mode at all
    assert "no software fallback" in esp["packet_offload"]
    assert esp["packet_offload_sa_absent"]
    assert "policy offload needs Linux >= 6.2" in esp["packet_offload_policy"]
    assert esp["packet_offload_policy_absent"]


def test_expire_notifications_soft_then_hard(esp: dict[str, Any]) -> None:
    events = esp["expire_events"]
    assert events[0] == "sa-newsa"
    assert "expire-soft" in events and events[-1] == "expire-hard"
    assert events.index("expire-soft") < events.index("expire-hard")
    assert esp["expire_gone"]


def test_make_before_break_rekey_under_ping_flood_loses_nothing(rekey: dict[str, Any]) -> None:
    sent, received = rekey["ping"]
    assert sent == 400 and received == sent
    assert min(rekey["gen2_packets"].values()) >= 100  # every new SA (both directions, both nodes) carried >= 100
    for wire, old, new in zip(rekey["wire"], ("0xa0000001", "0xb0000001"), ("0xa0000002", "0xb0000002"), strict=True):
        assert wire["esp_by_spi"][old] >= 100 and wire["esp_by_spi"][new] >= 100  # the switch happened mid-flood
        assert set(wire["esp_by_spi"]) == {old, new}
        assert wire["icmp"] == wire["other_ip"] == wire["pattern_frames"] == 0
    assert rekey["gen1_present_after"] == []  # old SAs removed after the grace period


def test_break_before_make_control_does_lose_packets(rekey: dict[str, Any]) -> None:
    sent, received = rekey["control_ping"]
    assert sent == 200 and received < sent  # the measurement above can see loss when there is some
