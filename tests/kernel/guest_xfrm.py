"""Runs inside the UML guest (see tests/kernel/test_xfrm_kernel.py): drives our XFRM encoder against Linux 6.1.

    python guest_xfrm.py esp|rekey

Gathers facts and prints one line `RESULT <json>`; the pytest side on the host judges them. Key material is
compared here and never printed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import sys
import time
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipsec_bridge.xfrm import messages as m
from ipsec_bridge.xfrm.consts import PolicyAction, PolicyDir, SaDir, XfrmGroup, XfrmMsg
from ipsec_bridge.xfrm.netlink import XfrmError, XfrmEvents, XfrmSocket
from ipsec_bridge.xfrm.offload import OffloadStatus
from tests.kernel import guestlib as g

PATTERN = bytes.fromhex("5a7e5a7e0ddba11cafe0f00d")  # ping -p: repeated through every echo payload
TRAFFIC_MARK = m.Mark(0, 0xF00)  # matches unmarked traffic, yet is a real mark on every SA and policy
ENCRYPT_MARK = m.Mark(0xE00, 0xF00)  # output mark of outbound SAs (routing of the ESP packet)
LIFETIME = m.Lifetime(
    soft_bytes=8 << 30, hard_bytes=10 << 30, soft_packets=1 << 30, hard_packets=2 << 30,
    soft_add_seconds=3000, hard_add_seconds=3600,
)  # fmt: skip
Address = IPv4Address | IPv6Address
NET_A, NET_B = str(g.POD_NET_A), str(g.POD_NET_B)


def aead(bits: int) -> m.Aead:
    return m.Aead(secrets.token_bytes(bits // 8), secrets.token_bytes(4))


def tunnel_sa(
    src: Address, dst: Address, spi: int, key: m.Aead, reqid: int, *, outbound: bool, sel_src: str, sel_dst: str
) -> m.SecurityAssociation:
    return m.SecurityAssociation(
        src=src,
        dst=dst,
        spi=spi,
        aead=key,
        selector=m.Selector.of(sel_src, sel_dst),
        reqid=reqid,
        replay_window=128,
        esn=True,
        lifetime=LIFETIME,
        mark=TRAFFIC_MARK,
        output_mark=ENCRYPT_MARK if outbound else None,
    )


@dataclasses.dataclass
class Pair:
    """The SAs of one generation between node A and node B (keys shared by both ends of each direction)."""

    a_to_b: m.SecurityAssociation
    b_to_a: m.SecurityAssociation


def make_pair(spi_ab: int, spi_ba: int, reqid: int) -> Pair:
    """A->B with AES-GCM-128, B->A with AES-GCM-256."""
    ab = tunnel_sa(g.UNDERLAY_A, g.UNDERLAY_B, spi_ab, aead(128), reqid, outbound=True, sel_src=NET_A, sel_dst=NET_B)
    ba = tunnel_sa(g.UNDERLAY_B, g.UNDERLAY_A, spi_ba, aead(256), reqid, outbound=True, sel_src=NET_B, sel_dst=NET_A)
    return Pair(ab, ba)


def inbound(sa: m.SecurityAssociation) -> m.SecurityAssociation:
    return dataclasses.replace(sa, output_mark=None)


def out_policy(local: Address, peer: Address, src: str, dst: str, reqid: int) -> m.Policy:
    return m.Policy(
        m.Selector.of(src, dst),
        PolicyDir.OUT,
        priority=100,
        templates=(m.Template(local, peer, reqid=reqid),),
        mark=TRAFFIC_MARK,
    )


def in_policies(local: Address, peer: Address, src: str, dst: str) -> list[m.Policy]:
    # reqid 0 in the templates: accept the old and the new SA while a rekey is under way
    tmpl = (m.Template(peer, local, reqid=0),)
    sel = m.Selector.of(src, dst)
    return [m.Policy(sel, d, priority=100, templates=tmpl, mark=TRAFFIC_MARK) for d in (PolicyDir.IN, PolicyDir.FWD)]


def block_policy(src: str, dst: str) -> m.Policy:
    """Default: mesh traffic that no allow policy covers is dropped, never sent in clear."""
    return m.Policy(m.Selector.of(src, dst), PolicyDir.OUT, PolicyAction.BLOCK, priority=1000, mark=TRAFFIC_MARK)


class Nodes:
    def __init__(self, a: XfrmSocket, b: XfrmSocket) -> None:
        self.a, self.b = a, b

    async def install_policies(self) -> None:
        # the default block covers the whole mesh range; allow policies for pod subnets override it by priority
        await self.a.add_policy(block_policy("10.1.0.0/16", "10.2.0.0/16"))
        await self.b.add_policy(block_policy("10.2.0.0/16", "10.1.0.0/16"))
        await self.a.add_policies(in_policies(g.UNDERLAY_A, g.UNDERLAY_B, NET_B, NET_A))
        await self.b.add_policies(in_policies(g.UNDERLAY_B, g.UNDERLAY_A, NET_A, NET_B))

    async def switch_out(self, reqid: int, *, update: bool) -> None:
        await self.a.add_policy(out_policy(g.UNDERLAY_A, g.UNDERLAY_B, NET_A, NET_B, reqid), update=update)
        await self.b.add_policy(out_policy(g.UNDERLAY_B, g.UNDERLAY_A, NET_B, NET_A, reqid), update=update)

    async def add_inbound(self, pair: Pair) -> None:
        await self.a.add_sa(inbound(pair.b_to_a))
        await self.b.add_sa(inbound(pair.a_to_b))

    async def add_outbound(self, pair: Pair) -> None:
        await self.a.add_sa(pair.a_to_b)
        await self.b.add_sa(pair.b_to_a)

    async def delete(self, pair: Pair) -> None:
        await self.a.delete_sas([pair.a_to_b.id(), pair.b_to_a.id()])
        await self.b.delete_sas([pair.a_to_b.id(), pair.b_to_a.id()])

    async def packets(self, pair: Pair) -> dict[str, int]:
        """Packets each SA of the pair handled, on both nodes (from our GETSA)."""
        out = {}
        for node, sock in (("A", self.a), ("B", self.b)):
            for sa in (pair.a_to_b, pair.b_to_a):
                out[f"{node}:0x{sa.spi:08x}"] = (await sock.get_sa(sa.id())).current.packets
        return out


async def wait_for_packets(nodes: Nodes, pair: Pair, at_least: int, limit_s: float = 60) -> None:
    """Until every SA of the pair (both nodes) carried `at_least` packets, so a switch happens mid-stream."""
    for _ in range(int(limit_s / 0.1)):
        if min((await nodes.packets(pair)).values()) >= at_least:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the SAs did not reach {at_least} packets in {limit_s}s")


async def ping(count: int, interval: str, wait: str = "1") -> asyncio.subprocess.Process:
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", interval, "-W", wait, "-p", PATTERN.hex(), str(g.POD_B_IP)]
    return await asyncio.create_subprocess_exec(
        *g.in_ns(g.POD_A, *argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )


async def ping_result(proc: asyncio.subprocess.Process) -> tuple[int, int]:
    out, _ = await proc.communicate()
    return g.ping_counts(out.decode())


# ---------------------------------------------------------------------------------------------------------------


async def scenario_esp() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    await g.build_topology()
    await g.sh("ip", "netns", "add", "lab")
    await g.sh("ip", "link", "add", "dev0", "netns", "lab", "type", "veth", "peer", "dev1", "netns", "lab")
    await g.sh("ip", "-n", "lab", "link", "set", "dev0", "up")
    a, b, lab = await asyncio.gather(XfrmSocket.open(g.NODE_A), XfrmSocket.open(g.NODE_B), XfrmSocket.open("lab"))
    nodes = Nodes(a, b)
    events = await XfrmEvents.open((XfrmGroup.EXPIRE, XfrmGroup.SA), netns="lab")

    # 1. lifetimes in action: an SA that expires (soft, then hard) while the rest runs
    expiring = m.SecurityAssociation(
        ip_address("198.51.100.1"), ip_address("198.51.100.2"), 0xE0E0E0E0, aead(128), m.Selector.any(),
        reqid=77, lifetime=m.Lifetime(soft_add_seconds=1, hard_add_seconds=6),
    )  # fmt: skip
    await lab.add_sa(expiring)
    expire_started = time.monotonic()

    # 2. before any SA: policies only, pod traffic must be blocked (never plaintext)
    await nodes.install_policies()
    blocked_before = (await g.xfrm_stat(g.NODE_A)).get("XfrmOutPolBlock", 0)
    cap_pre = g.Capture(g.NODE_A, "eth0", Path("/run/pre.pcap"))
    await cap_pre.start()
    facts["before_sa_ping"] = await ping_result(await ping(3, "0.2"))
    facts["before_sa_wire"] = g.classify(await cap_pre.stop(), PATTERN).as_dict()
    facts["before_sa_polblock"] = (await g.xfrm_stat(g.NODE_A)).get("XfrmOutPolBlock", 0) - blocked_before

    # 3. AES-GCM-128 (A->B) and AES-GCM-256 (B->A) tunnel SAs with ESN, inbound first, then outbound + out policy
    pair = make_pair(0xA0000001, 0xB0000001, reqid=1)
    await nodes.add_inbound(pair)
    await nodes.add_outbound(pair)
    await nodes.switch_out(1, update=False)

    captures = [
        g.Capture(g.NODE_A, "eth0", Path("/run/a.pcap")),
        g.Capture(g.NODE_B, "eth0", Path("/run/b.pcap")),
        g.Capture(g.POD_A, "eth0", Path("/run/pod.pcap")),  # control: the pattern is visible before encryption
    ]
    for cap in captures:
        await cap.start()
    facts["ping"] = await ping_result(await ping(20, "0.05"))
    wires = [g.classify(await cap.stop(), PATTERN).as_dict() for cap in captures]
    facts["wire_a"], facts["wire_b"], facts["wire_pod"] = wires
    facts["sa_packets"] = await nodes.packets(pair)

    # 4. our dump vs `ip -s xfrm state|policy`, on node A (traffic objects) and in the lab netns (every field kind)
    ifnames = {await g.ifindex("lab", "dev0"): "dev0"}
    v4a, v4b = ip_address("192.0.2.1"), ip_address("192.0.2.2")
    lab_sas = [
        m.SecurityAssociation(
            v4a, v4b, 0x1001, aead(128), m.Selector.of("10.9.1.0/24", "10.9.2.0/24"),
            reqid=7, replay_window=64, esn=False, mark=m.Mark(0x10, 0xFF), output_mark=m.Mark(0xD00, 0xF00), if_id=5,
            lifetime=m.Lifetime(1000000, 2000000, 1000, 2000, 100, 200),
        ),
        m.SecurityAssociation(
            v4b, v4a, 0x1002, aead(256), m.Selector.of("10.9.2.0/24", "10.9.1.0/24"), reqid=8, replay_window=16,
            mark=m.Mark(0x20),
        ),
        m.SecurityAssociation(
            ip_address("2001:db8::1"), ip_address("2001:db8::2"), 0xC0DE0002, aead(256),
            m.Selector.of("fd00:0:1::/64", "fd00:0:2::/64"), reqid=0x102, replay_window=4096, esn=True, if_id=9,
            direction=SaDir.IN, lifetime=m.Lifetime(soft_packets=10**9, hard_packets=2 * 10**9),
        ),
    ]  # fmt: skip
    await lab.add_sas(lab_sas)
    lab_policies = [
        m.Policy(
            m.Selector.of("10.9.1.0/24", "10.9.2.0/24"), PolicyDir.OUT, priority=50, mark=m.Mark(0x10, 0xFF), if_id=5,
            templates=(m.Template(v4a, v4b, reqid=7),),
        ),
        m.Policy(
            m.Selector.of("fd00:0:2::/64", "fd00:0:1::/64"), PolicyDir.FWD, priority=60,
            templates=(m.Template(ip_address("2001:db8::2"), ip_address("2001:db8::1"), reqid=0x102, optional=True),),
        ),
        m.Policy(m.Selector.of("fd00:0:9::/64", "fd00:0:8::/64"), PolicyDir.IN, PolicyAction.BLOCK, priority=7),
    ]  # fmt: skip
    await lab.add_policies(lab_policies)
    dumped = {info.sa.spi: info.sa for info in await lab.list_sas()}
    # Linux < 6.10 has no XFRMA_SA_DIR and drops it silently: compare without it there
    facts["sa_dir_reported"] = dumped[0xC0DE0002].direction is not None
    facts["lab_sa_round_trip"] = [
        dumped[want.spi] == (want if facts["sa_dir_reported"] else dataclasses.replace(want, direction=None))
        for want in lab_sas
    ]
    facts["lab_policy_round_trip"] = [
        dataclasses.replace(info.policy, index=0) == want
        for want in lab_policies
        for info in await lab.list_policies()
        if info.policy.selector == want.selector and info.policy.direction == want.direction
    ]
    compare: dict[str, Any] = {}
    for netns, sock in ((g.NODE_A, a), ("lab", lab)):
        sa_infos = await sock.list_sas()
        # The expiring SA of step 1 may hit its hard limit between our dump and ip's (a slow run): compare the
        # others; its own lifecycle is judged from the EXPIRE notifications in step 7.
        ours_sa = [g.sa_view(i, ifnames) for i in sa_infos if i.sa.spi != expiring.spi]
        ip_sa = [
            v
            for v in g.parse_ip_states(await g.sh("ip", "-n", netns, "-s", "xfrm", "state"))
            if str(v.get("spi")) != str(expiring.spi)
        ]
        ours_pol = [g.policy_view(i) for i in await sock.list_policies()]
        ip_pol = g.parse_ip_policies(await g.sh("ip", "-n", netns, "-s", "xfrm", "policy"))
        compare[netns] = {
            "ip_sa_views": [g.without_keys(v) for v in ip_sa],
            "ip_policy_views": ip_pol,
            "sa": g.compare(ours_sa, ip_sa, "spi"),
            "policy": g.compare(ours_pol, ip_pol, "index"),
            # The expiring SA of step 1 may or may not have hit its hard limit yet: count the others.
            "sa_count": sum(1 for i in sa_infos if i.sa.spi != expiring.spi),
            "policy_count": len(ours_pol),
            "sa_total": len(ours_sa),
            "policy_total": len(ours_pol),
        }
    facts["compare"] = compare
    single = await a.get_sa(pair.a_to_b.id())
    facts["getsa_equals_sent"] = single.sa == pair.a_to_b
    out_id = out_policy(g.UNDERLAY_A, g.UNDERLAY_B, NET_A, NET_B, 1).id()
    facts["getpolicy_priority"] = (await a.get_policy(out_id)).policy.priority

    # 5. ALLOCSPI -> UPDSA on the larval state -> DELSA
    spi_req = m.SpiRequest(ip_address("203.0.113.2"), ip_address("203.0.113.1"), 0x10000, 0x1FFFF, reqid=9)
    larval = await lab.alloc_spi(spi_req)
    spi = larval.sa.spi
    larval_in_ip = f"spi 0x{spi:08x}" in await g.sh("ip", "-n", "lab", "xfrm", "state")
    real = m.SecurityAssociation(
        spi_req.src, spi_req.dst, spi, aead(128), m.Selector.of("10.7.0.0/24", "10.8.0.0/24"), reqid=9, replay_window=32
    )
    await lab.add_sa(real, update=True)
    installed = await lab.get_sa(real.id())
    await lab.delete_sa(real.id())
    try:
        await lab.get_sa(real.id())
        after_delete = "still there"
    except XfrmError as exc:
        after_delete = str(exc)
    facts["allocspi"] = {
        "spi": spi,
        "larval_has_key": larval.sa.aead is not None,
        "larval_in_ip": larval_in_ip,
        "installed_equals": installed.sa == real,
        "gone_from_dump": all(i.sa.spi != spi for i in await lab.list_sas()),
        "gone_from_ip": f"spi 0x{spi:08x}" not in await g.sh("ip", "-n", "lab", "xfrm", "state"),
        "get_after_delete": after_delete,
    }
    try:
        await lab.add_sa(lab_sas[0])
        facts["duplicate_newsa"] = "accepted"
    except XfrmError as exc:
        facts["duplicate_newsa"] = str(exc)

    # 5b. one datagram, an ack asked for on its last request only: successes are implied, refusals and replies
    # still come back to the request that caused them (the kernel answers in order)
    class Counted:  # the socket, counting the datagrams read
        def __init__(self, sock: Any) -> None:
            self.sock, self.reads = sock, 0

        def recv(self, size: int) -> bytes:
            self.reads += 1
            data: bytes = self.sock.recv(size)
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self.sock, name)

    real_sock = lab._sock
    counted = lab._sock = Counted(real_sock)  # type: ignore[assignment]
    fresh = dataclasses.replace(lab_sas[0], spi=0x5001)
    batch = [
        m.new_sa(fresh),  # ok
        m.new_sa(lab_sas[0]),  # EEXIST
        m.alloc_spi(m.SpiRequest(ip_address("203.0.113.2"), ip_address("203.0.113.1"), 0x20000, 0x2FFFF, reqid=9)),
        m.delete_sa(dataclasses.replace(lab_sas[0], spi=0x5002).id()),  # ESRCH
        m.delete_sa(fresh.id()),  # ok, the last: the only ack asked for
    ]
    outcomes = await lab.call_each(batch)
    lab._sock = real_sock
    facts["batch_outcomes"] = [
        type(o).__name__ if isinstance(o, XfrmError) else [XfrmMsg(r.type).name for r in o] for o in outcomes
    ]
    facts["batch_errnos"] = [o.errno if isinstance(o, XfrmError) else 0 for o in outcomes]
    facts["batch_reads"] = counted.reads
    larval_spi = m.decode_sa(outcomes[2][0].payload).sa.spi if not isinstance(outcomes[2], XfrmError) else None
    if larval_spi is not None:
        await lab.delete_sa(m.SaId(ip_address("203.0.113.1"), larval_spi))
    facts["batch_left_behind"] = [i.sa.spi for i in await lab.list_sas() if i.sa.spi in (0x5001, 0x5002, larval_spi)]

    # 6. offload on a veth (no xfrmdev_ops): crypto falls back silently, packet mode fails loudly
    dev0 = await g.ifindex("lab", "dev0")
    crypto = dataclasses.replace(lab_sas[1], spi=0x3001, mark=None, offload=m.Offload.crypto(dev0, inbound=False))
    facts["crypto_offload_status"] = str(await lab.install_sa(crypto))
    crypto_back = await lab.get_sa(crypto.id())
    facts["crypto_offload_dumped"] = crypto_back.sa.offload is not None
    facts["crypto_offload_ip_shows"] = "offload" in await g.sh("ip", "-n", "lab", "xfrm", "state")
    packet = dataclasses.replace(crypto, spi=0x3002, offload=m.Offload.packet(dev0))
    try:
        facts["packet_offload"] = f"accepted: {await lab.install_sa(packet)}"
    except XfrmError as exc:
        facts["packet_offload"] = str(exc)
    facts["packet_offload_sa_absent"] = all(i.sa.spi != 0x3002 for i in await lab.list_sas())
    packet_policy = m.Policy(m.Selector.of("10.6.0.0/24", "10.5.0.0/24"), PolicyDir.OUT, offload=m.Offload.packet(dev0))
    try:
        facts["packet_offload_policy"] = f"accepted: {await lab.install_policy(packet_policy)}"
    except XfrmError as exc:
        facts["packet_offload_policy"] = str(exc)
    facts["packet_offload_policy_absent"] = all(
        i.policy.selector != packet_policy.selector for i in await lab.list_policies()
    )
    facts["offload_fallback_name"] = OffloadStatus.FALLBACK.value

    # 7. notifications: NEWSA for the expiring SA, then soft and hard EXPIRE
    seen: list[str] = []
    deadline = expire_started + 12
    while time.monotonic() < deadline and "expire-hard" not in seen:
        try:
            event = await asyncio.wait_for(events.next(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            break
        facts.setdefault("lab_events", []).append(
            [round(time.monotonic() - expire_started, 2), type(event).__name__, getattr(event, "hard", None)]
        )
        if isinstance(event, m.Expire) and event.sa.sa.spi == expiring.spi:
            seen.append("expire-hard" if event.hard else "expire-soft")
        elif isinstance(event, m.SaEvent) and event.sa.sa.spi == expiring.spi:
            seen.append(f"sa-{event.kind.name.lower()}")
    facts["expire_events"] = seen
    facts["expire_gone"] = all(i.sa.spi != expiring.spi for i in await lab.list_sas())
    for sock in (a, b, lab):
        sock.close()
    events.close()
    return facts


async def scenario_rekey() -> dict[str, Any]:
    """Make-before-break under `ping -i 0.01`, then the break-before-make control that must lose packets."""
    facts: dict[str, Any] = {}
    await g.build_topology()
    a, b = await asyncio.gather(XfrmSocket.open(g.NODE_A), XfrmSocket.open(g.NODE_B))
    nodes = Nodes(a, b)
    await nodes.install_policies()
    gen1 = make_pair(0xA0000001, 0xB0000001, reqid=1)
    await nodes.add_inbound(gen1)
    await nodes.add_outbound(gen1)
    await nodes.switch_out(1, update=False)

    caps = [g.Capture(g.NODE_A, "eth0", Path("/run/ra.pcap")), g.Capture(g.NODE_B, "eth0", Path("/run/rb.pcap"))]
    for cap in caps:
        await cap.start()
    flood = await ping(400, "0.01")
    await wait_for_packets(nodes, gen1, 110)
    gen2 = make_pair(0xA0000002, 0xB0000002, reqid=2)
    t0 = time.monotonic()
    await nodes.add_inbound(gen2)  # 1. both peers can decrypt the new SPIs
    await nodes.add_outbound(gen2)  # 2. new outbound SAs exist
    await nodes.switch_out(2, update=True)  # 3. the out policies now pick reqid 2
    await asyncio.sleep(0.5)  # 4. grace for packets in flight on the old SPIs
    await nodes.delete(gen1)
    facts["switch_seconds"] = time.monotonic() - t0
    facts["ping"] = await ping_result(flood)
    facts["gen2_packets"] = await nodes.packets(gen2)
    facts["gen1_present_after"] = [i.sa.spi for s in (a, b) for i in await s.list_sas() if i.sa.reqid == 1]
    wire = [g.classify(await cap.stop(), PATTERN) for cap in caps]
    facts["wire"] = [w.as_dict() for w in wire]

    # control: delete first, then install (break-before-make) -- a test that can detect loss must see it here
    flood = await ping(200, "0.01")
    await wait_for_packets(nodes, gen2, min(facts["gen2_packets"].values()) + 60)
    gen3 = make_pair(0xA0000003, 0xB0000003, reqid=3)
    await nodes.delete(gen2)
    await asyncio.sleep(0.3)
    await nodes.add_inbound(gen3)
    await nodes.add_outbound(gen3)
    await nodes.switch_out(3, update=True)
    facts["control_ping"] = await ping_result(flood)
    a.close()
    b.close()
    return facts


def main() -> None:
    scenario = sys.argv[1]
    os.environ.setdefault("TMPDIR", "/run")
    result = asyncio.run({"esp": scenario_esp, "rekey": scenario_rekey}[scenario]())
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
